"""The built-in text example: English sentences from the docstrings of Python's standard library,
disjoint train (distillation) and eval (fidelity, retrieval) files."""

from __future__ import annotations

import ast
import random
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from tasks.core.settings import Section
from tasks.data.base import (
    MANIFEST,
    DataError,
    raise_problems,
    read_manifest,
    unknown_files,
    write_manifest,
)


class TextDataConfig(Section):
    dataset: Literal["docstrings"] = Field(
        "docstrings",
        description="English sentences from the Python standard library's docstrings (read offline with ast).",
    )
    dir: Path = Field(Path("corpus"), description="DVC-tracked corpus folder (relative to the project root).")
    train_sentences: int = Field(4000, ge=8, description="Sentences for distillation (never used for evaluation).")
    eval_sentences: int = Field(600, ge=12, description="Held-out sentences for fidelity and retrieval checks.")
    queries: int = Field(100, ge=1, description="Held-out sentences used as retrieval queries against the rest.")
    seed: int = Field(0, description="Seed of the sentence shuffle before the split.")
    dvc_remote: str = Field(
        ".modelforge/dvc-remote", description="DVC remote the corpus is pushed to (a folder or a URL)."
    )

    @model_validator(mode="after")
    def _queries_fit(self) -> TextDataConfig:
        if self.queries > self.eval_sentences - 10:
            raise ValueError(
                f"queries ({self.queries}) must leave at least 10 of the {self.eval_sentences} "
                "eval_sentences to search (top-10 retrieval)"
            )
        return self


@dataclass(frozen=True)
class Sentences:
    train: list[str]  # distillation only
    eval: list[str]  # held out: fidelity and retrieval
    queries: int  # the first `queries` eval sentences search the rest
    manifest: dict


def docstring_sentences(file: Path) -> set[str]:
    """English sentences (6-40 words, mostly words) from the docstrings of one Python file, read with
    `ast` (nothing is imported); an unparsable file has none."""
    try:
        tree = ast.parse(Path(file).read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return set()
    sentences = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node) or ""
            for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                words = s.split()
                if 6 <= len(words) <= 40 and sum(w.isalpha() for w in words) >= 0.7 * len(words):
                    sentences.add(s)
    return sentences


def offline_corpus(n: int, seed: int = 0) -> list[str]:
    """`n` distinct English sentences from the docstrings of Python's standard library (its top-level
    modules); the same Python gives the same corpus."""
    sentences: set[str] = set()
    for file in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        sentences |= docstring_sentences(file)
    ordered = sorted(sentences)
    random.Random(seed).shuffle(ordered)
    if len(ordered) < n:
        raise ValueError(f"offline corpus has {len(ordered)} sentences, {n} requested")
    return ordered[:n]


def _corpus_settings(cfg: TextDataConfig) -> dict:
    """The config settings a corpus is built from; its manifest records them."""
    return {
        "queries": cfg.queries,
        "seed": cfg.seed,
        "counts": {"train": cfg.train_sentences, "eval": cfg.eval_sentences},
    }


def materialize_docstrings(cfg: TextDataConfig, data_dir: Path) -> None:
    """Write disjoint train/eval sentence files (one per line) from the offline docstring corpus."""
    corpus = offline_corpus(cfg.eval_sentences + cfg.train_sentences, seed=cfg.seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "eval.txt").write_text("\n".join(corpus[: cfg.eval_sentences]) + "\n")
    (data_dir / "train.txt").write_text("\n".join(corpus[cfg.eval_sentences :]) + "\n")
    write_manifest(
        data_dir,
        {
            "dataset": "docstrings",
            "source": f"docstrings of the Python {sys.version.split()[0]} standard library",
            **_corpus_settings(cfg),
        },
    )


def load_sentences(data_dir: Path) -> Sentences:
    """Load and validate the corpus; raise one DataError naming every problem found."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    try:
        queries = int(manifest["queries"])
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{data_dir / MANIFEST}: incomplete manifest ({err})") from None
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
            problems.append(
                f"{overlap} sentence(s) are in both train.txt and eval.txt: the evaluation would not be held out"
            )
        if len(texts["eval"]) < queries + 10:
            problems.append(f"eval.txt: {len(texts['eval'])} sentences, need queries ({queries}) + 10 to search")
    if problems:
        raise DataError(f"invalid corpus in {data_dir}:\n" + "\n".join(f"  - {p}" for p in problems))
    return Sentences(texts["train"], texts["eval"], queries, manifest)


def describe_docstrings(cfg: TextDataConfig, data_dir: Path) -> tuple[dict, dict]:
    raise_problems(data_dir, unknown_files(data_dir, {MANIFEST, "train.txt", "eval.txt"}))
    sentences = load_sentences(data_dir)
    asked = _corpus_settings(cfg)
    if differ := {k: (sentences.manifest.get(k), v) for k, v in asked.items() if sentences.manifest.get(k) != v}:
        raise DataError(
            f"{data_dir} was built with other settings than the config asks for: "
            + ", ".join(f"{k}: {have} vs {want}" for k, (have, want) in differ.items())
            + f"; delete {data_dir} to rebuild it (the old version stays in the DVC remote)"
        )
    return sentences.manifest, {"train": len(sentences.train), "eval": len(sentences.eval)}
