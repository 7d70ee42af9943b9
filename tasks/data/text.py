"""A user's labelled text: CSV or JSONL with a text column and a label column.

Versioning validates the rows, splits them by a hash of the text (an appended row moves no other,
a repeated text always shares its split) and builds the vocabulary from the train split only; the
vocabulary and the tokenisation rule are recorded in the manifest and ship in the serving bundle.
Training data and served texts both go through `encode_texts`: token ids, 0 for padding and 1 for
a word outside the vocabulary, carried as float32 (exact below 2**24) so that every classifier stage
handles them like any other input; the text model casts them back to indices.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from tasks.core.settings import Section
from tasks.data.base import (
    MANIFEST,
    SPLIT_RULE,
    DataError,
    Splits,
    file_digest,
    hash_split,
    previous_manifest,
    raise_problems,
    split_arrays,
    split_problems,
    unknown_files,
    unseen_classes,
    write_manifest,
)
from tasks.data.table import find_table, read_table, read_versioned


class TextTableConfig(Section):
    """A user's labelled text: a CSV or JSONL file in `dir` with a text column and a label column."""

    dataset: Literal["text"]
    dir: Path = Field(Path("data"), description="DVC-tracked folder holding the file (relative to the project root).")
    file: str | None = Field(None, description="The file's name in `dir`; default: the one .csv/.jsonl/.parquet there.")
    text: str = Field("text", min_length=1, description="The column holding each sample's text.")
    label: str = Field("label", min_length=1, description="The column holding each sample's class.")
    max_length: int = Field(64, ge=4, le=1024, description="Tokens kept per text (the rest is cut off).")
    tokenizer: str | None = Field(
        None,
        description="None: words, with a vocabulary built on train (the text family). "
        "'minilm' or a Hugging Face folder: that checkpoint's tokenizer (for model.pretrained).",
    )
    vocab_size: int = Field(5000, ge=10, description="Most frequent train words kept; the others read as 'unknown'.")
    min_count: int = Field(2, ge=1, description="A word enters the vocabulary only if train holds it this often.")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of rows held out for validation (by hash).")
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="Share of rows held out for the final test (by hash).")
    min_class_samples: int = Field(5, ge=1, description="Fewest train rows a class may have.")
    allow_drift: bool = Field(False, description="Accept a label the previously versioned data did not have.")
    dvc_remote: str = Field(
        ".modelforge/dvc-remote", description="DVC remote the data is pushed to (a folder or a URL)."
    )


PATTERN = r"[^\W_]+"  # runs of letters and digits, lowercased
PAD, UNKNOWN = 0, 1


def tokens(text: str) -> list[str]:
    return re.findall(PATTERN, text.lower())


@functools.lru_cache(maxsize=4)
def _tokenizer(tokenizer_json: str, max_length: int, pad_id: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.enable_truncation(max_length)
    tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=tok.id_to_token(pad_id) or "[PAD]")
    return tok


def pretrained_tokenizer(name: str, max_length: int) -> dict:
    """The preprocessing of a Hugging Face checkpoint's tokenizer: its whole `tokenizer.json`, so the
    manifest and the serving bundle need nothing else to tokenize exactly as training did."""
    from tasks.models.hf import pad_token_id, resolve_pretrained

    text = (resolve_pretrained(name, tokenizer=True) / "tokenizer.json").read_text()
    pad = pad_token_id(text)
    return {
        "kind": "text",
        "tokenizer": name,
        "tokenizer_json": text,
        "max_length": max_length,
        "vocab_size": _tokenizer(text, max_length, pad).get_vocab_size(),
        "pad_id": pad,
    }


def encode_texts(preprocessing: dict, texts: list[str]) -> np.ndarray:
    """Texts to [N, max_length] token ids with the recorded vocabulary or pretrained tokenizer
    (truncated, padded). A non-string is a ValueError naming its position."""
    length = preprocessing["max_length"]
    if bad := [i for i, t in enumerate(texts) if not isinstance(t, str)]:
        raise ValueError(f"text {bad[0]} is not a string ({len(bad)} such item(s))")
    if "tokenizer_json" in preprocessing:
        tok = _tokenizer(preprocessing["tokenizer_json"], length, preprocessing["pad_id"])
        return np.array([e.ids for e in tok.encode_batch(texts)], dtype=np.float32).reshape(len(texts), length)
    index = {w: i + 2 for i, w in enumerate(preprocessing["vocab"])}
    out = np.zeros((len(texts), length), dtype=np.float32)
    for i, text in enumerate(texts):
        ids = [index.get(w, UNKNOWN) for w in tokens(text)[:length]]
        out[i, : len(ids)] = ids
    return out


