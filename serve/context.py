"""What every protocol module gets: the served model, the batcher, the settings and the metrics."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse

from serve.batcher import Batcher
from serve.body import BadRequest, read_body
from serve.metrics import Metrics
from serve.runtime import BatchPlan, ModelHolder
from serve.settings import ServeSettings
from serve.sources import LoadedModel

# Where a caller of the wrong endpoint should go, by the served bundle's family.
ENDPOINTS = {
    "classifier": ("a classifier", 'POST /predict {"inputs": [...]} (or /v2/models/{name}/infer)'),
    "encoder": ("a sentence encoder", 'POST /embed {"texts": [...]} (or /v2/models/{name}/infer)'),
    "causal_lm": ("a causal LM", "POST /v1/completions or /v1/chat/completions"),
}


@dataclass
class ServeContext:
    settings: ServeSettings
    holder: ModelHolder
    metrics: Metrics
    batcher: Batcher | None = None
    plan: BatchPlan | None = None
    in_flight: int = 0  # HTTP requests being served (the event loop's thread alone changes it)
    load_error: str | None = None
    extra: dict = field(default_factory=dict)

    def model(self, *families: str) -> LoadedModel:
        """The model serving now; 503 while the first one loads, 400 naming the right endpoints when it
        is not of one of `families` (any family when none is given)."""
        model = self.holder.model
        if model is None:
            raise BadRequest(503, self.load_error or "the model is still loading", {"Retry-After": "1"})
        if families and model.family not in families:
            kind, endpoints = ENDPOINTS.get(model.family, (f"a {model.family} bundle", "GET /model-info"))
            raise BadRequest(400, f"this bundle is {kind}: {endpoints}")
        return model

    def readiness(self) -> JSONResponse:
        """200 when the server should get traffic, else 503 with the reason (loading, verifying, draining)."""
        reason = self.load_error or self.holder.not_ready()
        return JSONResponse(
            {"ready": reason is None, **({"reason": reason} if reason else {})},
            status_code=200 if reason is None else 503,
        )

    async def body(self, request: Request, any_type: bool = False) -> bytes:
        return await read_body(request, self.settings.max_body_bytes, self.settings.read_timeout_s, not any_type)

    async def infer(self, model: LoadedModel, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The model's outputs for `feeds`, run in a batch with whatever else is waiting."""
        assert self.batcher is not None  # made at startup, before any request is served
        future = self.batcher.submit(model, feeds, self.settings.request_timeout_ms / 1000)
        return await asyncio.wrap_future(future)


def check_finite(name: str, values: np.ndarray) -> None:
    """A 400 when a model's output is not finite: its input lay far outside what it was trained on,
    and JSON cannot carry the answer."""
    bad = ~np.isfinite(values)
    if bad.any():
        sample = int(np.argwhere(bad)[0][0])
        raise BadRequest(
            400,
            f"the model's output ({name}) for sample {sample} is not finite: the input lies far "
            "outside the range the model was trained on",
        )
