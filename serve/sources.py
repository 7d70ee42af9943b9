"""Where a served model comes from: a bundle folder on disk or a registry alias, both verified
against the manifest's sha256 before a session is built from the very bytes that were hashed."""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tasks.guard_bundle import BundleError, relative_paths
from tasks.run_onnx import make_session


def bundle_family(manifest: dict) -> str:
    """The kind of bundle, which decides the protocols it is served with: a manifest may name its
    family; older ones are a sentence encoder when they ship a tokenizer, a classifier otherwise."""
    return manifest.get("family") or ("encoder" if "tokenizer_dir" in manifest else "classifier")


@dataclass(frozen=True)
class LoadedModel:
    session: object
    manifest: dict
    family: str
    sample_shape: tuple[int, ...] | None  # classifier bundles
    tokenizer: object | None  # sentence-encoder bundles
    loaded_at: float

    @property
    def sha256(self) -> str:
        return self.manifest["sha256"]


def load_bundle(bundle_dir: Path, intra_op_threads: int = 0) -> LoadedModel:
    """Load a bundle whose model bytes match the manifest's sha256; a mismatch raises `BundleError`."""
    bundle_dir = Path(bundle_dir)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    model_bytes = (bundle_dir / manifest["model_file"]).read_bytes()
    actual = hashlib.sha256(model_bytes).hexdigest()
    if actual != manifest.get("sha256"):
        raise BundleError(f"{bundle_dir / manifest['model_file']}: sha256 {actual[:12]}... does not match the "
                          f"manifest's {str(manifest.get('sha256'))[:12]}...: the model file was changed or corrupted "
                          "after shipping; refusing to serve it")
    session = make_session(model_bytes, intra_op_threads=intra_op_threads, spin=False)
    tokenizer = None
    if "tokenizer_dir" in manifest:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(bundle_dir / manifest["tokenizer_dir"]))
    shape = tuple(manifest["input_shape"]) if "input_shape" in manifest else None
    return LoadedModel(session, relative_paths(manifest, bundle_dir), bundle_family(manifest), shape, tokenizer,
                       time.time())


class BundleSource:
    """A bundle folder on disk; it changed when its manifest or its model file did."""

    def __init__(self, bundle_dir: Path):
        self.bundle_dir = Path(bundle_dir)

    def __str__(self) -> str:
        return str(self.bundle_dir)

    def fingerprint(self) -> str | None:
        try:
            manifest = json.loads((self.bundle_dir / "manifest.json").read_text())
            model = (self.bundle_dir / manifest["model_file"]).stat()
        except (OSError, ValueError, KeyError, TypeError):
            return None  # mid-swap or not shipped yet: keep serving what is loaded
        # The file's identity and timestamps, not only the manifest: a model edited in place is noticed.
        return f"{manifest.get('sha256')}:{model.st_ino}:{model.st_size}:{model.st_mtime_ns}"

    def load(self, intra_op_threads: int = 0) -> LoadedModel:
        return load_bundle(self.bundle_dir, intra_op_threads)


class RegistrySource:
    """`models:/name@alias`: the bundle logged with the run of the version the alias points at."""

    def __init__(self, uri: str):
        name, _, alias = uri.removeprefix("models:/").partition("@")
        if not uri.startswith("models:/") or not name or not alias:
            raise ValueError(f"model URI {uri!r}: expected models:/<name>@<alias>")
        self.name, self.alias = name, alias

    def __str__(self) -> str:
        return f"models:/{self.name}@{self.alias}"

    def fingerprint(self) -> str | None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            return str(MlflowClient().get_model_version_by_alias(self.name, self.alias).version)
        except MlflowException:
            return None

    def load(self, intra_op_threads: int = 0) -> LoadedModel:
        import mlflow
        from mlflow.tracking import MlflowClient

        version = MlflowClient().get_model_version_by_alias(self.name, self.alias)
        with tempfile.TemporaryDirectory() as tmp:
            bundle = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="bundle", dst_path=tmp)
            return load_bundle(Path(bundle), intra_op_threads)  # ORT holds the model in memory; the copy can go
