"""A user's image folder: one sub-folder per class of PNG/JPEG files, grayscale or RGB, any sizes.

Versioning validates every image (an unreadable one is a DataError naming the file), records the
classes, the split of each file (by a hash of its bytes: an appended image moves no other, and a
copy always shares its original's split) and the normalisation fitted on the train split. Loading
and serving both go through `encode_images`, so a served image is prepared exactly as the training
ones were.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np

from tasks.config import ImageFolderConfig
from tasks.data.base import (MANIFEST, SPLIT_RULE, SPLITS, DataError, Splits, check_arrays, hash_split,
                             previous_manifest, raise_problems, split_problems, unseen_classes, write_manifest)

SUFFIXES = {".png", ".jpg", ".jpeg"}


def _files(data_dir: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """(class, file) for every image, and the problems with the folder's layout."""
    files, problems = [], []
    for entry in sorted(Path(data_dir).iterdir()):
        if entry.name == MANIFEST:
            continue
        if not entry.is_dir():
            problems.append(f"{entry.name}: a file at the top level; images belong in one sub-folder per class")
            continue
        images = sorted(p for p in entry.rglob("*") if p.is_file())
        if stray := [p for p in images if p.suffix.lower() not in SUFFIXES]:
            problems.append(f"{entry.name}/: {len(stray)} file(s) that are not PNG/JPEG: "
                            + ", ".join(str(p.relative_to(data_dir)) for p in stray[:5]))
        files += [(entry.name, p) for p in images if p.suffix.lower() in SUFFIXES]
    return files, problems


def _pixels(data: bytes, size: tuple[int, int], channels: int) -> np.ndarray:
    """Decoded, converted (L or RGB) and resized image as float32 [C, H, W] in [0, 1]."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("L" if channels == 1 else "RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def encode_images(preprocessing: dict, images: list[bytes]) -> np.ndarray:
    """Raw PNG/JPEG bytes to the model's input, with the recorded size, colour and normalisation.
    Undecodable bytes are a ValueError naming their position."""
    size, channels = tuple(preprocessing["size"]), preprocessing["channels"]
    mean = np.array(preprocessing["mean"], dtype=np.float32)[:, None, None]
    std = np.array(preprocessing["std"], dtype=np.float32)[:, None, None]
    out, problems = np.zeros((len(images), channels, *size), dtype=np.float32), []
    for i, data in enumerate(images):
        try:
            out[i] = (_pixels(data, size, channels) - mean) / std
        except Exception as err:  # PIL raises many types for bad bytes
            problems.append(f"image {i}: not a readable PNG/JPEG ({type(err).__name__}: {err})")
    if problems:
        raise ValueError("; ".join(problems[:20]))
    return out


def describe_image_folder(cfg: ImageFolderConfig, data_dir: Path) -> tuple[dict, dict]:
    """Validate every image (all problems at once) and write the manifest: classes, split rule and
    counts, size, colour and the per-channel normalisation fitted on train."""
    data_dir = Path(data_dir)
    files, problems = _files(data_dir)
    classes = sorted({c for c, _ in files})
    if len(classes) < 2:
        problems.append(f"{len(classes)} class folder(s) with images; a classifier needs at least 2")
    channels = 1 if cfg.color == "gray" else 3
    size = tuple(cfg.image_size)
    contents, pixels, unreadable = [], [], []
    for _, path in files:
        data = path.read_bytes()
        try:
            pixels.append(_pixels(data, size, channels))  # decoded once: validation and train statistics
        except Exception as err:  # PIL raises many types for bad files
            unreadable.append(f"{path.relative_to(data_dir)} ({type(err).__name__})")
        contents.append(data)
    if unreadable:
        problems.append(f"{len(unreadable)} unreadable image(s): " + ", ".join(unreadable[:10]))
    digests = [hashlib.sha256(d).hexdigest() for d in contents]
    labels_of: dict[str, set[str]] = {}
    for (label, _), digest in zip(files, digests):
        labels_of.setdefault(digest, set()).add(label)
    if conflicts := [sorted(v) for v in labels_of.values() if len(v) > 1]:
        problems.append(f"{len(conflicts)} image(s) appear under several classes, e.g. in {', '.join(conflicts[0])}")
    split = hash_split(digests, cfg.val_fraction, cfg.test_fraction)
    counts, found = split_problems([label for label, _ in files], split, classes, cfg.min_class_samples, "images")
    problems += found + unseen_classes(previous_manifest(data_dir, "image_folder"), classes, cfg.allow_drift)
    raise_problems(data_dir, problems)

    train = np.stack([x for x, s in zip(pixels, split) if s == "train"])  # every image decoded: none unreadable
    mean, std = train.mean(axis=(0, 2, 3)), train.std(axis=(0, 2, 3))
    preprocessing = {"kind": "image", "size": list(size), "channels": channels, "color": cfg.color,
                     "mean": [float(m) for m in mean], "std": [float(max(s, 1e-6)) for s in std],
                     "resize": "bilinear", "scale": "pixel / 255, then (x - mean) / std per channel"}
    manifest = {"dataset": "image_folder", "classes": classes, "num_classes": len(classes),
                "input_shape": [channels, *size], "dtype": "float32", "preprocessing": preprocessing,
                "files": {str(path.relative_to(data_dir)): {"class": label, "sha256": digest, "split": str(s)}
                          for (label, path), digest, s in zip(files, digests, split)},
                "split": {"rule": SPLIT_RULE, "key": "sha256 of the image bytes",
                          "val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction},
                "counts": counts}
    write_manifest(data_dir, manifest)
    return manifest, counts


def load_image_folder(data_dir: Path, manifest: dict) -> Splits:
    """The versioned images, encoded with the recorded preprocessing, in their recorded splits."""
    data_dir, index = Path(data_dir), {c: i for i, c in enumerate(manifest["classes"])}
    entries = sorted(manifest["files"].items())
    contents, problems = [], []
    for name, info in entries:
        try:
            data = (data_dir / name).read_bytes()
        except OSError as err:
            problems.append(f"{name}: {err}")
            continue
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            problems.append(f"{name} changed since it was versioned")
        contents.append(data)
    if problems:
        raise DataError(f"{data_dir}: the images differ from the versioned ones ({'; '.join(problems[:5])}); "
                        "run `modelforge data-changed` (or a run) to version them")
    x = encode_images(manifest["preprocessing"], contents)
    y = np.array([index[info["class"]] for _, info in entries], dtype=np.int64)
    split = np.array([info["split"] for _, info in entries])
    arrays = {s: (x[split == s], y[split == s]) for s in SPLITS}
    raise_problems(data_dir, [p for s in SPLITS for p in check_arrays(s, *arrays[s], tuple(manifest["input_shape"]),
                                                                         manifest["num_classes"])])
    return Splits(arrays["train"], arrays["val"], arrays["test"], manifest["num_classes"], manifest)
