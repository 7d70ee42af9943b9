"""A user's table: CSV, Parquet or JSONL with a label column; numeric, categorical and missing values.

The raw file stays as the user wrote it, under the DVC-tracked data folder. Versioning writes the
manifest beside it: the schema, the class names, the split rule and counts, and the preprocessing
fitted on the train split only (standardisation; in a column with gaps in train, a missing indicator
and each gap filled from the row's other numbers, see `impute`; one-hot categories with an "unknown"
bucket). Loading recomputes the same splits and applies that recorded preprocessing; the server
applies the very same function (`encode_records`) to the records it is sent, so training and serving
cannot drift apart.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

if TYPE_CHECKING:
    import pandas as pd

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
from tasks.data.impute import fill_gaps, fit_gap_regressions


class TableDataConfig(Section):
    """A user's table (CSV, Parquet or JSONL) in `dir`: one row per sample, one label column."""

    dataset: Literal["table"]
    dir: Path = Field(
        Path("data"), description="DVC-tracked folder holding the table file (relative to the project root)."
    )
    file: str | None = Field(
        None, description="The table's file name in `dir`; default: the one .csv/.parquet/.jsonl there."
    )
    label: str = Field(..., min_length=1, description="The column holding each row's class.")
    id_column: str | None = Field(None, description="A unique id per row to split by; default: the row's content.")
    categorical: list[str] = Field(
        [], description="Numeric-looking columns to treat as categories (text columns always are)."
    )
    drop: list[str] = Field([], description="Columns to ignore (free text, timestamps, leaks of the label).")
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of rows held out for validation (by hash).")
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="Share of rows held out for the final test (by hash).")
    min_class_samples: int = Field(5, ge=1, description="Fewest train rows a class may have.")
    allow_drift: bool = Field(
        False,
        description="Accept a new/missing column, a changed type or a new label "
        "against the previously versioned data (an error by default).",
    )
    dvc_remote: str = Field(
        ".modelforge/dvc-remote", description="DVC remote the data is pushed to (a folder or a URL)."
    )


READERS = {".csv": "csv", ".parquet": "parquet", ".jsonl": "jsonl"}
FLOAT32_MAX = float(np.finfo(np.float32).max)
UNKNOWN = "<unknown>"  # the bucket for categories unseen in train, and for missing categories


def find_table(file: str | None, data_dir: Path) -> Path:
    """The table file: `file` (a data section's `file`), or the one CSV/Parquet/JSONL file in the folder."""
    if file:
        return Path(data_dir) / file
    tables = sorted(p for p in Path(data_dir).iterdir() if p.suffix.lower() in READERS)
    if len(tables) != 1:
        raise DataError(
            f"{data_dir}: found {len(tables)} table files ({', '.join(p.name for p in tables) or 'none'}); "
            "put exactly one CSV/Parquet/JSONL file there or name it in data.file"
        )
    return tables[0]


def read_table(path: Path):
    """The file as a DataFrame; an unreadable file is a DataError naming it."""
    import pandas as pd

    kind = READERS.get(Path(path).suffix.lower())
    try:
        if kind == "csv":
            frame = pd.read_csv(path, keep_default_na=True)
            # pandas renames a repeated header name x to x.1: the notes say so
            header = [str(c) for c in pd.read_csv(path, header=None, nrows=1).iloc[0]]
            frame.attrs["renamed"] = {
                new: old for old, new in zip(header, map(str, frame.columns), strict=True) if old != new
            }
            return frame
        if kind == "parquet":
            import pyarrow.parquet as pq

            frame = pd.read_parquet(path)
            frame.attrs["types"] = {f.name: str(f.type) for f in pq.read_schema(path)}
            return frame
        if kind == "jsonl":
            return pd.read_json(path, lines=True)
    except (OSError, ValueError, ImportError) as err:
        raise DataError(f"{path}: cannot read it as {kind} ({err})") from None
    raise DataError(f"{path}: unsupported table format {Path(path).suffix!r}; use one of {sorted(READERS)}")


NESTED = (list, tuple, dict, set, np.ndarray)


def nested_columns(frame) -> dict[str, str]:
    """Columns holding lists, arrays or mappings (a Parquet list/struct column, nested JSON), with
    their type: a table here holds numbers and text categories only."""
    found = {}
    for name in frame.columns:
        if frame[name].dtype == object and (
            kinds := sorted({type(v).__name__ for v in frame[name] if isinstance(v, NESTED)})
        ):
            found[str(name)] = frame.attrs.get("types", {}).get(str(name)) or " / ".join(kinds)
    return found


