"""A data version as a worker on any machine gets it: by its DVC md5, from the DVC remote.

A search worker on another machine cannot read the driver's data folder. It receives a `DataRef`
(md5 + remote) and materialises that exact version into its own cache, reading the remote's
content-addressed layout (`files/md5/<2 hex>/<30 hex>`, the `.dir` object listing every file's md5
and path) and checking every file's md5 on the way in, so a worker never trains on other bytes than
the version the run recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import fsspec
from filelock import FileLock

from tasks.data import DataError
from tasks.data.version import DataVersion
from tasks.search.runner import RunnerConfig


@dataclass(frozen=True)
class DataRef:
    md5: str  # the DVC `.dir` md5 (with its `.dir` suffix), the data-version key
    remote: str  # the DVC remote holding it: a folder every worker mounts, or a URL (s3://...)
    cache: str = "~/.cache/modelforge/data"  # where on the worker's machine fetched versions are kept
    local_dir: str | None = None  # the driver's own folder: used only by workers in the driver's process


def _object(remote: str, md5: str) -> str:
    return f"{remote.rstrip('/')}/files/md5/{md5[:2]}/{md5[2:]}"


def _md5_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def fetch_data(ref: DataRef) -> Path:
    """The local folder holding the version `ref.md5`: fetched from the remote into the worker's cache
    once (concurrent workers on one machine wait for the first), then reused."""
    cache = Path(os.path.expanduser(ref.cache))
    target = cache / ref.md5.removesuffix(".dir")
    if (target / ".complete").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / ".complete").exists():
            return target
        try:
            with fsspec.open(_object(ref.remote, ref.md5), "rb") as f:
                entries = json.loads(f.read())
        except (OSError, ValueError) as err:
            raise DataError(
                f"data version {ref.md5} is not in the DVC remote {ref.remote} ({err}); every worker "
                "must reach the remote the run pushed to (a shared folder or a URL)"
            ) from None
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache))
        try:
            for entry in entries:
                relpath = Path(entry["relpath"])
                if relpath.is_absolute() or ".." in relpath.parts:
                    raise DataError(f"data version {ref.md5}: unsafe path {relpath} in its .dir object")
                dest = staging / relpath
                dest.parent.mkdir(parents=True, exist_ok=True)
                with fsspec.open(_object(ref.remote, entry["md5"]), "rb") as src, open(dest, "wb") as out:
                    shutil.copyfileobj(src, out)
                if (got := _md5_of(dest)) != entry["md5"]:
                    raise DataError(
                        f"data version {ref.md5}: {relpath} in the remote has md5 {got}, "
                        f"expected {entry['md5']} (a corrupt remote)"
                    )
            (staging / ".complete").write_text(ref.md5 + "\n")
            shutil.rmtree(target, ignore_errors=True)  # a fetch that died half-way
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_data(data: Path | DataRef) -> Path:
    """A folder this process can read: a plain path as is, a `DataRef` from the driver's own folder
    when there is one here, else fetched from the remote."""
    if isinstance(data, DataRef):
        return Path(data.local_dir) if data.local_dir else fetch_data(data)
    return Path(data)


def worker_data(data: DataVersion, runner: RunnerConfig) -> DataRef:
    """How search workers get `data`: threads of this process read its folder; workers of a cluster,
    even a LocalCluster on this machine, fetch it by md5 from the remote as they would anywhere."""
    local = str(data.dir) if runner.kind == "local" else None
    return DataRef(data.md5, data.remote, runner.data_cache, local)
