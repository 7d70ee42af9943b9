"""The temporary Prefect API server a run uses when no PREFECT_API_URL is set.

Prefect would start one itself, as a child in the run's process group: a Ctrl-C in the terminal
then kills the server at the same moment as it interrupts the run, and the run's last state
updates and log shipping retry against a dead port for minutes. This server runs in a session of
its own (the terminal's Ctrl-C does not reach it), is told by the kernel to stop when the run's
process dies (even by SIGKILL), and is stopped by the run itself once the run has recorded how it
ended.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, timeout_s: float, what: str) -> bytes:
    """The body of the first 200 answer from `url`, polled while the server `proc` starts; a
    `RuntimeError` naming `what` if `proc` exits or `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            answer = httpx.get(url, timeout=2)
            if answer.status_code == 200:
                return answer.content
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start (exit {proc.poll()})")
        time.sleep(0.2)


def _flush_prefect() -> None:
    """Send the logs and events Prefect still queues while the server listens: left to interpreter
    exit, they would retry against the stopped server for minutes."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        service.drain_all(timeout=10)


@contextmanager
def temporary_prefect_server(log_dir: Path, timeout_s: float = 120) -> Iterator[str | None]:
    """Yield the API URL of a temporary server for this process, or None (and start nothing) when
    PREFECT_API_URL already names one. The server's own output goes to `log_dir/prefect-server.log`."""
    if os.environ.get("PREFECT_API_URL"):
        yield None
        return
    import prefect
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "prefect-server.log", "ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "error", "--lifespan", "on"],
            env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                 "PREFECT__SERVER_FINAL": "1"},
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_for_http(f"{url}/health", server, timeout_s,
                      f"the temporary Prefect server (see {log_dir / 'prefect-server.log'})")
        print(f"[prefect] temporary server pid {server.pid} at {url}", flush=True)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            os.environ["PREFECT_API_URL"] = url  # for anything that reads the environment directly
            try:
                yield url
            finally:
                _flush_prefect()
                os.environ.pop("PREFECT_API_URL", None)
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
