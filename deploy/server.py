"""HTTP model server on ONNX Runtime for a modelforge bundle (model.onnx + manifest.json).

    modelforge serve --bundle deploy/champion [--host 127.0.0.1 --port 8000]
    modelforge serve --model-uri models:/digits-classifier@champion

Endpoints: POST /predict {"inputs": [...]} (classifier bundles; a bundle trained on a table also
takes raw rows, {"records": [{"column": value, ...}]}, one trained on an image folder raw files,
{"images": ["<base64 PNG/JPEG>", ...]}, one trained on labelled text {"texts": ["...", ...]}, all
encoded with the bundle's own preprocessing; answers carry class names and probabilities),
POST /embed {"texts": [...]}
(sentence-encoder bundles, tokenised with the tokenizer shipped in the bundle), GET /health,
GET /model-info, POST /reload. Input is checked against the manifest (shape, plain finite numbers,
batch limit; strings for texts) and rejected with a 4xx naming the problem; a body must be
application/json (415) within a size limit checked before it is read (413), and is parsed and run
on worker threads, never on the event loop. The model file must match the manifest's sha256, at
start (else the server refuses to start) and at every reload (else the old model keeps serving
and /health reports why). A watcher reloads when the manifest, the model file or the registry
alias changes; the new session is built completely before one reference swap, so requests in
flight finish on the old model and none are dropped. A causal-LM bundle ("family": "causal_lm") is loaded by
serve/lm.py and answers the OpenAI-compatible /v1 endpoints of serve/openai.py instead of /predict.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from serve.lm import LM_FAMILY, lm_fingerprint, load_lm_bundle
from serve.openai import openai_router
from tasks.guard_bundle import BundleError, relative_paths
from tasks.run_onnx import feeds, make_session

MAX_BATCH = 1024
MAX_BODY_BYTES = 8 << 20  # 1,024 samples of 8x8 pixels are about 1.5 MB of JSON
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class LoadedModel:
    session: object
    manifest: dict
    sample_shape: tuple[int, ...] | None  # classifier bundles
    tokenizer: object | None  # sentence-encoder bundles
    loaded_at: float


def load_bundle(bundle_dir: Path) -> LoadedModel:
    """Load a bundle whose model bytes match the manifest's sha256; the session is built from the very
    bytes that were hashed, so what is verified is what serves. A mismatch raises `BundleError`."""
    bundle_dir = Path(bundle_dir)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    if manifest.get("family") == LM_FAMILY:
        return load_lm_bundle(bundle_dir, manifest)
    model_bytes = (bundle_dir / manifest["model_file"]).read_bytes()
    actual = hashlib.sha256(model_bytes).hexdigest()
    if actual != manifest.get("sha256"):
        raise BundleError(f"{bundle_dir / manifest['model_file']}: sha256 {actual[:12]}... does not match the "
                          f"manifest's {str(manifest.get('sha256'))[:12]}...: the model file was changed or corrupted "
                          "after shipping; refusing to serve it")
    session = make_session(model_bytes)
    tokenizer = None
    if "tokenizer_dir" in manifest:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(bundle_dir / manifest["tokenizer_dir"]))
    shape = tuple(manifest["input_shape"]) if "input_shape" in manifest else None
    return LoadedModel(session, relative_paths(manifest, bundle_dir), shape, tokenizer,
                       time.time())


class BundleSource:
    """A bundle folder on disk; it changed when its manifest or its model file did."""

    def __init__(self, bundle_dir: Path):
        self.bundle_dir = Path(bundle_dir)

    def fingerprint(self) -> str | None:
        try:
            manifest = json.loads((self.bundle_dir / "manifest.json").read_text())
            if manifest.get("family") == LM_FAMILY:
                return lm_fingerprint(self.bundle_dir, manifest)
            model = (self.bundle_dir / manifest["model_file"]).stat()
        except (OSError, ValueError, KeyError, TypeError):
            return None  # mid-swap or not shipped yet: keep serving what is loaded
        # The file's identity and timestamps, not only the manifest: a model edited in place is noticed.
        return f"{manifest.get('sha256')}:{model.st_ino}:{model.st_size}:{model.st_mtime_ns}"

    def load(self) -> LoadedModel:
        return load_bundle(self.bundle_dir)


class RegistrySource:
    """`models:/name@alias`: the bundle logged with the run of the version the alias points at."""

    def __init__(self, uri: str):
        name, _, alias = uri.removeprefix("models:/").partition("@")
        if not name or not alias:
            raise ValueError(f"model URI {uri!r}: expected models:/<name>@<alias>")
        self.name, self.alias = name, alias

    def fingerprint(self) -> str | None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            return str(MlflowClient().get_model_version_by_alias(self.name, self.alias).version)
        except MlflowException:
            return None

    def load(self) -> LoadedModel:
        import mlflow
        from mlflow.tracking import MlflowClient

        version = MlflowClient().get_model_version_by_alias(self.name, self.alias)
        with tempfile.TemporaryDirectory() as tmp:
            bundle = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="bundle", dst_path=tmp)
            model = load_bundle(Path(bundle))  # ORT holds the model in memory; the temp copy can go
        return model


class ModelHolder:
    def __init__(self, source: BundleSource | RegistrySource):
        self.source = source
        self._lock = threading.Lock()  # one reload at a time; requests never take it
        self.fingerprint = source.fingerprint()
        if self.fingerprint is None:
            raise FileNotFoundError(f"nothing to serve at {getattr(source, 'bundle_dir', source)}")
        self.model = source.load()
        self.reloads = 0
        self.failed: tuple[str, str] | None = None  # (fingerprint, error) of a bundle that would not load

    def reload_if_changed(self) -> bool:
        """Load a changed bundle; a broken one is reported once and the current model stays in service."""
        with self._lock:
            current = self.source.fingerprint()
            if current is None or current == self.fingerprint or (self.failed and self.failed[0] == current):
                return False
            try:
                fresh = self.source.load()  # fully built before anyone can see it
            except Exception as err:
                self.failed = (current, f"{type(err).__name__}: {err}")
                print(f"[serve] reload of {current} failed, still serving the previous model: {self.failed[1]}")
                return False
            self.model, self.fingerprint, self.failed = fresh, current, None  # one reference swap
            self.reloads += 1
            print(f"[serve] reloaded model ({current})")
            return True


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw JSON body, refused before it is read when it says (or turns out) to be too large."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise BadRequest(415, f"Content-Type must be application/json, got {kind or 'none'!r}")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_bytes):
        raise BadRequest(413, f"body of {declared} bytes exceeds the limit of {max_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():  # a chunked body has no length to check up front
        body += chunk
        if len(body) > max_bytes:
            raise BadRequest(413, f"body exceeds the limit of {max_bytes} bytes")
    return bytes(body)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json(body: bytes) -> object:
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise BadRequest(400, "body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(400, f"body is not valid JSON ({err})") from None


def _numbers_problem(value: object, max_depth: int) -> str | None:
    """Why `value` is not nested lists of plain numbers at most `max_depth` deep (None when it is).
    Booleans and numeric strings are not numbers; an integer beyond float32 is out of range."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list):
            if depth >= max_depth:
                return f"inputs is nested deeper than the {max_depth} levels [batch, *input_shape]"
            stack.extend((x, depth + 1) for x in item)
        elif isinstance(item, bool) or not isinstance(item, (int, float)):
            return f"inputs must hold only numbers, found {type(item).__name__} {json.dumps(item)[:40]}"
        elif isinstance(item, int) and abs(item) > FLOAT32_MAX:
            return f"inputs holds an integer of {len(str(abs(item)))} digits, beyond the float32 range"
    return None


