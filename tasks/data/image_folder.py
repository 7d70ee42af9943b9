"""A user's image folder: one sub-folder per class of PNG/JPEG files, grayscale or RGB, any sizes.

Versioning validates every image (an unreadable one is a DataError naming the file), records the
classes, the split of each file (by a hash of its bytes: an appended image moves no other, and a
copy always shares its original's split) and the normalisation fitted on the train split. Loading
and serving both decode with `_pixels` and normalise with `_normalise`, so a served image is prepared
exactly as the training ones were. An image whose header promises more pixels than the recorded
limit is refused before it is decoded, in training and at the server (`encode_images`).
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from tasks.core.settings import Section
from tasks.data.base import (
    MANIFEST,
    SPLIT_RULE,
    DataError,
    Splits,
    hash_split,
    previous_manifest,
    raise_problems,
    split_arrays,
    split_problems,
    unseen_classes,
    write_manifest,
)


class ImageFolderConfig(Section):
    """A user's images in `dir`: one sub-folder per class of PNG/JPEG files."""

    dataset: Literal["image_folder"]
    dir: Path = Field(
        Path("data"), description="DVC-tracked folder of class sub-folders (relative to the project root)."
    )
    image_size: tuple[int, int] = Field((32, 32), description="Height and width every image is resized to.")
    color: Literal["gray", "rgb"] = Field("gray", description="Images are converted to 1 (gray) or 3 (rgb) channels.")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of images held out for validation (by hash).")
    test_fraction: float = Field(
        0.2, gt=0, lt=0.5, description="Share of images held out for the final test (by hash)."
    )
    min_class_samples: int = Field(5, ge=1, description="Fewest train images a class may have.")
    allow_drift: bool = Field(False, description="Accept a class folder the previously versioned data did not have.")
    max_image_pixels: int | None = Field(
        None,
        ge=1,
        description="Largest image (width x height, read from its header "
        "before decoding) in the folder or in a served request; default 64 x "
        "image_size's area, at least 1024 x 1024.",
    )
    max_request_pixels: int | None = Field(
        None,
        ge=1,
        description="Most pixels the images of one served request may "
        "hold together (headers summed before any is decoded); default 16 x "
        "max_image_pixels.",
    )
    dvc_remote: str = Field(
        ".modelforge/dvc-remote", description="DVC remote the data is pushed to (a folder or a URL)."
    )

    @model_validator(mode="after")
    def _size_positive(self) -> ImageFolderConfig:
        if min(self.image_size) < 4:
            raise ValueError(f"image_size {list(self.image_size)}: both sides must be at least 4 pixels")
        return self


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
            problems.append(
                f"{entry.name}/: {len(stray)} file(s) that are not PNG/JPEG: "
                + ", ".join(str(p.relative_to(data_dir)) for p in stray[:5])
            )
        files += [(entry.name, p) for p in images if p.suffix.lower() in SUFFIXES]
    return files, problems


class TooLarge(ValueError):
    """An image's header promises more pixels than the limit: refused before it is decoded."""


def pixel_limits(preprocessing: dict) -> tuple[int, int]:
    """(pixels one image may have, pixels the images of one served request may hold together), as
    recorded at versioning; derived from the image size for data versioned before the limits."""
    h, w = preprocessing["size"]
    per_image = preprocessing.get("max_pixels") or max(64 * h * w, 2**20)
    return per_image, preprocessing.get("max_request_pixels") or 16 * per_image


