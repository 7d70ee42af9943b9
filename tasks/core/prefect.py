"""The Prefect servers: the temporary one a run uses when no PREFECT_API_URL is set, and a project's
long-lived stack (server, work pool, worker) that scheduled and data-triggered runs need.

Prefect would start one itself, as a child in the run's process group: a Ctrl-C in the terminal
then kills the server at the same moment as it interrupts the run, and the run's last state
updates and log shipping retry against a dead port for minutes. This server runs in a session of
its own (the terminal's Ctrl-C does not reach it), is told by the kernel to stop when the run's
process dies (even by SIGKILL), and is stopped by the run itself once the run has recorded how it
ended.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
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
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(Path(prefect.__file__).parent.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env={
                **os.environ,
                "PREFECT_UI_ENABLED": "0",
                "PREFECT__SERVER_EPHEMERAL": "1",
                "PREFECT__SERVER_FINAL": "1",
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_for_http(
            f"{url}/health", server, timeout_s, f"the temporary Prefect server (see {log_dir / 'prefect-server.log'})"
        )
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


POOL = "modelforge-process"


def ensure_pool(pool: str = POOL) -> None:
    """The process work pool the deployments run on (created when missing)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))


def _stack_file(root: Path) -> Path:
    return Path(root).resolve() / ".modelforge" / "stack.json"


def _alive(pid: int) -> bool:
    """A live Prefect process: a pid from an old stack file that now names another program is not ours."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and "prefect" in proc.cmdline()
    except psutil.Error:
        return False


def running_stack(root: Path) -> dict | None:
    """What `modelforge stack start` recorded for the project at `root` (api_url, pids, logs), when its
    Prefect server answers; None otherwise."""
    try:
        stack = json.loads(_stack_file(root).read_text())
        return stack if httpx.get(f"{stack['api_url']}/health", timeout=2).status_code == 200 else None
    except (OSError, ValueError, KeyError, httpx.HTTPError):
        return None


@contextmanager
def prefect_api(root: Path) -> Iterator[str]:
    """The Prefect server to talk to: PREFECT_API_URL when set, else the stack running for the
    project at `root`; a `ValueError` saying how to start one when there is neither."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if url := PREFECT_API_URL.value():
        yield url
        return
    if not (stack := running_stack(root)):
        raise ValueError(
            f"no Prefect server: run `modelforge stack start` in {Path(root).resolve()} "
            "(or set PREFECT_API_URL to a running one)"
        )
    with temporary_settings(updates={PREFECT_API_URL: stack["api_url"]}):
        yield stack["api_url"]


def _stop(pid: int, timeout_s: float = 30) -> None:
    """SIGTERM the process's group (the server's uvicorn, the worker's flow runs); SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _alive(pid):
            return
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)


def start_stack(root: Path, port: int = 4200, pool: str = POOL, timeout_s: float = 120) -> dict:
    """A Prefect server (SQLite under `.modelforge/prefect-server`, on 127.0.0.1:`port`), the process
    work pool and a worker for the project at `root`, each in a session of its own so they outlive
    this command and a Ctrl-C in its terminal; logs in `.modelforge/logs/`, pids and the API URL in
    `.modelforge/stack.json`. A stack already running is returned as it is."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = Path(root).resolve()
    if (stack := running_stack(root)) and all(map(_alive, stack["pids"].values())):
        return {**stack, "already_running": True}
    stop_stack(root)  # what is left of a stack that half-died (a crashed worker, a reboot)
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise ValueError(f"port {port} on 127.0.0.1 is in use (another project's stack?): choose one with --port")
    state, url = root / ".modelforge", f"http://127.0.0.1:{port}/api"
    logs, home = state / "logs", state / "prefect-server"
    logs.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
    }
    stack = {"api_url": url, "root": str(root), "pool": pool, "logs": str(logs), "pids": {}}

    def launch(name: str, *args: str) -> subprocess.Popen:
        with open(logs / f"prefect-{name}.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", *args],
                env=env,
                cwd=root,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        stack["pids"][name] = proc.pid
        _stack_file(root).write_text(json.dumps(stack, indent=2))  # at once: `stack stop` finds a half-started stack
        return proc

    try:
        server = launch("server", "server", "start", "--host", "127.0.0.1", "--port", str(port))
        wait_for_http(f"{url}/health", server, timeout_s, f"the Prefect server (see {logs / 'prefect-server.log'})")
        with temporary_settings(updates={PREFECT_API_URL: url}):
            ensure_pool(pool)
            launched = datetime.now(UTC)
            worker = launch("worker", "worker", "start", "--pool", pool)
            deadline = time.monotonic() + timeout_s
            with get_client(sync_client=True) as client:
                # The database outlives a stack: workers of earlier ones are listed too, with older heartbeats.
                while not any(
                    w.last_heartbeat_time and w.last_heartbeat_time >= launched
                    for w in client.read_workers_for_work_pool(pool)
                ):
                    if worker.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"the Prefect worker did not start (see {logs / 'prefect-worker.log'})")
                    time.sleep(0.5)
    except BaseException:
        stop_stack(root)
        raise
    return stack


def stop_stack(root: Path) -> dict | None:
    """Stop what `start_stack` started for the project at `root`; None when nothing was recorded."""
    try:
        stack = json.loads(_stack_file(root).read_text())
    except (OSError, ValueError):
        return None
    # The worker first, while the server still answers its last calls.
    for pid in reversed(stack.get("pids", {}).values()):
        _stop(pid)
    _stack_file(root).unlink(missing_ok=True)
    return stack
