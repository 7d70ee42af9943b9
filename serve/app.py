"""The app: protocols wired to one served model, probes, metrics, auth, and a draining shutdown.

Liveness (`/livez`, `/v2/health/live`) says the process answers; readiness (`/readyz`,
`/v2/health/ready`) says it should get traffic: not while the model loads, while a reload verifies
a new one, or while draining. On SIGTERM (or Ctrl-C) the server reports not ready, keeps accepting
for `drain_grace_s`, then stops accepting, lets requests in flight finish within `drain_timeout_s`,
and exits 0.
"""

from __future__ import annotations

import contextlib
import gc
import hmac
import sys
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from serve import openai, predict, v2
from serve.batcher import Batcher
from serve.body import BadRequest
from serve.context import ServeContext
from serve.lm import BATCH_GAP_SECONDS, LM_FAMILY, LMRuntime
from serve.metrics import Metrics
from serve.runtime import (
    BatchPlan,
    ModelHolder,
    cpu_count,
    measure_curve,
    plan_batching,
    sample_feeds,
)
from serve.settings import ServeSettings
from serve.sources import LoadedModel

# A protocol is a module whose `router(ctx)` returns its endpoints; each endpoint checks the served
# model's family (`ctx.model().family`) and tells a caller of another family where to go.
PROTOCOLS: tuple[Callable[[ServeContext], APIRouter], ...] = (predict.router, v2.router, openai.router)
PROBES = frozenset({"/livez", "/readyz", "/v2/health/live", "/v2/health/ready"})


def batch_plan(settings: ServeSettings, model: LoadedModel) -> BatchPlan:
    """What `settings.batching` means for this model on this CPU."""
    if model.family == LM_FAMILY:  # its own engine decodes sequences together, step by step
        return BatchPlan(
            settings.lm_max_batch > 1,
            settings.lm_max_batch,
            BATCH_GAP_SECONDS * 1000,
            f"causal LM: up to {settings.lm_max_batch} sequence(s) per decode step (--lm-max-batch), "
            f"{settings.lm_max_waiting} more waiting (--lm-max-waiting)",
        )
    if settings.batching == "off" or sample_feeds(model, 1) is None:
        return BatchPlan(
            False,
            1,
            0.0,
            "batching off (--batching off)"
            if settings.batching == "off"
            else f"no batching for {model.family} bundles",
        )
    if settings.batching == "on":
        return BatchPlan(True, settings.max_batch, settings.max_wait_ms, "batching on (--batching on)")
    return plan_batching(measure_curve(model, settings.max_batch), settings.max_wait_ms, settings.p99_target_ms)