def parse_inputs(payload: object, sample_shape: tuple[int, ...], max_batch: int = MAX_BATCH) -> np.ndarray:
    """A float32 batch of shape (N, *sample_shape), or `BadRequest` saying what is wrong."""
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise BadRequest(400, 'body must be a JSON object with an "inputs" array')
    if problem := _numbers_problem(payload["inputs"], len(sample_shape) + 1):
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


RAW_INPUTS = {"records": ("table", "an array of objects (column -> value)"),
              "images": ("image", "an array of base64-encoded PNG/JPEG files"),
              "texts": ("text", "an array of strings")}


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


def parse_raw(payload: dict, key: str, preprocessing: object, max_batch: int = MAX_BATCH) -> np.ndarray:
    """What a user has (table records, image files, texts) encoded with the bundle's own
    preprocessing, the function training used; or `BadRequest` naming the item and what is wrong."""
    from tasks.data.image_folder import encode_images
    from tasks.data.table import encode_records
    from tasks.data.text import encode_texts

    kind, shape = RAW_INPUTS[key]
    if not (isinstance(preprocessing, dict) and preprocessing.get("kind") == kind):
        raise BadRequest(400, f'this bundle was not trained on {kind} data: "{key}" does not apply; send what its '
                         'manifest (GET /model-info) describes')
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


