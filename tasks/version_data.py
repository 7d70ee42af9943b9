"""Materialize, validate and version the data set with DVC.

The DVC `.dir` md5 of the data folder is the one data-version key: MLflow tags, Prefect cache keys
and the serving manifest all carry it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from prefect import task

from tasks.config import DataConfig, TextDataConfig

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
REQUIRED_MANIFEST = {"preprocessing": "what a caller must do to raw inputs; shipped in the serving bundle"}


class DataError(ValueError):
    """The data folder is missing files or holds invalid values; the message lists every problem."""


@dataclass(frozen=True)
class DataVersion:
    md5: str  # DVC .dir md5 of the data folder
    dir: Path
    manifest: dict  # the folder's manifest.json
    remote: str  # the DVC remote holding this version (a folder or a URL)

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def input_shape(self) -> tuple[int, ...]:  # per sample, without the batch axis
        return tuple(self.manifest["input_shape"])


@dataclass(frozen=True)
class Splits:
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    num_classes: int
    manifest: dict


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
    manifest = {
        "dataset": "digits",
        "source": "sklearn.datasets.load_digits",
        "num_classes": 10,
        "input_shape": [1, 8, 8],
        "dtype": "float32",
        "preprocessing": "pixel / 16.0 (raw digits are 0..16), layout NCHW",
        "split_seed": cfg.split_seed,
        "counts": {s: int(len(arrays[s][1])) for s in SPLITS},
    }
    (data_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def load_splits(data_dir: Path) -> Splits:
    """Load and validate every split; raise one DataError naming every problem found."""
    data_dir = Path(data_dir)
    problems: list[str] = []
    try:
        manifest = json.loads((data_dir / MANIFEST).read_text())
        num_classes = int(manifest["num_classes"])
        input_shape = tuple(manifest["input_shape"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{data_dir / MANIFEST}: unreadable or incomplete manifest ({err})") from None
    # Later stages need these (the serving bundle states the preprocessing): fail now, not after registering.
    problems += [f"{MANIFEST}: missing {key!r} ({why})" for key, why in REQUIRED_MANIFEST.items() if key not in manifest]

    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in SPLITS:
        try:
            xs = np.load(data_dir / f"{split}_x.npy", allow_pickle=False)
            ys = np.load(data_dir / f"{split}_y.npy", allow_pickle=False)
        except (OSError, ValueError) as err:
            problems.append(f"{split}: cannot load arrays ({err})")
            continue
        if xs.shape[1:] != input_shape:
            problems.append(f"{split}_x: sample shape {xs.shape[1:]} != manifest input_shape {input_shape}")
        if ys.ndim != 1:
            problems.append(f"{split}_y: labels have shape {list(ys.shape)}; they must be one class index per "
                            f"sample, shape [{len(ys)}]")
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
        arrays[split] = (xs.astype(np.float32, copy=False), ys.astype(np.int64, copy=False))
    if problems:
        raise DataError(f"invalid data in {data_dir}:\n" + "\n".join(f"  - {p}" for p in problems))
    return Splits(arrays["train"], arrays["val"], arrays["test"], num_classes, manifest)


@dataclass(frozen=True)
class Sentences:
    train: list[str]  # distillation only
    eval: list[str]  # held out: fidelity and retrieval
    queries: int  # the first `queries` eval sentences search the rest
    manifest: dict


def _corpus_settings(cfg: TextDataConfig) -> dict:
    """The config settings a corpus is built from; its manifest records them."""
    return {"queries": cfg.queries, "seed": cfg.seed,
            "counts": {"train": cfg.train_sentences, "eval": cfg.eval_sentences}}


def materialize_docstrings(cfg: TextDataConfig, data_dir: Path) -> None:
    """Write disjoint train/eval sentence files (one per line) from the offline docstring corpus."""
    from tasks.embed_minilm import offline_corpus

    corpus = offline_corpus(cfg.eval_sentences + cfg.train_sentences, seed=cfg.seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "eval.txt").write_text("\n".join(corpus[: cfg.eval_sentences]) + "\n")
    (data_dir / "train.txt").write_text("\n".join(corpus[cfg.eval_sentences :]) + "\n")
    manifest = {"dataset": "docstrings", "source": f"docstrings of the Python {sys.version.split()[0]} standard library",
                **_corpus_settings(cfg)}
    (data_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def load_sentences(data_dir: Path) -> Sentences:
    """Load and validate the corpus; raise one DataError naming every problem found."""
    data_dir = Path(data_dir)
    try:
        manifest = json.loads((data_dir / MANIFEST).read_text())
        queries = int(manifest["queries"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{data_dir / MANIFEST}: unreadable or incomplete manifest ({err})") from None
    problems, texts = [], {}
    for split in ("train", "eval"):
        try:
            lines = (data_dir / f"{split}.txt").read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            problems.append(f"{split}.txt: unreadable ({err})")
            continue
        if blank := sum(not line.strip() for line in lines):
            problems.append(f"{split}.txt: {blank} blank line(s)")
        texts[split] = lines
    if len(texts) == 2:
        if overlap := len(set(texts["train"]) & set(texts["eval"])):
            problems.append(f"{overlap} sentence(s) are in both train.txt and eval.txt: the evaluation would not be held out")
        if len(texts["eval"]) < queries + 10:
            problems.append(f"eval.txt: {len(texts['eval'])} sentences, need queries ({queries}) + 10 to search")
    if problems:
        raise DataError(f"invalid corpus in {data_dir}:\n" + "\n".join(f"  - {p}" for p in problems))
    return Sentences(texts["train"], texts["eval"], queries, manifest)


def _only_known_files(data_dir: Path, known: set[str]) -> None:
    """A file the source does not read would change the DVC version (and trigger a full new run)
    without any effect on training: refuse it, by name."""
    if unknown := sorted(p.name for p in Path(data_dir).iterdir() if p.name not in known):
        raise DataError(f"{data_dir} holds {len(unknown)} file(s) this data set does not read: {', '.join(unknown[:10])}"
                        f"; it reads only {', '.join(sorted(known))}. Move the others out (new samples belong "
                        "in those files)")


def _describe_digits(cfg: DataConfig, data_dir: Path) -> tuple[dict, dict]:
    _only_known_files(data_dir, {MANIFEST, *(f"{s}_{part}.npy" for s in SPLITS for part in "xy")})
    splits = load_splits(data_dir)
    return splits.manifest, {s: len(getattr(splits, s)[1]) for s in SPLITS}


def _describe_sentences(cfg: TextDataConfig, data_dir: Path) -> tuple[dict, dict]:
    _only_known_files(data_dir, {MANIFEST, "train.txt", "eval.txt"})
    sentences = load_sentences(data_dir)
    asked = _corpus_settings(cfg)
    if differ := {k: (sentences.manifest.get(k), v) for k, v in asked.items() if sentences.manifest.get(k) != v}:
        raise DataError(f"{data_dir} was built with other settings than the config asks for: "
                        + ", ".join(f"{k}: {have} vs {want}" for k, (have, want) in differ.items())
                        + f"; delete {data_dir} to rebuild it (the old version stays in the DVC remote)")
    return sentences.manifest, {"train": len(sentences.train), "eval": len(sentences.eval)}


# dataset -> (write it from its built-in source; validate it, against the config too, and return
# (manifest, split counts))
DATASETS = {"digits": (materialize_digits, _describe_digits),
            "docstrings": (materialize_docstrings, _describe_sentences)}


def _dvc(root: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"`dvc {' '.join(args)}` failed in {root}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def read_data_md5(dvc_file: Path) -> str:
    outs = yaml.safe_load(dvc_file.read_text())["outs"]
    return outs[0]["md5"]


def version_data(cfg: DataConfig | TextDataConfig, root: Path) -> DataVersion:
    """Ensure `cfg.dir` holds valid data tracked by DVC and pushed to the local remote.

    Missing data is pulled from the remote when `data.dvc` names a version there, otherwise written
    from the built-in data set. Validation runs before `dvc add`, so bad data is never versioned.
    """
    root = Path(root).resolve()
    data_dir = root / cfg.dir
    dvc_file = data_dir.with_name(data_dir.name + ".dvc")
    remote = cfg.dvc_remote if "://" in cfg.dvc_remote else str((root / cfg.dvc_remote).resolve())
    if not (root / ".dvc").is_dir():
        _dvc(root, "init", *(() if (root / ".git").exists() else ("--no-scm",)))
    _dvc(root, "config", "--local", "core.analytics", "false")
    # --local keeps the machine-specific absolute path out of the committed .dvc/config.
    _dvc(root, "remote", "add", "--local", "--default", "--force", "modelforge", remote)
    if not data_dir.exists() and dvc_file.exists():
        try:
            _dvc(root, "pull", str(dvc_file))
        except RuntimeError as err:
            print(f"[version_data] data not in the remote, rebuilding it ({str(err).splitlines()[0]})")
    materialize, describe = DATASETS[cfg.dataset]
    if not data_dir.exists():
        materialize(cfg, data_dir)
    manifest, counts = describe(cfg, data_dir)
    _dvc(root, "add", str(data_dir.relative_to(root)))
    if "://" not in remote:
        Path(remote).mkdir(parents=True, exist_ok=True)
    _dvc(root, "push", str(dvc_file))
    md5 = read_data_md5(dvc_file)
    print(f"[version_data] {data_dir.relative_to(root)} version {md5} {counts}")
    return DataVersion(md5, data_dir, manifest, remote)


version_data_task = task(version_data, name="version_data")
