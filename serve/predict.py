"""The project's own protocol: POST /predict (classifiers; tensors, or raw table records, image files
or texts encoded with the bundle's own preprocessing) and POST /embed (sentence encoders)."""

from __future__ import annotations

import base64
import json

import numpy as np
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from serve.body import BadRequest, parse_json
from serve.context import ServeContext, check_finite
from serve.lm import LMRuntime
from serve.sources import LoadedModel
from tasks.onnx.runtime import feeds

FLOAT32_MAX = float(np.finfo(np.float32).max)
INLINE_ROWS = 16  # answers up to this many rows are formatted on the event loop: a thread hop costs more


def numbers_problem(value: object, max_depth: int, name: str = "inputs") -> str | None:
    """Why `value` is not nested lists of plain numbers at most `max_depth` deep (None when it is).
    Booleans and numeric strings are not numbers; an integer beyond float32 is out of range."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list):
            if depth >= max_depth:
                return f"{name} is nested deeper than the {max_depth} levels [batch, *input_shape]"
            stack.extend((x, depth + 1) for x in item)
        elif isinstance(item, bool) or not isinstance(item, (int, float)):
            return f"{name} must hold only numbers, found {type(item).__name__} {json.dumps(item)[:40]}"
        elif isinstance(item, int) and abs(item) > FLOAT32_MAX:
            return f"{name} holds an integer of {len(str(abs(item)))} digits, beyond the float32 range"
    return None


def parse_inputs(payload: object, sample_shape: tuple[int, ...], max_batch: int) -> np.ndarray:
    """A float32 batch of shape (N, *sample_shape), or `BadRequest` saying what is wrong."""
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise BadRequest(400, 'body must be a JSON object with an "inputs" array')
    if problem := numbers_problem(payload["inputs"], len(sample_shape) + 1):
        raise BadRequest(400, problem)
    try:
        with np.errstate(over="ignore"):  # a float beyond float32 becomes inf, refused below
            x = np.asarray(payload["inputs"], dtype=np.float32)
    except (ValueError, TypeError):
        raise BadRequest(400, "inputs must be a rectangular array of numbers") from None
    if x.shape == sample_shape:
        x = x[None]
    expected = ["batch", *sample_shape]
    if x.ndim != len(sample_shape) + 1 or x.shape[1:] != sample_shape:
        raise BadRequest(400, f"inputs has shape {list(x.shape)}, expected {expected}")
    if x.shape[0] == 0:
        raise BadRequest(400, "inputs is an empty batch")
    if x.shape[0] > max_batch:
        raise BadRequest(413, f"batch of {x.shape[0]} exceeds the limit of {max_batch}")
    if not np.isfinite(x).all():
        raise BadRequest(400, "inputs contains NaN or infinity (or a number beyond the float32 range)")
    return x


RAW_INPUTS = {
    "records": ("table", "an array of objects (column -> value)"),
    "images": ("image", "an array of base64-encoded PNG/JPEG files"),
    "texts": ("text", "an array of strings"),
}


def _decode_base64(items: list) -> list[bytes]:
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise BadRequest(400, f"images[{i}] is not a base64 string")
        try:
            out.append(base64.b64decode(item, validate=True))
        except ValueError:
            raise BadRequest(400, f"images[{i}] is not valid base64") from None
    return out


def parse_raw(payload: dict, key: str, preprocessing: object, max_batch: int) -> np.ndarray:
    """What a user has (table records, image files, texts) encoded with the bundle's own
    preprocessing, the function training used; or `BadRequest` naming the item and what is wrong."""
    from tasks.data.image_folder import encode_images
    from tasks.data.table import encode_records
    from tasks.data.text import encode_texts

    kind, shape = RAW_INPUTS[key]
    if not (isinstance(preprocessing, dict) and preprocessing.get("kind") == kind):
        raise BadRequest(
            400,
            f'this bundle was not trained on {kind} data: "{key}" does not apply; send what its '
            "manifest (GET /model-info) describes",
        )
    items = payload[key]
    if isinstance(items, (dict, str)):
        items = [items]
    if not isinstance(items, list) or not items:
        raise BadRequest(400, f"{key} must be a non-empty {shape.removeprefix('an ')}")
    if len(items) > max_batch:
        raise BadRequest(413, f"batch of {len(items)} exceeds the limit of {max_batch}")
    try:
        if kind == "image":
            return encode_images(preprocessing, _decode_base64(items))
        return (encode_records if kind == "table" else encode_texts)(preprocessing, items)
    except ValueError as err:
        raise BadRequest(400, str(err)) from None


def parse_texts(payload: object, max_batch: int) -> list[str]:
    """A list of non-empty strings, or `BadRequest` saying what is wrong."""
    if not isinstance(payload, dict) or "texts" not in payload:
        raise BadRequest(400, 'body must be a JSON object with a "texts" array')
    texts = payload["texts"]
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts:
        raise BadRequest(400, "texts must be a non-empty array of strings")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        raise BadRequest(400, f"texts[{bad[0]}] is not a non-empty string ({len(bad)} such item(s))")
    if len(texts) > max_batch:
        raise BadRequest(413, f"batch of {len(texts)} exceeds the limit of {max_batch}")
    return texts


def classifier_feeds(model: LoadedModel, body: bytes, max_batch: int) -> dict[str, np.ndarray]:
    payload = parse_json(body)
    if isinstance(payload, dict) and (raw := next((k for k in RAW_INPUTS if k in payload), None)):
        x = parse_raw(payload, raw, model.manifest.get("preprocessing"), max_batch)
    else:
        assert model.sample_shape is not None  # every classifier bundle has one
        x = parse_inputs(payload, model.sample_shape, max_batch)
    assert not isinstance(model.session, LMRuntime)  # a classifier runs on ONNX Runtime
    return feeds(model.session, x)


def encoder_feeds(model: LoadedModel, body: bytes, max_batch: int) -> dict[str, np.ndarray]:
    from tasks.encoder.minilm import tokenize

    return tokenize(model.tokenizer, parse_texts(parse_json(body), max_batch), model.manifest["max_length"])


def classification(model: LoadedModel, logits: np.ndarray) -> dict:
    check_finite("logits", logits)
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    probabilities = shifted / shifted.sum(1, keepdims=True)
    names = model.manifest.get("labels") or list(range(logits.shape[1]))
    best = logits.argmax(1)
    return {
        "predictions": best.tolist(),
        "labels": [names[i] for i in best],
        "probabilities": [
            {str(n): round(float(p), 6) for n, p in zip(names, row, strict=True)} for row in probabilities
        ],
        "logits": logits.tolist(),
        "model_sha256": model.sha256,
    }


def router(ctx: ServeContext) -> APIRouter:
    api = APIRouter()

    async def answer(request: Request, family: str, parse, respond) -> dict:
        """Parse and check on a worker thread (a large body never blocks the event loop), infer in a
        batch, answer."""
        model = ctx.model(family)  # one consistent model for this request, even across a reload
        body = await ctx.body(request)
        output = (
            await ctx.infer(model, await run_in_threadpool(parse, model, body, ctx.settings.max_request_samples))
        )[0]
        if len(output) <= INLINE_ROWS:
            return respond(model, output)
        return await run_in_threadpool(respond, model, output)

    @api.post("/predict")
    async def predict(request: Request) -> dict:
        return await answer(request, "classifier", classifier_feeds, classification)

    @api.post("/embed")
    async def embed(request: Request) -> dict:
        def embeddings(model: LoadedModel, out: np.ndarray) -> dict:
            check_finite("embedding", out)
            return {"embeddings": out.tolist(), "model_sha256": model.sha256}

        return await answer(request, "encoder", encoder_feeds, embeddings)

    return api