def parse_texts(payload: object, max_batch: int = MAX_BATCH) -> list[str]:
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


def create_app(source: BundleSource | RegistrySource, poll_seconds: float = 1.0, max_batch: int = MAX_BATCH,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    holder = ModelHolder(source)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(poll_seconds):
            holder.reload_if_changed()

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        threading.Thread(target=watch, name="bundle-watcher", daemon=True).start()
        yield
        stop.set()

    app = FastAPI(title="modelforge model server", lifespan=lifespan)
    app.state.holder = holder
    app.include_router(openai_router(lambda: holder.model))

    @app.get("/health")
    def health() -> dict:
        m = holder.model
        return {"status": "ok", "model_sha256": m.manifest.get("sha256"), "candidate": m.manifest.get("candidate"),
                "loaded_at": m.loaded_at, "reloads": holder.reloads,
                "last_reload_error": holder.failed[1] if holder.failed else None}

    @app.get("/model-info")
    def model_info() -> dict:
        return holder.model.manifest

    @app.post("/reload")
    def reload() -> dict:
        reloaded = holder.reload_if_changed()
        return {"reloaded": reloaded, "model_sha256": holder.model.manifest.get("sha256"),
                "last_reload_error": holder.failed[1] if holder.failed else None}

    def predict(body: bytes) -> dict:
        model = holder.model  # one consistent (session, manifest) pair for this request
        if model.sample_shape is None:
            raise BadRequest(400, "this bundle is a sentence encoder: POST /embed {\"texts\": [...]}")
        payload = parse_json(body)
        if isinstance(payload, dict) and (raw := next((k for k in RAW_INPUTS if k in payload), None)):
            x = parse_raw(payload, raw, model.manifest.get("preprocessing"), max_batch)
        else:
            x = parse_inputs(payload, model.sample_shape, max_batch)
        logits = model.session.run(None, feeds(model.session, x))[0]
        shifted = np.exp(logits - logits.max(1, keepdims=True))
        probabilities = shifted / shifted.sum(1, keepdims=True)
        names = model.manifest.get("labels") or list(range(logits.shape[1]))
        return {"predictions": logits.argmax(1).tolist(), "labels": [names[i] for i in logits.argmax(1)],
                "probabilities": [{str(n): round(float(p), 6) for n, p in zip(names, row)} for row in probabilities],
                "logits": logits.tolist(), "model_sha256": model.manifest["sha256"]}

    def embed(body: bytes) -> dict:
        model = holder.model
        if model.tokenizer is None:
            raise BadRequest(400, "this bundle is a classifier: POST /predict {\"inputs\": [...]}")
        texts = parse_texts(parse_json(body), max_batch)
        from tasks.embed_minilm import tokenize

        feeds = tokenize(model.tokenizer, texts, model.manifest["max_length"])
        return {"embeddings": model.session.run(None, feeds)[0].tolist(), "model_sha256": model.manifest["sha256"]}

    async def answer(request: Request, handler) -> dict | JSONResponse:
        """Read the body within its limit, then parse, check and run it on a worker thread: a large
        or slow request never blocks the event loop that serves everyone else."""
        if holder.model.manifest.get("family") == LM_FAMILY:
            return _error(400, "this bundle is a causal LM: POST /v1/completions or /v1/chat/completions")
        try:
            body = await read_body(request, max_body_bytes)
            return await run_in_threadpool(handler, body)
        except BadRequest as err:
            return _error(err.status, str(err))

    @app.post("/predict")
    async def predict_route(request: Request):
        return await answer(request, predict)

    @app.post("/embed")
    async def embed_route(request: Request):
        return await answer(request, embed)

    return app


def serve(bundle: str | None, model_uri: str | None, host: str, port: int, max_body_bytes: int = MAX_BODY_BYTES) -> None:
    """Raises (the CLI exits non-zero) when there is nothing to serve or the model fails its sha256 check."""
    import uvicorn

    source = RegistrySource(model_uri) if model_uri else BundleSource(Path(bundle))
    uvicorn.run(create_app(source, max_body_bytes=max_body_bytes), host=host, port=port, log_level="warning")
