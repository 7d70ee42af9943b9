"""Proof of ownership before a bundle folder is replaced.

Shipping, promotion and rollback swap a whole folder, which means moving the old one aside and
deleting it. That is only safe for a folder modelforge wrote itself: a manifest that carries the
bundle format marker (or, for bundles written before the marker existed, a sha256 that matches its
model file) and nothing in the folder but what the manifest names. Anything else is refused with
a `BundleError` and left untouched.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import overload

BUNDLE_FORMAT = "modelforge-bundle/1"
MANIFEST = "manifest.json"

# Marks a temporary folder of a ship in progress: a SIGKILL leaves it behind, and the next run (under
# the work-dir lock, so with no ship in flight) removes exactly the folders that carry it.
PARTIAL = ".modelforge-partial"


class BundleError(ValueError):
    """A bundle folder is not what it claims to be: not written by modelforge, or not intact."""


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@overload
def relative_paths(value: dict, base: Path) -> dict: ...
@overload
def relative_paths(value: object, base: Path) -> object: ...
def relative_paths(value: object, base: Path) -> object:
    """`value` with every absolute path string made relative to `base` (or cut to its file name when
    it lies elsewhere): a manifest travels to other machines and must not show this one's layout."""
    if isinstance(value, dict):
        return {k: relative_paths(v, base) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [relative_paths(v, base) for v in value]
    if isinstance(value, (str, Path)) and Path(value).is_absolute():
        path = Path(value)
        return str(path.relative_to(base)) if path.is_relative_to(base) else path.name
    return value


def bundle_entries(manifest: dict) -> set[str]:
    """The names a bundle folder may hold: the manifest, the model and what the manifest points to."""
    return {MANIFEST, str(manifest.get("model_file", "model.onnx"))} | {
        str(manifest[key]) for key in ("tokenizer_dir", "model_dir") if key in manifest
    }


def bundle_problem(folder: Path) -> str | None:
    """Why `folder` may not be replaced, or None when it is absent or provably a modelforge bundle."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return None
    if folder.is_symlink() or not folder.is_dir():
        return f"{folder} exists and is not a folder modelforge wrote (a file or a link)"
    refuse = f"{folder} exists and is not a bundle modelforge wrote"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as err:
        return f"{refuse} (no readable {MANIFEST}: {type(err).__name__})"
    if manifest.get("format") != BUNDLE_FORMAT:
        model = folder / str(manifest.get("model_file", "model.onnx"))
        if not (model.is_file() and manifest.get("sha256") == sha256_of(model)):
            return f"{refuse} (its manifest has no '{BUNDLE_FORMAT}' marker and no sha256 of its model)"
    if extra := sorted(p.name for p in folder.iterdir() if p.name not in bundle_entries(manifest)):
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        return f"{folder} is a bundle but also holds files modelforge did not write ({shown})"
    return None


def check_replaceable(folder: Path) -> None:
    if problem := bundle_problem(folder):
        raise BundleError(
            f"{problem}: refusing to replace it; point the bundle setting at another folder or move this one away"
        )


def clean_leftovers(*targets: Path) -> list[str]:
    """Remove the temporary folders an interrupted ship left beside `targets`: only those carrying
    the PARTIAL marker. A bundle moved aside by a ship killed before its second rename goes back in
    place. Call it holding the work-dir lock. Returns the names removed."""
    removed = []
    for target in map(Path, targets):
        for tmp in sorted(target.parent.glob(f".{glob.escape(target.name)}-*")) if target.parent.is_dir() else []:
            if tmp.is_symlink() or not (tmp / PARTIAL).is_file():
                continue
            moved = tmp / target.name
            if tmp.name.startswith(f".{target.name}-old-") and moved.is_dir() and not os.path.lexists(target):
                moved.rename(target)
            shutil.rmtree(tmp)
            removed.append(tmp.name)
    if removed:
        print(f"[ship] removed {len(removed)} temporary folder(s) an interrupted ship left: {', '.join(removed)}")
    return removed