class Gate:
    """Pure ASGI middleware around every request: the auth token, metrics by endpoint and status,
    the count of requests in flight (which the batcher reads), and `Connection: close` while draining."""

    def __init__(self, app, ctx: ServeContext):
        self.app, self.ctx = app, ctx
        token = ctx.settings.auth_token
        self.expected = f"Bearer {token}".encode() if token else None

    async def _refuse(self, send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
            }
        )
        await send({"type": "http.response.body", "body": b'{"error": "missing or wrong bearer token"}'})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        ctx, start, status = self.ctx, time.perf_counter(), [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if ctx.holder.draining:  # a keep-alive client reconnects, and a load balancer moves it elsewhere
                    message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        ctx.in_flight += 1
        ctx.metrics.in_flight.inc()
        try:
            authorization = dict(scope["headers"]).get(b"authorization", b"")
            if self.expected and scope["path"] not in PROBES and not hmac.compare_digest(authorization, self.expected):
                status[0] = 401
                await self._refuse(send)
            else:
                await self.app(scope, receive, send_wrapper)
        finally:
            ctx.in_flight -= 1
            ctx.metrics.in_flight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            ctx.metrics.requests.labels(endpoint, str(status[0])).inc()
            ctx.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


def create_app(source, settings: ServeSettings | None = None, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """The app for `source` (a `BundleSource` or `RegistrySource`). The model loads in the
    background once the app starts; `on_fatal(message)` hears when it cannot (no model, or one that
    fails its sha256 check)."""
    settings = settings or ServeSettings()
    metrics = Metrics()
    ctx = ServeContext(
        settings, ModelHolder(source, settings.load_options, metrics, lambda m: batch_plan(settings, m)), metrics
    )
    stop = threading.Event()

    def start() -> None:
        try:
            model = ctx.holder.load()
        except Exception as err:
            ctx.load_error = f"{type(err).__name__}: {err}"
            print(f"modelforge: {ctx.load_error}", file=sys.stderr, flush=True)
            if on_fatal:
                on_fatal(ctx.load_error)
            return
        # Everything loaded so far (torch, mlflow, the session) lives for the whole process: frozen, it
        # is left out of the garbage collector's full passes, which otherwise stall every request.
        gc.freeze()
        how = (
            f"{len(model.verified_files)} files verified"
            if model.family == LM_FAMILY
            else f"sha256 {str(model.sha256)[:12]}..., "
            f"{settings.workers} worker(s) x {settings.threads_per_worker} thread(s)"
        )
        print(
            f"[serve] serving {source} ({model.family}, {how}) on {cpu_count()} cores; {ctx.holder.plan.reason}",
            flush=True,
        )
        del model  # this thread lives on: a reload must be able to free the model (a causal LM's engine thread)
        while not stop.wait(settings.poll_seconds):
            ctx.holder.reload_if_changed()

    def run_batch(model: object, feeds: dict) -> list[np.ndarray]:
        # the batcher holds the LoadedModel a request was checked against; causal LMs never batch through it
        assert isinstance(model, LoadedModel) and not isinstance(model.session, LMRuntime)
        return model.session.run(None, feeds)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        ctx.batcher = Batcher(
            run_batch,
            metrics,
            settings.workers,
            settings.max_queue,
            lambda: (ctx.holder.plan.max_batch, ctx.holder.plan.max_wait_ms / 1000),
            lambda: ctx.in_flight,
        )
        threading.Thread(target=start, name="model-loader", daemon=True).start()
        yield
        stop.set()
        ctx.batcher.stop()
        if ctx.holder.model is not None and isinstance(ctx.holder.model.session, LMRuntime):
            ctx.holder.model.session.close()  # its engine thread finishes what it admitted, then ends

    docs: dict[str, Any] = {} if settings.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="modelforge model server", lifespan=lifespan, **docs)
    app.state.ctx = ctx

    @app.exception_handler(BadRequest)
    async def bad_request(_request, err: BadRequest) -> JSONResponse:
        return JSONResponse({"error": str(err)}, status_code=err.status, headers=err.headers)

    # Probes and status pages are async: answered on the event loop even when every worker thread is busy.
    @app.get("/livez")
    async def livez() -> dict:
        return {"live": True}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        return ctx.readiness()

    @app.get("/health")
    async def health() -> dict:
        m, holder = ctx.model(), ctx.holder
        return {
            "status": "ok",
            "ready": holder.not_ready() is None,
            **m.identity(),
            "candidate": m.manifest.get("candidate"),
            "loaded_at": m.loaded_at,
            "reloads": holder.reloads,
            "last_reload_error": holder.failed[1] if holder.failed else None,
        }

    @app.get("/model-info")
    async def model_info() -> dict:
        m = ctx.model()
        if m.family == LM_FAMILY:  # onnxruntime-genai runs its own threads; what it did since loading instead
            assert isinstance(m.session, LMRuntime)  # a causal LM's session is its LMRuntime
            return {**m.manifest, **m.identity(), "batching": ctx.holder.plan.to_dict(), "generation": m.session.stats}
        return {
            **m.manifest,
            "batching": ctx.holder.plan.to_dict(),
            "threads": {
                "cores": cpu_count(),
                "workers": settings.workers,
                "intra_op_threads": settings.threads_per_worker,
            },
        }

    @app.post("/reload")
    async def reload() -> dict:
        reloaded = await run_in_threadpool(ctx.holder.reload_if_changed)
        holder = ctx.holder
        return {
            "reloaded": reloaded,
            **ctx.model().identity(),
            "last_reload_error": holder.failed[1] if holder.failed else None,
        }

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    for protocol in PROTOCOLS:
        app.include_router(protocol(ctx))
    app.add_middleware(Gate, ctx=ctx)
    return app


def uvicorn_config(app: FastAPI, host: str, port: int):
    """uvicorn as this server runs it: a read timeout on request headers (a client that trickles
    them is cut off), keep-alive, and the drain timeout on shutdown."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    settings: ServeSettings = app.state.ctx.settings

    class TimedH11(H11Protocol):
        """uvicorn waits for a request's headers for ever; this closes the connection after the read timeout."""

        _timer = None

        def _arm(self) -> None:
            if self._timer is None:
                self._timer = self.loop.call_later(settings.read_timeout_s, self._too_slow)

        def _too_slow(self) -> None:
            self._timer = None
            if self.cycle is None or self.cycle.response_complete:  # still waiting for headers
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete and self._timer is not None:
                self._timer.cancel()  # headers are in: the body has its own timeout (408)
                self._timer = None
            elif self.cycle is None or self.cycle.response_complete:
                self._arm()

        def connection_lost(self, exc) -> None:
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        http=TimedH11,
        timeout_graceful_shutdown=settings.drain_timeout_s,  # type: ignore[arg-type]  # uvicorn waits on it with asyncio: a float works
        timeout_keep_alive=5,
    )


def serve(source, settings: ServeSettings) -> int:
    """Serve until SIGTERM/SIGINT, then drain; 0 after a drain, 2 when the model cannot be loaded."""
    import signal

    import uvicorn

    exit_code = [0]

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            ctx = app.state.ctx
            if ctx.holder.draining:  # a second signal: stop waiting
                self.force_exit = True
                return
            ctx.holder.draining = True
            print(
                f"[serve] {signal.Signals(sig).name}: draining (in flight: {ctx.in_flight}, timeout "
                f"{settings.drain_timeout_s:g} s)",
                flush=True,
            )
            threading.Timer(settings.drain_grace_s, lambda: setattr(self, "should_exit", True)).start()

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's own re-raises the signal after shutting down, which would end the process
            # with 143 instead of the 0 of a completed drain.
            previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGTERM, signal.SIGINT)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    def fatal(_message: str) -> None:
        exit_code[0] = 2
        server.should_exit = True

    app = create_app(source, settings, on_fatal=fatal)
    server = DrainingServer(uvicorn_config(app, settings.host, settings.port))
    server.run()
    return exit_code[0]