def _labelled(cfg_text: str, cfg_label: str, frame):
    keep = frame[cfg_label].notna() & frame[cfg_text].notna()
    return frame[keep]


def describe_text(cfg: TextTableConfig, data_dir: Path) -> tuple[dict, dict]:
    """Validate the rows (everything at once), build the vocabulary on train and write the manifest."""
    data_dir = Path(data_dir)
    path = find_table(cfg.file, data_dir)
    problems = unknown_files(data_dir, {MANIFEST, path.name})
    frame = read_table(path)
    if missing := [c for c in (cfg.text, cfg.label) if c not in frame.columns]:
        raise_problems(
            path,
            [*problems, f"no column(s) {', '.join(map(repr, missing))}; it has {', '.join(map(str, frame.columns))}"],
        )
    for column in (cfg.text, cfg.label):
        if n := int(frame[column].isna().sum()):
            problems.append(f"column {column!r}: {n} empty value(s)")
    rows = _labelled(cfg.text, cfg.label, frame)
    texts, labels = rows[cfg.text].astype(str).tolist(), rows[cfg.label].astype(str).tolist()
    if blank := sum(not tokens(t) for t in texts):
        problems.append(f"{blank} text(s) without a single word")
    seen: dict[str, str] = {}
    if conflicts := sum(1 for t, y in zip(texts, labels, strict=True) if seen.setdefault(t, y) != y):
        problems.append(f"{conflicts} text(s) appear with different labels")
    classes = sorted(set(labels))
    if len(classes) < 2:
        problems.append(f"label column {cfg.label!r} has {len(classes)} class(es); a classifier needs at least 2")
    split = hash_split(texts, cfg.val_fraction, cfg.test_fraction)
    counts, found = split_problems(labels, split, classes, cfg.min_class_samples, "rows")
    problems += found + unseen_classes(previous_manifest(data_dir, "text"), classes, cfg.allow_drift)
    raise_problems(path, problems)

    if cfg.tokenizer:
        try:
            preprocessing = pretrained_tokenizer(cfg.tokenizer, cfg.max_length)
        except (OSError, ValueError) as err:
            raise DataError(f"data.tokenizer {cfg.tokenizer}: {err}") from None
    else:
        counted = Counter(w for t, s in zip(texts, split, strict=True) if s == "train" for w in tokens(t))
        vocab = [w for w, n in sorted(counted.items(), key=lambda kv: (-kv[1], kv[0])) if n >= cfg.min_count][
            : cfg.vocab_size
        ]
        preprocessing = {
            "kind": "text",
            "pattern": PATTERN,
            "lowercase": True,
            "max_length": cfg.max_length,
            "vocab": vocab,
            "vocab_size": len(vocab) + 2,
            "ids": "0 padding, 1 unknown word, 2.. vocab",
        }
    manifest = {
        "dataset": "text",
        "file": path.name,
        "text": cfg.text,
        "label": cfg.label,
        "classes": classes,
        "num_classes": len(classes),
        "input_shape": [cfg.max_length],
        "dtype": "float32",
        "preprocessing": preprocessing,
        "split": {
            "rule": SPLIT_RULE,
            "key": "the text",
            "val_fraction": cfg.val_fraction,
            "test_fraction": cfg.test_fraction,
        },
        "counts": counts,
        "content_sha256": file_digest(path),
    }
    write_manifest(data_dir, manifest)
    return manifest, counts


def split_texts(data_dir: Path, manifest: dict) -> tuple[list[str], list[str], np.ndarray]:
    """The versioned rows' texts, labels and the split of each, by the manifest's rule."""
    rows = _labelled(manifest["text"], manifest["label"], read_versioned(data_dir, manifest))
    texts, labels = rows[manifest["text"]].astype(str).tolist(), rows[manifest["label"]].astype(str).tolist()
    rule = manifest["split"]
    return texts, labels, hash_split(texts, rule["val_fraction"], rule["test_fraction"])


def load_text(data_dir: Path, manifest: dict) -> Splits:
    """The splits of the versioned texts as token ids, with the recorded vocabulary."""
    path = Path(data_dir) / manifest["file"]
    texts, labels, split = split_texts(data_dir, manifest)
    x = encode_texts(manifest["preprocessing"], texts)
    index = {c: i for i, c in enumerate(manifest["classes"])}
    y = np.array([index[v] for v in labels], dtype=np.int64)
    return split_arrays(path, x, y, split, manifest)
