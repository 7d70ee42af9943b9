"""Where a served model comes from: a bundle folder on disk or a registry alias, both verified
against the manifest's sha256 before a session is built from the very bytes that were hashed.

A causal-LM bundle (the LM contract: "family": "causal_lm", "model_dir", "files") has many files: each is
hashed while it is copied into a private folder, and the generation runtime (`serve.lm`) is built from
that copy, so what serves is exactly what was verified and nothing in the bundle can change under it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from serve.lm import ENGINE_STATIC_BATCH, LM_FAMILY, LMRuntime, open_lm
from tasks.onnx.runtime import make_session
from tasks.release.guard import BUNDLE_FORMAT, BundleError, relative_paths


def bundle_family(manifest: dict) -> str:
    """The kind of bundle, which decides the protocols it is served with: a manifest may name its
    family; older ones are a sentence encoder when they ship a tokenizer, a classifier otherwise."""
    return manifest.get("family") or ("encoder" if "tokenizer_dir" in manifest else "classifier")


@dataclass(frozen=True)
class LoadOptions:
    """How a verified model is made ready to serve."""

    intra_op_threads: int = 0  # ONNX Runtime threads per call (0: its default)
    lm_max_batch: int = ENGINE_STATIC_BATCH  # causal LMs: sequences decoded together
    lm_max_waiting: int = 32  # causal LMs: requests waiting beyond a full batch


@dataclass(frozen=True)
class LoadedModel:
    session: ort.InferenceSession | LMRuntime  # a causal LM's is its LMRuntime
    manifest: dict
    family: str
    sample_shape: tuple[int, ...] | None  # classifier bundles
    tokenizer: object | None  # sentence-encoder bundles
    loaded_at: float
    verified_files: dict[str, str] = field(default_factory=dict)  # causal LMs: {bundle path: sha256} as hashed

    @property
    def sha256(self) -> str | None:
        """The single model file's sha256 (None for a causal LM, whose files are verified one by one)."""
        return self.manifest.get("sha256")

    def identity(self) -> dict:
        """What identifies the verified model in /health and /reload."""
        if self.family == LM_FAMILY:
            return {"model_sha256": None, "files_verified": len(self.verified_files)}
        return {"model_sha256": self.sha256}


def _lm_files(bundle_dir: Path, manifest: dict) -> tuple[Path, dict[str, str], list[str]]:
    """The model folder, the manifest's {path under it: sha256}, and every problem with them."""
    problems = []
    if manifest.get("format") != BUNDLE_FORMAT:
        problems.append(f'manifest "format" is {manifest.get("format")!r}, not {BUNDLE_FORMAT!r}')
    if not isinstance(manifest.get("max_length"), int):
        problems.append('manifest "max_length" (the context the model was built for) is missing')
    model_dir, files = manifest.get("model_dir"), manifest.get("files")
    if (
        not isinstance(model_dir, str)
        or not model_dir
        or Path(model_dir).is_absolute()
        or ".." in Path(model_dir).parts
    ):
        return bundle_dir, {}, [*problems, f'manifest "model_dir" {model_dir!r} is not a folder name inside the bundle']
    if not isinstance(files, dict) or not files:
        return bundle_dir, {}, [*problems, 'manifest "files" must map every model file to its sha256']
    root, listed = bundle_dir / model_dir, {}
    for name, digest in files.items():
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or rel.parts[:1] != (model_dir,) or not isinstance(digest, str):
            problems.append(f'manifest "files" entry {name!r} is not a file under {model_dir}/ with a sha256')
        else:
            listed[str(rel.relative_to(model_dir))] = digest
    present = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.is_dir() else set()
    problems += [f"{model_dir}/{name} is missing" for name in sorted(set(listed) - present)]
    problems += [
        f"{model_dir}/{name} is not in the manifest (unverified files are never loaded)"
        for name in sorted(present - set(listed))
    ]
    return root, listed, problems


