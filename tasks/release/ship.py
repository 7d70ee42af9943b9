"""Write the serving bundle: model.onnx + manifest.json, swapped in atomically.

The bundle is assembled in a sibling temp folder and renamed into place, so a failure at any point
leaves the previous bundle (or none) and never a half-written one.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from prefect import task

from tasks.onnx.runtime import make_session
from tasks.release.evaluate import Evaluator, data_task
from tasks.release.guard import (
    BUNDLE_FORMAT,
    PARTIAL,
    check_replaceable,
    relative_paths,
    sha256_of,
)


def io_spec(path: Path) -> dict:
    session = make_session(path)
    spec = lambda args: [
        {"name": a.name, "shape": [d if isinstance(d, int) else str(d) for d in a.shape], "dtype": a.type} for a in args
    ]
    return {"inputs": spec(session.get_inputs()), "outputs": spec(session.get_outputs())}


def staging_folder(target: Path, kind: str = "") -> Path:
    """A fresh, unique, marked sibling folder of `target`: nothing that already exists is ever reused."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-{kind}", dir=target.parent))
    (tmp / PARTIAL).touch()
    return tmp


def swap_in(ready: Path, target: Path) -> None:
    """Replace `target` by the fully written folder `ready` (same parent) with two renames, so a
    reader sees the old bundle or the new one, never a mix. Only a folder that is provably a bundle
    modelforge wrote is ever moved aside and deleted; anything else raises `BundleError`."""
    check_replaceable(target)
    if not target.exists():
        (ready / PARTIAL).unlink()
        ready.rename(target)
        return
    old = staging_folder(target, "old-")
    target.rename(old / target.name)
    (ready / PARTIAL).unlink()
    ready.rename(target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged(target: Path) -> Iterator[Path]:
    """A marked staging folder beside `target` to fill inside the block; swapped in for `target` when
    the block ends, deleted when it raises (a stop included), so a half-written bundle is never served."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_folder(target)
    try:
        yield tmp
        swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")


def publish_copy(source: Path, target: Path) -> Path:
    """Atomically make `target` a copy of the bundle folder `source`."""
    with staged(target) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    return target


def ship_bundle(onnx_path: Path, bundle_dir: Path, evaluator: Evaluator, data_version: str, details: dict) -> Path:
    """`details`: candidate name, metrics, registry info, run id — copied into the manifest. The
    evaluator says what serving must know (preprocessing, labels) and adds what it needs (a tokenizer)."""
    bundle_dir = Path(bundle_dir)
    with staged(bundle_dir) as tmp:
        model = tmp / "model.onnx"
        shutil.copyfile(onnx_path, model)
        manifest = {
            "format": BUNDLE_FORMAT,
            "model_file": model.name,
            "sha256": sha256_of(model),
            "size_bytes": model.stat().st_size,
            **io_spec(model),
            **evaluator.serving_info(),
            "task": data_task(evaluator.data_dir),
            "data_version": data_version,
            "created_at": datetime.now(UTC).isoformat(),
            **relative_paths(details, bundle_dir),
        }
        evaluator.attach(tmp)
        write_manifest(tmp, manifest)
    print(f"[ship] bundle {bundle_dir} (model sha256 {manifest['sha256'][:12]}...)")
    return bundle_dir


ship_bundle_task = task(name="ship_bundle")(ship_bundle)
