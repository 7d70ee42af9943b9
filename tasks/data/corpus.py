"""A text corpus for a causal LM: .txt/.md files (one document each) and .jsonl files (one {"text": ...}
document, or one {"messages": [{"role", "content"}, ...]} chat, per line), split by a hash of each document
into calibration (the fine-tune's training text too), validation and test text.

Validation reads every file, so one `DataError` names every empty, undecodable or malformed document, and,
with the model's tokenizer, every split too short for one evaluation window.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from tasks.core.settings import Section
from tasks.data.base import (
    MANIFEST,
    SPLIT_RULE,
    hash_split,
    raise_problems,
    read_manifest,
    write_manifest,
)


class CorpusConfig(Section):
    """A user's text corpus for a causal LM: a folder of .txt/.md files (one document each) and/or .jsonl files
    (one {"text": ...} document per line)."""

    dataset: Literal["text_corpus"] = Field("text_corpus", description="A folder of plain-text documents.")
    dir: Path = Field(Path("corpus"), description="DVC-tracked corpus folder (relative to the project root).")
    validation_fraction: float = Field(
        0.3, gt=0, lt=0.5, description="Share of documents (by hash) for gates and candidate selection."
    )
    test_fraction: float = Field(
        0.3,
        gt=0,
        lt=0.5,
        description="Share of documents (by hash) for the reported "
        "figures and champion/challenger; the rest calibrates.",
    )
    window: int = Field(512, ge=8, le=8192, description="Tokens per perplexity window; every split must hold one.")
    max_windows: int = Field(16, ge=1, description="Most windows scored per split (bounds evaluation time).")
    # Not a setting: the run copies lm.model here, so versioning can count tokens with its tokenizer.
    model: Path | None = Field(None, exclude=True)
    dvc_remote: str = Field(
        ".modelforge/dvc-remote", description="DVC remote the corpus is pushed to (a folder or a URL)."
    )


TEXT_SUFFIXES = (".txt", ".md")
SPLITS = ("calibration", "validation", "test")


def load_tokenizer(model: Path):
    """The tokenizer of a Hugging Face folder, or the one a GGUF file carries."""
    from transformers import AutoTokenizer

    model = Path(model)
    if model.is_file():
        return AutoTokenizer.from_pretrained(str(model.parent), gguf_file=model.name)
    return AutoTokenizer.from_pretrained(str(model))


Document = str | list[dict]  # plain text, or a chat's messages


def render(tokenizer, doc: Document) -> str:
    """A document as the model reads it: a chat through the tokenizer's chat template."""
    return doc if isinstance(doc, str) else tokenizer.apply_chat_template(doc, tokenize=False)


def _chat(value: object) -> list[dict] | None:
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        return None
    return value if any(m["role"] == "assistant" for m in value) else None  # an empty list has none


def _documents(data_dir: Path) -> tuple[dict[str, Document], list[str]]:
    """Document key -> text, and the problems found reading them."""
    docs: dict[str, Document] = {}
    problems: list[str] = []
    for path in sorted(p for p in data_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
        name = str(path.relative_to(data_dir))
        if path.suffix not in (*TEXT_SUFFIXES, ".jsonl"):
            problems.append(f"{name}: not a .txt, .md or .jsonl file")
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            problems.append(f"{name}: not UTF-8 text ({err.reason} at byte {err.start})")
            continue
        if path.suffix != ".jsonl":
            if text.strip():
                docs[name] = text
            else:
                problems.append(f"{name}: empty document")
            continue
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                value = _chat(row["messages"]) if "messages" in row else row.get("text")
            except (ValueError, AttributeError, TypeError):
                value = None
            if isinstance(value, list) or (isinstance(value, str) and value.strip()):
                docs[f"{name}:{line_no}"] = value
            else:
                problems.append(
                    f'{name} line {line_no}: not an object with a non-empty "text" string or '
                    '"messages" (a list of {"role", "content"} strings with an assistant turn)'
                )
    return docs, problems


def split_documents(docs: dict[str, Document], validation_fraction: float, test_fraction: float) -> dict[str, str]:
    """Document key -> split, from a hash of the document's text (the same text always lands in the same split)."""
    keys = list(docs)
    text = [d if isinstance(d, str) else json.dumps(d, sort_keys=True) for d in (docs[k] for k in keys)]
    split = hash_split(text, validation_fraction, test_fraction)
    names = {"train": "calibration", "val": "validation", "test": "test"}
    return {k: names[str(s)] for k, s in zip(keys, split, strict=True)}


def describe_corpus(cfg, data_dir: Path) -> tuple[dict, dict]:
    data_dir = Path(data_dir)
    docs, problems = _documents(data_dir)
    if not docs and not problems:
        problems.append('no documents: put .txt/.md files or .jsonl files of {"text": ...} lines here')
    assignment = split_documents(docs, cfg.validation_fraction, cfg.test_fraction)
    tokens = {s: 0 for s in SPLITS}
    if docs and cfg.model is not None:
        tokenizer = load_tokenizer(cfg.model)
        for key, split in assignment.items():
            tokens[split] += len(tokenizer(render(tokenizer, docs[key]))["input_ids"])
        problems += [
            f"{s} split has {n} tokens, fewer than one evaluation window of {cfg.window + 1} (data.window): "
            "add documents or change the fractions"
            for s, n in tokens.items()
            if n <= cfg.window
        ]
    raise_problems(data_dir, problems)
    counts = {s: sum(v == s for v in assignment.values()) for s in SPLITS}
    manifest = {
        "dataset": "text_corpus",
        "documents": assignment,
        "counts": counts,
        "tokens": tokens,
        "split_rule": SPLIT_RULE.replace("train", "calibration").replace("val", "validation"),
        "validation_fraction": cfg.validation_fraction,
        "test_fraction": cfg.test_fraction,
    }
    write_manifest(data_dir, manifest)
    return manifest, {"documents": counts, "tokens": tokens}


def load_corpus(data_dir: Path) -> dict[str, list[Document]]:
    """Split -> documents of the versioned corpus, in the manifest's order."""
    docs, _ = _documents(Path(data_dir))
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for key, split in read_manifest(data_dir)["documents"].items():
        out[split].append(docs[key])
    return out