def table_notes(frame, schema: dict[str, str], categorical: Sequence[str] = ()) -> list[str]:
    """What reading the table decided on its own, said to the user (init's summary, the manifest):
    renamed repeated column names, and mostly-numeric columns read as categories because of a few
    values that are not numbers."""
    import pandas as pd

    notes = [
        f"column {new!r} is a repeat of the header name {old!r} (pandas renamed it); rename one of them"
        for new, old in frame.attrs.get("renamed", {}).items()
    ]
    for name, kind in schema.items():
        values = frame[name].dropna()
        if kind != "categorical" or name in categorical or not len(values):
            continue
        junk = values[pd.to_numeric(values.astype(str), errors="coerce").isna()]
        if 0 < len(junk) <= len(values) / 2:
            shown = ", ".join(repr(v) for v in list(dict.fromkeys(map(str, junk)))[:3])
            notes.append(
                f"column {name!r} is read as categorical, yet {len(values) - len(junk)} of its {len(values)} "
                f"values are numbers: {len(junk)} are not ({shown}); fix or blank them to read it as numeric"
            )
    return notes


def _is_numeric(series) -> bool:
    import pandas as pd

    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _canonical(value) -> str | None:
    """A cell as text that does not depend on the column's inferred dtype: 3, 3.0 and "3" read the
    same, so appending a row with a missing value (which turns an int column into floats) moves no
    sample to another split and no category to the unknown bucket."""
    if _missing(value):
        return None
    if isinstance(value, NESTED):  # in a dropped column (nested columns are refused as features)
        return json.dumps(value, sort_keys=True, default=lambda v: v.tolist() if isinstance(v, np.ndarray) else str(v))
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, float, np.number)):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    return str(value)


def _row_keys(frame, id_column: str | None) -> list[str]:
    """What a row is hashed by: its id, or its whole content (so a duplicate row shares its split)."""
    if id_column:
        return [_canonical(v) or "" for v in frame[id_column]]
    return [
        json.dumps({k: _canonical(v) for k, v in r.items()}, sort_keys=True) for r in frame.to_dict(orient="records")
    ]


def infer_schema(cfg: TableDataConfig, frame) -> dict[str, str]:
    """Feature column -> "numeric" | "categorical" (label, id and dropped columns excluded)."""
    skip = {cfg.label, cfg.id_column, *cfg.drop} - {None}
    return {
        c: ("categorical" if c in cfg.categorical or not _is_numeric(frame[c]) else "numeric")
        for c in frame.columns
        if c not in skip
    }


def fit_preprocessing(schema: dict[str, str], train) -> dict:
    """Standardisation and imputation statistics and the category lists, from the train rows only."""
    columns: list[dict[str, Any]] = []
    for name, kind in schema.items():
        values = train[name]
        if kind == "numeric":
            x = values.astype(float)
            mean = float(x.mean()) if x.notna().any() else 0.0
            std = float(x.std(ddof=0)) if x.notna().sum() > 1 else 0.0
            columns.append(
                {
                    "name": name,
                    "kind": "numeric",
                    "mean": mean,
                    "std": std if std > 1e-12 else 1.0,
                    "missing_indicator": bool(x.isna().any()),
                }
            )
        else:
            seen = sorted({_present(v) for v in values.dropna()})
            columns.append({"name": name, "kind": "categorical", "categories": [*seen, UNKNOWN]})
    fit_gap_regressions(columns, train)
    return {
        "kind": "table",
        "columns": columns,
        "features": sum(map(_width, columns)),
    }


def _width(col: dict) -> int:
    """The column's features: a number (and its missing indicator), or one per category."""
    return 1 + col["missing_indicator"] if col["kind"] == "numeric" else len(col["categories"])


def _present(value) -> str:
    """`_canonical` of a cell known not to be missing (after `dropna`/`notna`, which agree with `_missing`)."""
    text = _canonical(value)
    assert text is not None
    return text


def _missing(value) -> bool:
    """None, NaN or a pandas missing marker (NA, NaT): from a JSON client or from a DataFrame cell."""
    import pandas as pd

    return value is None or (not isinstance(value, (*NESTED, str)) and bool(pd.isna(value)))


