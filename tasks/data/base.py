"""What every data source shares: split names, the manifest, the one error type, the arrays the
classifier stages consume, and the content-hash split rule."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"


class DataError(ValueError):
    """The data folder is missing files or holds invalid values; the message lists every problem."""


def raise_problems(where: object, problems: list[str]) -> None:
    """One DataError naming every problem, or nothing when there are none."""
    if problems:
        raise DataError(f"invalid data in {where}:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class Splits:
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    num_classes: int
    manifest: dict


def read_manifest(data_dir: Path) -> dict:
    try:
        return json.loads((Path(data_dir) / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{Path(data_dir) / MANIFEST}: unreadable manifest ({err})") from None


def write_manifest(data_dir: Path, manifest: dict) -> None:
    # Sorted keys and a fixed layout: the same data must give the same bytes, so the same DVC md5.
    (Path(data_dir) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def hash_split(keys: list[str], val_fraction: float, test_fraction: float) -> np.ndarray:
    """The split of each sample, from a hash of its key alone: a sample keeps its split whatever is
    added around it, so appending data never moves an old test sample into train (champion and
    challenger stay comparable), and identical samples always share a split (no leakage)."""
    u = np.array([int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "big") / 2.0**64 for k in keys])
    return np.where(u < test_fraction, "test", np.where(u < test_fraction + val_fraction, "val", "train"))


SPLIT_RULE = "sha256(key) / 2**64: < test_fraction -> test, < test_fraction + val_fraction -> val, else train"


def split_problems(
    labels: list[str], split: np.ndarray, classes: list[str], min_class_samples: int, unit: str
) -> tuple[dict[str, int], list[str]]:
    """The split counts, and the problems with them: an empty split, a class with fewer than
    `min_class_samples` train samples (`unit`: rows, images)."""
    counts = {s: int((split == s).sum()) for s in SPLITS}
    problems = [
        f"{s} split is empty ({len(labels)} {unit}; add more or change the fractions)" for s in SPLITS if counts[s] == 0
    ]
    train = Counter(label for label, s in zip(labels, split, strict=True) if s == "train")
    if few := {c: train[c] for c in classes if train[c] < min_class_samples}:
        problems.append(
            f"classes with fewer than {min_class_samples} train {unit} (data.min_class_samples): "
            + ", ".join(f"{c} ({n})" for c, n in few.items())
        )
    return counts, problems


def previous_manifest(data_dir: Path, dataset: str) -> dict:
    """The manifest this folder's previous version was written with, if it came from `dataset`."""
    path = Path(data_dir) / MANIFEST
    previous = read_manifest(data_dir) if path.exists() else {}
    return previous if previous.get("dataset") == dataset else {}


def unseen_classes(previous: dict, classes: list[str], allow_drift: bool) -> list[str]:
    """Classes the previous version did not have, as a drift problem (none when drift is allowed)."""
    unseen = sorted(set(classes) - set(previous.get("classes", classes)))
    if allow_drift or not unseen:
        return []
    return [
        f"label(s) not in the previous version: {', '.join(unseen)}; set data.allow_drift: true if the change "
        "is intended"
    ]


def file_digest(path: Path) -> str:
    """What a versioned file must still hash to when a stage loads it."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def unknown_files(data_dir: Path, known: set[str]) -> list[str]:
    """A file the source does not read would change the DVC version (and trigger a full new run)
    without any effect on training: the problem naming such files, to refuse them with the rest."""
    if unknown := sorted(p.name for p in Path(data_dir).iterdir() if p.name not in known):
        return [
            f"{data_dir} holds {len(unknown)} file(s) this data set does not read: {', '.join(unknown[:10])}"
            f"; it reads only {', '.join(sorted(known))}. Move the others out (new samples belong in those files)"
        ]
    return []


def folder_problems(data_dir: Path) -> list[str]:
    """What DVC cannot version as the user wrote it, for every source: a name that is not UTF-8
    (`dvc add` dies on it without naming it) and a symbolic link (DVC replaces it with a copy of its
    target, changing the user's folder; one leaving the folder also trains on a file outside it)."""
    root, problems = Path(data_dir), []
    for folder, dirs, files in os.walk(root):  # links to folders are listed, not followed
        for path in (Path(folder) / name for name in sorted(dirs + files)):
            rel = path.relative_to(root)
            try:
                str(rel).encode()
            except UnicodeEncodeError:
                problems.append(
                    f"{os.fsencode(rel)!r}: a file name that is not UTF-8 (DVC cannot version it); rename it"
                )
                continue
            if path.is_symlink():
                target = os.readlink(path)
                leaves = not path.resolve().is_relative_to(root.resolve())
                problems.append(
                    f"{rel}: a symbolic link {'leaving the data folder ' if leaves else ''}(to {target}); "
                    "DVC would replace it with a copy of its target, changing your folder: put the file "
                    "itself there"
                )
    return problems


def split_arrays(where: object, x: np.ndarray, y: np.ndarray, split: np.ndarray, manifest: dict) -> Splits:
    """Samples `x`, labels `y` and each one's split name as `Splits`, every split checked against the manifest
    (one DataError naming `where` and every problem)."""
    arrays = {s: (x[split == s], y[split == s]) for s in SPLITS}
    shape, classes = tuple(manifest["input_shape"]), manifest["num_classes"]
    raise_problems(where, [p for s in SPLITS for p in check_arrays(s, *arrays[s], shape, classes)])
    return Splits(arrays["train"], arrays["val"], arrays["test"], classes, manifest)


def check_arrays(split: str, xs: np.ndarray, ys: np.ndarray, input_shape: tuple, num_classes: int) -> list[str]:
    """Problems with one split's arrays, as the classifier stages need them."""
    problems = []
    if xs.shape[1:] != input_shape:
        problems.append(f"{split}_x: sample shape {xs.shape[1:]} != manifest input_shape {input_shape}")
    if ys.ndim != 1:
        problems.append(
            f"{split}_y: labels have shape {list(ys.shape)}; they must be one class index per sample, shape [{len(ys)}]"
        )
    if len(xs) != len(ys):
        problems.append(f"{split}: {len(xs)} samples but {len(ys)} labels")
    if len(ys) == 0:
        problems.append(f"{split}: empty split")
    if not np.issubdtype(xs.dtype, np.floating):
        problems.append(f"{split}_x: dtype {xs.dtype}, expected floating point")
    elif not np.isfinite(xs).all():
        problems.append(f"{split}_x: {int((~np.isfinite(xs)).sum())} NaN/inf values")
    if not np.issubdtype(ys.dtype, np.integer):
        problems.append(f"{split}_y: dtype {ys.dtype}, expected integer labels")
    elif len(ys) and (ys.min() < 0 or ys.max() >= num_classes):
        problems.append(f"{split}_y: labels outside [0, {num_classes}) (min {ys.min()}, max {ys.max()})")
    return problems
