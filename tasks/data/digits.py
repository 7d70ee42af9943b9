"""The built-in image example: scikit-learn's bundled 8x8 digits, written as .npy splits."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from tasks.core.settings import Section
from tasks.data.base import (
    MANIFEST,
    SPLITS,
    DataError,
    Splits,
    check_arrays,
    raise_problems,
    read_manifest,
    unknown_files,
    write_manifest,
)


class DataConfig(Section):
    dataset: Literal["digits"] = Field("digits", description="Built-in data set written to `dir` when it is absent.")
    dir: Path = Field(Path("data"), description="DVC-tracked data folder (relative to the project root).")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of samples held out for validation.")
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="Share of samples held out for the final test.")
    split_seed: int = Field(0, description="Seed of the stratified train/val/test split.")
    dvc_remote: str = Field(
        ".modelforge/dvc-remote",
        description="DVC remote the data is pushed to: a folder "
        "(relative to the project, or a path every worker mounts) or a URL (s3://bucket/path).",
    )


def materialize_digits(cfg: DataConfig, data_dir: Path) -> None:
    """Write scikit-learn's bundled digits as .npy splits plus a manifest.

    Plain .npy (no zip timestamps) keeps the bytes, and so the DVC md5, identical on every machine.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]  # (N, 1, 8, 8) in [0, 1]
    y = digits.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=cfg.test_fraction, stratify=y, random_state=cfg.split_seed
    )
    val_share = cfg.val_fraction / (1 - cfg.test_fraction)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_share, stratify=y_rest, random_state=cfg.split_seed
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    arrays = {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}
    for split, (xs, ys) in arrays.items():
        np.save(data_dir / f"{split}_x.npy", np.ascontiguousarray(xs))
        np.save(data_dir / f"{split}_y.npy", ys)
    write_manifest(
        data_dir,
        {
            "dataset": "digits",
            "source": "sklearn.datasets.load_digits",
            "num_classes": 10,
            "input_shape": [1, 8, 8],
            "dtype": "float32",
            "preprocessing": "pixel / 16.0 (raw digits are 0..16), layout NCHW",
            "split_seed": cfg.split_seed,
            "counts": {s: len(arrays[s][1]) for s in SPLITS},
        },
    )


def load_arrays(data_dir: Path, manifest: dict) -> Splits:
    """The .npy splits, validated against the manifest; one DataError names every problem."""
    try:
        num_classes = int(manifest["num_classes"])
        input_shape = tuple(manifest["input_shape"])
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{Path(data_dir) / MANIFEST}: incomplete manifest ({err})") from None
    # Later stages need it (the serving bundle states the preprocessing): fail now, not after registering.
    problems = (
        []
        if "preprocessing" in manifest
        else [
            f"{MANIFEST}: missing 'preprocessing' (what a caller must do to raw inputs; shipped in the serving bundle)"
        ]
    )
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in SPLITS:
        try:
            xs = np.load(Path(data_dir) / f"{split}_x.npy", allow_pickle=False)
            ys = np.load(Path(data_dir) / f"{split}_y.npy", allow_pickle=False)
        except (OSError, ValueError) as err:
            problems.append(f"{split}: cannot load arrays ({err})")
            continue
        problems += check_arrays(split, xs, ys, input_shape, num_classes)
        arrays[split] = (xs.astype(np.float32, copy=False), ys.astype(np.int64, copy=False))
    raise_problems(data_dir, problems)
    return Splits(arrays["train"], arrays["val"], arrays["test"], num_classes, manifest)


def describe_digits(cfg: DataConfig, data_dir: Path) -> tuple[dict, dict]:
    raise_problems(data_dir, unknown_files(data_dir, {MANIFEST, *(f"{s}_{part}.npy" for s in SPLITS for part in "xy")}))
    splits = load_arrays(data_dir, read_manifest(data_dir))
    return splits.manifest, {s: len(getattr(splits, s)[1]) for s in SPLITS}