def _standardised(value: int | float | np.number, col: dict) -> float | None:
    """The value standardised with the train split's mean and std; None when it (or the result)
    lies beyond float32, which would turn into inf in the model and NaN in its answer."""
    try:
        scaled = (float(value) - col["mean"]) / col["std"]
    except OverflowError:  # an integer of hundreds of digits
        return None
    return scaled if math.isfinite(scaled) and abs(float(value)) <= FLOAT32_MAX and abs(scaled) <= FLOAT32_MAX else None


def encode_records(preprocessing: dict, records: list[dict]) -> np.ndarray:
    """Raw records (column -> value) to the model's float32 input, with the preprocessing recorded
    at versioning time. Used for training data and by the server alike. A record missing a column,
    or a numeric column holding a non-number, is a ValueError naming the record and the column."""
    out = np.zeros((len(records), preprocessing["features"]), dtype=np.float32)
    starts = np.cumsum([0, *map(_width, preprocessing["columns"])])[:-1].tolist()
    problems = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            problems.append(f"record {i}: expected an object of column -> value, got {type(record).__name__}")
            continue
        for col, j in zip(preprocessing["columns"], starts, strict=True):
            name = col["name"]
            if name not in record:
                problems.append(f"record {i}: missing column {name!r} (send null for a missing value)")
            value = record.get(name)
            if col["kind"] == "numeric":
                if _missing(value):
                    out[i, j] = 0.0  # the train mean, standardised (a column with gaps in train: see fill_gaps)
                    if col["missing_indicator"]:
                        out[i, j + 1] = 1.0
                elif isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                    problems.append(f"record {i}: column {name!r} is numeric, got {value!r}")
                elif (scaled := _standardised(value, col)) is None:
                    text = str(value) if len(str(value)) <= 24 else f"{str(value)[:12]}... ({len(str(value))} digits)"
                    problems.append(
                        f"record {i}: column {name!r} holds {text}, beyond the float32 range the model computes in"
                    )
                else:
                    out[i, j] = scaled
            else:
                categories = col["categories"]
                key = _canonical(value) or UNKNOWN
                out[i, j + (categories.index(key) if key in categories else len(categories) - 1)] = 1.0
    if problems:
        raise ValueError("; ".join(problems[:20]) + (f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""))
    fill_gaps(out, preprocessing["columns"], starts)
    return out


def _records(frame, schema: dict[str, str]) -> list[dict]:
    """DataFrame rows as plain records, None for a missing value, like a JSON client's."""
    sub = frame[list(schema)]
    return [{k: (None if _missing(v) else v) for k, v in r.items()} for r in sub.to_dict(orient="records")]


def _schema_drift(previous: dict, schema: dict[str, str], allow_drift: bool) -> list[str]:
    """Column changes against the previously versioned manifest of this folder."""
    before = previous.get("schema", {})
    if allow_drift or not before:
        return []
    drift = [f"new column {c!r} (not in the previous version)" for c in schema if c not in before]
    drift += [f"column {c!r} is gone (it was in the previous version)" for c in before if c not in schema]
    drift += [
        f"column {c!r} changed type: {before[c]} -> {schema[c]}"
        for c in schema
        if c in before and before[c] != schema[c]
    ]
    return [f"{d}; set data.allow_drift: true if the change is intended" for d in drift]


