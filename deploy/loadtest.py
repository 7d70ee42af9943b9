"""Load test of the model server on loopback, with a model reload in the middle.

    .venv/bin/python -m deploy.loadtest [--bundle deploy/champion] [--reload-with deploy/bundle]
                                        [--seconds 10] [--threads 4] [--max-requests 200000]

Serves a temporary copy of `--bundle` on 127.0.0.1, drives it from client threads with keep-alive
connections for a bounded time and request count, publishes `--reload-with` into the served folder
halfway through, and reports requests/s, p50/p99 latency, errors, and whether the reload happened.
"""

from __future__ import annotations

import argparse
import http.client
import json
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@contextmanager
def running_server(app, host: str = "127.0.0.1", wait_ready: bool = True) -> Iterator[tuple[str, int]]:
    """Run the model server's app with uvicorn in a thread on a free loopback port, as `modelforge
    serve` runs it; yield once it listens and (with `wait_ready`) its model is loaded; stop it on exit."""
    import uvicorn

    from serve.app import uvicorn_config

    server = uvicorn.Server(uvicorn_config(app, host, 0))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    ctx = app.state.ctx
    deadline = time.time() + 120
    while not server.started or (wait_ready and ctx.holder.model is None):
        if ctx.load_error or time.time() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError(f"model server did not start: {ctx.load_error or 'timed out'}")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield host, port
    finally:
        server.should_exit = True
        thread.join(10)


def request(host: str, port: int, method: str, path: str, body: object | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


@dataclass(frozen=True)
class LoadReport:
    requests: int
    errors: int  # non-200 answers and connection failures
    seconds: float
    p50_ms: float
    p99_ms: float
    models_seen: tuple[str, ...]  # model sha256s that answered, in order of first appearance

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def __str__(self) -> str:
        return (
            f"{self.requests} requests in {self.seconds:.1f}s = {self.rps:,.0f} req/s, p50 {self.p50_ms:.2f} ms, "
            f"p99 {self.p99_ms:.2f} ms, errors {self.errors}, models answering {len(self.models_seen)}"
        )


def load(
    host: str,
    port: int,
    payload: dict,
    seconds: float,
    threads: int,
    max_requests: int,
    halfway: Callable[[], object] | None = None,
) -> LoadReport:
    """Drive POST /predict from `threads` keep-alive clients until `seconds` or `max_requests`."""
    body = json.dumps(payload).encode()
    stop = threading.Event()
    lock = threading.Lock()
    latencies: list[float] = []
    errors = [0]
    seen: dict[str, None] = {}
    budget = [max_requests]

    def client() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        while not stop.is_set():
            with lock:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            t = time.perf_counter()
            try:
                conn.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException):
                ok, data = False, b""
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=10)
            elapsed = time.perf_counter() - t
            with lock:
                latencies.append(elapsed)
                if ok:
                    seen.setdefault(json.loads(data)["model_sha256"], None)
                else:
                    errors[0] += 1
        conn.close()

    workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    if halfway is not None:
        time.sleep(seconds / 2)
        halfway()
    end = start + seconds
    while time.perf_counter() < end and any(w.is_alive() for w in workers):
        time.sleep(0.05)
    stop.set()
    for w in workers:
        w.join(15)
    elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return LoadReport(
        len(latencies), errors[0], elapsed, float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), tuple(seen)
    )


def main() -> None:
    from serve.app import create_app
    from serve.settings import ServeSettings
    from serve.sources import BundleSource
    from tasks.release.ship import publish_copy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="deploy/champion")
    parser.add_argument("--reload-with", default="deploy/bundle", help="bundle published halfway to force a reload")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--max-requests", type=int, default=200_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        served = publish_copy(Path(args.bundle), Path(tmp) / "served")
        manifest = json.loads((served / "manifest.json").read_text())
        sample = np.zeros([1, *manifest["input_shape"]], dtype=np.float32).tolist()
        app = create_app(BundleSource(served), ServeSettings(poll_seconds=0.2))
        with running_server(app) as (host, port):
            report = load(
                host,
                port,
                {"inputs": sample},
                args.seconds,
                args.threads,
                args.max_requests,
                halfway=lambda: publish_copy(Path(args.reload_with), served),
            )
            _, health = request(host, port, "GET", "/health")
    print(f"[loadtest] {report}")
    print(f"[loadtest] reloads during the test: {health['reloads']}; serving {health['model_sha256'][:12]}...")


if __name__ == "__main__":
    main()