def _header_pixels(data: bytes, max_pixels: int) -> int:
    """The image's width x height, read from its header alone; TooLarge above `max_pixels`."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        if (pixels := image.width * image.height) > max_pixels:
            raise TooLarge(
                f"{image.width}x{image.height} = {pixels:,} pixels, over the limit of {max_pixels:,} "
                "(data.max_image_pixels)"
            )
    return pixels


def _pixels(data: bytes, size: tuple[int, int], channels: int, max_pixels: int) -> np.ndarray:
    """Decoded, converted (L or RGB) and resized image as float32 [C, H, W] in [0, 1]; an image whose
    header promises more than `max_pixels` is refused before it is decoded (a decompression bomb
    under Pillow's own limit still decodes to hundreds of MB)."""
    from PIL import Image

    _header_pixels(data, max_pixels)
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("L" if channels == 1 else "RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


# The decoded, resized pixels of the last image folder described or loaded, by (sha256, size,
# channels): every stage of a run loads the splits again, and decoding each image once per run
# (not once per stage) keeps a folder of large photos from costing its decoding time many times over.
_decoded: dict[tuple[str, tuple[int, int], int], np.ndarray] = {}


def _remember(decoded: dict) -> None:
    global _decoded
    _decoded = decoded  # one rebinding: a stage loading in another thread keeps the dict it read


def _normalise(pixels: np.ndarray, preprocessing: dict) -> np.ndarray:
    mean = np.array(preprocessing["mean"], dtype=np.float32)[:, None, None]
    std = np.array(preprocessing["std"], dtype=np.float32)[:, None, None]
    return (pixels - mean) / std


def encode_images(preprocessing: dict, images: list[bytes]) -> np.ndarray:
    """One request's raw PNG/JPEG bytes to the model's input, with the recorded size, colour and
    normalisation. Undecodable bytes and images over the pixel limits (one image, or the request's
    images together: `pixel_limits`, checked from the headers before anything is decoded) are a
    ValueError naming their position."""
    size, channels = tuple(preprocessing["size"]), preprocessing["channels"]
    per_image, per_request = pixel_limits(preprocessing)
    counted, problems = [], []
    for i, data in enumerate(images):
        try:
            counted.append(_header_pixels(data, per_image))
        except TooLarge as err:
            problems.append(f"image {i}: {err}")
        except Exception as err:  # PIL raises many types for bad bytes
            problems.append(f"image {i}: not a readable PNG/JPEG ({type(err).__name__}: {err})")
    if problems:
        raise ValueError("; ".join(problems[:20]))
    if sum(counted) > per_request:
        raise ValueError(
            f"the {len(images)} images hold {sum(counted):,} pixels together, over the limit of "
            f"{per_request:,} per request (data.max_request_pixels); send them in smaller requests"
        )
    out = np.zeros((len(images), channels, *size), dtype=np.float32)
    for i, data in enumerate(images):
        try:
            out[i] = _normalise(_pixels(data, size, channels, per_image), preprocessing)
        except Exception as err:  # a header that reads but data that does not decode
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
    size = cfg.image_size
    limits = {"max_pixels": cfg.max_image_pixels, "max_request_pixels": cfg.max_request_pixels}
    max_pixels, max_request_pixels = pixel_limits({"size": size, **limits})
    contents, pixels, unreadable, too_large = [], [], [], []
    for _, path in files:
        data = path.read_bytes()
        try:
            pixels.append(_pixels(data, size, channels, max_pixels))  # decoded once: validation and train statistics
        except TooLarge as err:
            too_large.append(f"{path.relative_to(data_dir)} ({str(err).split(',')[0]})")
        except Exception as err:  # PIL raises many types for bad files
            unreadable.append(f"{path.relative_to(data_dir)} ({type(err).__name__})")
        contents.append(data)
    if unreadable:
        problems.append(f"{len(unreadable)} unreadable image(s): " + ", ".join(unreadable[:10]))
    if too_large:
        problems.append(
            f"{len(too_large)} image(s) over the limit of {max_pixels:,} pixels (data.max_image_pixels; "
            "refused before decoding): " + ", ".join(too_large[:10])
        )
    digests = [hashlib.sha256(d).hexdigest() for d in contents]
    labels_of: dict[str, set[str]] = {}
    for (label, _), digest in zip(files, digests, strict=True):
        labels_of.setdefault(digest, set()).add(label)
    if conflicts := [sorted(v) for v in labels_of.values() if len(v) > 1]:
        problems.append(f"{len(conflicts)} image(s) appear under several classes, e.g. in {', '.join(conflicts[0])}")
    split = hash_split(digests, cfg.val_fraction, cfg.test_fraction)
    counts, found = split_problems([label for label, _ in files], split, classes, cfg.min_class_samples, "images")
    problems += found + unseen_classes(previous_manifest(data_dir, "image_folder"), classes, cfg.allow_drift)
    raise_problems(data_dir, problems)

    train = np.stack(
        [x for x, s in zip(pixels, split, strict=True) if s == "train"]
    )  # every image decoded: none unreadable
    mean, std = train.mean(axis=(0, 2, 3)), train.std(axis=(0, 2, 3))
    _remember({(digest, size, channels): x for digest, x in zip(digests, pixels, strict=True)})
    preprocessing = {
        "kind": "image",
        "size": list(size),
        "channels": channels,
        "color": cfg.color,
        "mean": [float(m) for m in mean],
        "std": [float(max(s, 1e-6)) for s in std],
        "resize": "bilinear",
        "scale": "pixel / 255, then (x - mean) / std per channel",
        "max_pixels": max_pixels,
        "max_request_pixels": max_request_pixels,
    }
    manifest = {
        "dataset": "image_folder",
        "classes": classes,
        "num_classes": len(classes),
        "input_shape": [channels, *size],
        "dtype": "float32",
        "preprocessing": preprocessing,
        "files": {
            str(path.relative_to(data_dir)): {"class": label, "sha256": digest, "split": str(s)}
            for (label, path), digest, s in zip(files, digests, split, strict=True)
        },
        "split": {
            "rule": SPLIT_RULE,
            "key": "sha256 of the image bytes",
            "val_fraction": cfg.val_fraction,
            "test_fraction": cfg.test_fraction,
        },
        "counts": counts,
    }
    write_manifest(data_dir, manifest)
    return manifest, counts


def load_image_folder(data_dir: Path, manifest: dict) -> Splits:
    """The versioned images, encoded with the recorded preprocessing, in their recorded splits."""
    data_dir, index = Path(data_dir), {c: i for i, c in enumerate(manifest["classes"])}
    entries = sorted(manifest["files"].items())
    preprocessing = manifest["preprocessing"]
    size, channels = tuple(preprocessing["size"]), preprocessing["channels"]
    decoded, problems = {}, []
    for name, info in entries:
        try:
            data = (data_dir / name).read_bytes()
        except OSError as err:
            problems.append(f"{name}: {err}")
            continue
        key = (hashlib.sha256(data).hexdigest(), size, channels)
        if key[0] != info["sha256"]:
            problems.append(f"{name} changed since it was versioned")
        elif key not in decoded:
            try:
                known = _decoded.get(key)
                decoded[key] = (
                    known if known is not None else _pixels(data, size, channels, pixel_limits(preprocessing)[0])
                )
            except Exception as err:  # PIL raises many types for bad files
                problems.append(f"{name}: {err}")
    if problems:
        raise DataError(
            f"{data_dir}: the images differ from the versioned ones ({'; '.join(problems[:5])}); "
            "run `modelforge data-changed` (or a run) to version them"
        )
    _remember(decoded)
    x = np.stack([_normalise(decoded[(info["sha256"], size, channels)], preprocessing) for _, info in entries])
    y = np.array([index[info["class"]] for _, info in entries], dtype=np.int64)
    split = np.array([info["split"] for _, info in entries])
    return split_arrays(data_dir, x, y, split, manifest)