def describe_table(cfg: TableDataConfig, data_dir: Path) -> tuple[dict, dict]:
    """Validate the table (everything at once) and write its manifest: schema, classes, split rule
    and counts, preprocessing fitted on train. Compared with the folder's previous manifest, schema
    drift is an error unless `data.allow_drift` is set."""
    data_dir = Path(data_dir)
    path = find_table(cfg.file, data_dir)
    problems = unknown_files(data_dir, {MANIFEST, path.name})
    frame = read_table(path)
    missing = [c for c in (cfg.label, cfg.id_column, *cfg.categorical, *cfg.drop) if c and c not in frame.columns]
    if missing:
        raise_problems(
            path,
            [*problems, f"no column(s) {', '.join(map(repr, missing))}; it has {', '.join(map(str, frame.columns))}"],
        )
    if len(frame) == 0:
        raise DataError(f"{path}: no rows")
    if nested := {c: t for c, t in nested_columns(frame).items() if c not in cfg.drop}:
        raise DataError(
            f"{path}: column(s) holding nested values, not numbers or text: "
            + ", ".join(f"{c!r} ({t})" for c, t in nested.items())
            + "; list them in data.drop, or flatten them into one column per value"
        )
    if unlabeled := int(frame[cfg.label].isna().sum()):
        problems.append(f"label column {cfg.label!r}: {unlabeled} row(s) without a label")
    schema = infer_schema(cfg, frame)
    if not schema:
        problems.append("no feature columns besides the label")
    if cfg.id_column and (dupes := int(frame[cfg.id_column].duplicated().sum())):
        problems.append(f"id column {cfg.id_column!r}: {dupes} duplicate id(s)")
    labelled = frame[frame[cfg.label].notna()]
    classes = sorted({_present(v) for v in labelled[cfg.label]})
    if len(classes) < 2:
        problems.append(f"label column {cfg.label!r} has {len(classes)} class(es); a classifier needs at least 2")
    split = hash_split(_row_keys(labelled, cfg.id_column), cfg.val_fraction, cfg.test_fraction)
    counts, found = split_problems(
        [_present(v) for v in labelled[cfg.label]], split, classes, cfg.min_class_samples, "rows"
    )
    problems += found
    if cfg.id_column and schema:  # content duplicates with different ids can land in different splits
        content = [
            json.dumps({k: _canonical(v) for k, v in r.items()}, sort_keys=True) for r in _records(labelled, schema)
        ]
        seen: dict[str, str] = {}
        leaks = sum(1 for key, s in zip(content, split, strict=True) if seen.setdefault(key, s) != s)
        if leaks:
            problems.append(
                f"{leaks} row(s) repeat the features of a row in another split (leakage); "
                "remove the duplicates or drop data.id_column to split by content"
            )
    previous = previous_manifest(data_dir, "table")
    problems += _schema_drift(previous, schema, cfg.allow_drift) + unseen_classes(previous, classes, cfg.allow_drift)
    raise_problems(path, problems)

    preprocessing = fit_preprocessing(schema, labelled[split == "train"])
    manifest = {
        "dataset": "table",
        "file": path.name,
        "label": cfg.label,
        "id_column": cfg.id_column,
        "schema": schema,
        "classes": classes,
        "num_classes": len(classes),
        "input_shape": [preprocessing["features"]],
        "dtype": "float32",
        "preprocessing": preprocessing,
        "split": {
            "rule": SPLIT_RULE,
            "key": cfg.id_column or "row content",
            "val_fraction": cfg.val_fraction,
            "test_fraction": cfg.test_fraction,
        },
        "counts": counts,
        "content_sha256": file_digest(path),
        **({"notes": notes} if (notes := table_notes(frame, schema, cfg.categorical)) else {}),
    }
    write_manifest(data_dir, manifest)
    return manifest, counts


def read_versioned(data_dir: Path, manifest: dict):
    """The file the manifest was written for, refused if it changed since (it would be read with
    another version's splits and preprocessing)."""
    path = Path(data_dir) / manifest["file"]
    if file_digest(path) != manifest["content_sha256"]:
        raise DataError(
            f"{path} changed since it was versioned; run `modelforge data-changed` (or a run) to version it"
        )
    return read_table(path)


def split_rows(data_dir: Path, manifest: dict) -> tuple[pd.DataFrame, np.ndarray]:
    """The versioned table's labelled rows and the split of each, by the manifest's rule."""
    frame = read_versioned(data_dir, manifest)
    labelled = frame[frame[manifest["label"]].notna()]
    rule = manifest["split"]
    return labelled, hash_split(_row_keys(labelled, manifest["id_column"]), rule["val_fraction"], rule["test_fraction"])


def load_table(data_dir: Path, manifest: dict) -> Splits:
    """The splits of the versioned table, encoded with the recorded preprocessing."""
    path = Path(data_dir) / manifest["file"]
    labelled, split = split_rows(data_dir, manifest)
    x = encode_records(manifest["preprocessing"], _records(labelled, manifest["schema"]))
    index = {c: i for i, c in enumerate(manifest["classes"])}
    y = np.array([index[_canonical(v)] for v in labelled[manifest["label"]]], dtype=np.int64)
    return split_arrays(path, x, y, split, manifest)
