"""HTTP model server on ONNX Runtime for a modelforge bundle (model.onnx + manifest.json).

    modelforge serve --bundle deploy/champion [--host 127.0.0.1 --port 8000]
    modelforge serve --model-uri models:/digits-classifier@champion

Endpoints: POST /predict {"inputs": [...]} (classifier bundles), POST /embed {"texts": [...]}
(sentence-encoder bundles, tokenised with the tokenizer shipped in the bundle), GET /health,
GET /model-info, POST /reload. Input is checked against the manifest (shape, numeric, finite,
batch limit; strings for texts) and rejected with a 4xx naming the problem. A watcher reloads the model when the bundle (or the registry alias)
changes; the new session is built completely before one reference swap, so requests in flight
finish on the old model and none are dropped.
"""

from __future__ import annotations

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

from tasks.run_onnx import make_session

MAX_BATCH = 1024


@dataclass(frozen=True)
class LoadedModel:
    session: object
    manifest: dict
    input_name: str
    sample_shape: tuple[int, ...] | None  # classifier bundles
    tokenizer: object | None  # sentence-encoder bundles
    loaded_at: float


def load_bundle(bundle_dir: Path) -> LoadedModel:
    manifest = json.loads((Path(bundle_dir) / "manifest.json").read_text())
    session = make_session(Path(bundle_dir) / manifest["model_file"])
    tokenizer = None
    if "tokenizer_dir" in manifest:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(Path(bundle_dir) / manifest["tokenizer_dir"]))
    shape = tuple(manifest["input_shape"]) if "input_shape" in manifest else None
    return LoadedModel(session, manifest, session.get_inputs()[0].name, shape, tokenizer, time.time())


class BundleSource:
    """A bundle folder on disk; its identity is the manifest's sha256."""

    def __init__(self, bundle_dir: Path):
        self.bundle_dir = Path(bundle_dir)

    def fingerprint(self) -> str | None:
        try:
            return json.loads((self.bundle_dir / "manifest.json").read_text())["sha256"]
        except (OSError, ValueError, KeyError):
            return None  # mid-swap or not shipped yet: keep serving what is loaded

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


async def _json_body(request: Request) -> object | JSONResponse:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        return _error(400, "body is not valid JSON")


def parse_inputs(payload: object, sample_shape: tuple[int, ...], max_batch: int = MAX_BATCH) -> np.ndarray | JSONResponse:
    """A float32 batch of shape (N, *sample_shape), or the 4xx response that says what is wrong."""
    if not isinstance(payload, dict) or "inputs" not in payload:
        return _error(400, 'body must be a JSON object with an "inputs" array')
    try:
        x = np.asarray(payload["inputs"], dtype=np.float32)
    except (ValueError, TypeError):
        return _error(400, "inputs must be a rectangular array of numbers")
    if x.shape == sample_shape:
        x = x[None]
    expected = ["batch", *sample_shape]
    if x.ndim != len(sample_shape) + 1 or x.shape[1:] != sample_shape:
        return _error(400, f"inputs has shape {list(x.shape)}, expected {expected}")
    if x.shape[0] == 0:
        return _error(400, "inputs is an empty batch")
    if x.shape[0] > max_batch:
        return _error(413, f"batch of {x.shape[0]} exceeds the limit of {max_batch}")
    if not np.isfinite(x).all():
        return _error(400, "inputs contains NaN or infinity")
    return x


def parse_texts(payload: object, max_batch: int = MAX_BATCH) -> list[str] | JSONResponse:
    """A list of non-empty strings, or the 4xx response that says what is wrong."""
    if not isinstance(payload, dict) or "texts" not in payload:
        return _error(400, 'body must be a JSON object with a "texts" array')
    texts = payload["texts"]
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts:
        return _error(400, "texts must be a non-empty array of strings")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if bad:
        return _error(400, f"texts[{bad[0]}] is not a non-empty string ({len(bad)} such item(s))")
    if len(texts) > max_batch:
        return _error(413, f"batch of {len(texts)} exceeds the limit of {max_batch}")
    return texts


def create_app(source: BundleSource | RegistrySource, poll_seconds: float = 1.0, max_batch: int = MAX_BATCH) -> FastAPI:
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

    @app.get("/health")
    def health() -> dict:
        m = holder.model
        return {"status": "ok", "model_sha256": m.manifest["sha256"], "candidate": m.manifest.get("candidate"),
                "loaded_at": m.loaded_at, "reloads": holder.reloads,
                "last_reload_error": holder.failed[1] if holder.failed else None}

    @app.get("/model-info")
    def model_info() -> dict:
        return holder.model.manifest

    @app.post("/reload")
    def reload() -> dict:
        reloaded = holder.reload_if_changed()
        return {"reloaded": reloaded, "model_sha256": holder.model.manifest["sha256"],
                "last_reload_error": holder.failed[1] if holder.failed else None}

    @app.post("/predict")
    async def predict(request: Request):
        payload = await _json_body(request)
        if isinstance(payload, JSONResponse):
            return payload
        model = holder.model  # one consistent (session, manifest) pair for this request
        if model.sample_shape is None:
            return _error(400, "this bundle is a sentence encoder: POST /embed {\"texts\": [...]}")
        x = parse_inputs(payload, model.sample_shape, max_batch)
        if isinstance(x, JSONResponse):
            return x
        logits = model.session.run(None, {model.input_name: x})[0]
        return {"predictions": logits.argmax(1).tolist(), "logits": logits.tolist(),
                "model_sha256": model.manifest["sha256"]}

    @app.post("/embed")
    async def embed(request: Request):
        payload = await _json_body(request)
        if isinstance(payload, JSONResponse):
            return payload
        model = holder.model
        if model.tokenizer is None:
            return _error(400, "this bundle is a classifier: POST /predict {\"inputs\": [...]}")
        texts = parse_texts(payload, max_batch)
        if isinstance(texts, JSONResponse):
            return texts
        from tasks.embed_minilm import tokenize

        feeds = tokenize(model.tokenizer, texts, model.manifest["max_length"])
        embeddings = model.session.run(None, feeds)[0]
        return {"embeddings": embeddings.tolist(), "model_sha256": model.manifest["sha256"]}

    return app


def serve(bundle: str | None, model_uri: str | None, host: str, port: int) -> None:
    import uvicorn

    source = RegistrySource(model_uri) if model_uri else BundleSource(Path(bundle))
    uvicorn.run(create_app(source), host=host, port=port, log_level="warning")