def _verified_copy(bundle_dir: Path, manifest: dict, dest: Path) -> dict[str, str]:
    """Copy the model folder into `dest`, hashing the very bytes written; `BundleError` lists every problem."""
    root, listed, problems = _lm_files(bundle_dir, manifest)
    verified = {}
    for name, expected in sorted(listed.items()):
        source, target = root / name, dest / name
        if not source.is_file():
            continue  # reported as missing
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with open(source, "rb") as src, open(target, "wb") as out:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != expected:
            problems.append(
                f"{root.name}/{name}: sha256 {digest.hexdigest()[:12]}... does not match the manifest's "
                f"{expected[:12]}..."
            )
        verified[f"{root.name}/{name}"] = expected
    if problems:
        raise BundleError(f"{bundle_dir}: refusing to serve this causal-LM bundle: " + "; ".join(problems))
    return verified


def _load_lm(bundle_dir: Path, manifest: dict, options: LoadOptions) -> LoadedModel:
    private = Path(tempfile.mkdtemp(prefix="modelforge-lm-"))
    try:
        verified = _verified_copy(bundle_dir, manifest, private)
        runtime = open_lm(private, manifest, options.lm_max_batch, options.lm_max_waiting)
    finally:
        shutil.rmtree(private, ignore_errors=True)  # the model and tokenizer are in memory now
    return LoadedModel(
        runtime, relative_paths(manifest, bundle_dir), LM_FAMILY, None, None, runtime.loaded_at, verified
    )


def load_bundle(bundle_dir: Path, options: LoadOptions = LoadOptions()) -> LoadedModel:
    """Load a bundle whose model bytes match the manifest's sha256s; a mismatch raises `BundleError`."""
    bundle_dir = Path(bundle_dir)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    if bundle_family(manifest) == LM_FAMILY:
        return _load_lm(bundle_dir, manifest, options)
    model_bytes = (bundle_dir / manifest["model_file"]).read_bytes()
    actual = hashlib.sha256(model_bytes).hexdigest()
    if actual != manifest.get("sha256"):
        raise BundleError(
            f"{bundle_dir / manifest['model_file']}: sha256 {actual[:12]}... does not match the "
            f"manifest's {str(manifest.get('sha256'))[:12]}...: the model file was changed or corrupted "
            "after shipping; refusing to serve it"
        )
    session = make_session(model_bytes, intra_op_threads=options.intra_op_threads, spin=False)
    tokenizer = None
    if "tokenizer_dir" in manifest:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(bundle_dir / manifest["tokenizer_dir"]))
    shape = tuple(manifest["input_shape"]) if "input_shape" in manifest else None
    return LoadedModel(
        session, relative_paths(manifest, bundle_dir), bundle_family(manifest), shape, tokenizer, time.time()
    )


class BundleSource:
    """A bundle folder on disk; it changed when its manifest or its model file(s) did."""

    def __init__(self, bundle_dir: Path):
        self.bundle_dir = Path(bundle_dir)

    def __str__(self) -> str:
        return str(self.bundle_dir)

    def fingerprint(self) -> str | None:
        try:
            manifest = json.loads((self.bundle_dir / "manifest.json").read_text())
            if bundle_family(manifest) == LM_FAMILY:
                root = self.bundle_dir / manifest["model_dir"]
                stats = sorted(
                    (str(p.relative_to(root)), s.st_ino, s.st_size, s.st_mtime_ns)
                    for p in root.rglob("*")
                    if p.is_file()
                    for s in [p.stat()]
                )
                return hashlib.sha256(json.dumps([manifest, stats], sort_keys=True).encode()).hexdigest()
            model = (self.bundle_dir / manifest["model_file"]).stat()
        except (OSError, ValueError, KeyError, TypeError):
            return None  # mid-swap or not shipped yet: keep serving what is loaded
        # The file's identity and timestamps, not only the manifest: a model edited in place is noticed.
        return f"{manifest.get('sha256')}:{model.st_ino}:{model.st_size}:{model.st_mtime_ns}"

    def load(self, options: LoadOptions = LoadOptions()) -> LoadedModel:
        return load_bundle(self.bundle_dir, options)


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

    def load(self, options: LoadOptions = LoadOptions()) -> LoadedModel:
        import mlflow
        from mlflow.tracking import MlflowClient

        version = MlflowClient().get_model_version_by_alias(self.name, self.alias)
        with tempfile.TemporaryDirectory() as tmp:
            bundle = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="bundle", dst_path=tmp)
            return load_bundle(Path(bundle), options)  # the model is in memory (or a private copy): this one can go
