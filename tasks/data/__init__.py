"""Data sources behind one registry.

A source is one module here plus one config class in tasks.config (selected by `data.dataset`): it
validates the folder and writes its manifest (`describe`), loads the classifier splits from it
(`load`), and may write a built-in example when the folder is absent (`materialize`). Every stage
after versioning reads data through `load_splits(data_dir)`, which finds the source in the manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import Discriminator, Tag

from tasks.data.base import MANIFEST, DataError, Splits, read_manifest
from tasks.data.corpus import describe_corpus
from tasks.data.digits import (
    DataConfig,
    describe_digits,
    load_arrays,
    materialize_digits,
)
from tasks.data.docstrings import describe_docstrings, materialize_docstrings
from tasks.data.image_folder import (
    ImageFolderConfig,
    describe_image_folder,
    load_image_folder,
)
from tasks.data.table import TableDataConfig, describe_table, load_table
from tasks.data.text import TextTableConfig, describe_text, load_text


def _dataset_of(value: object) -> str | None:
    # A data section that names no dataset is the built-in example, as before sources existed.
    return value.get("dataset", "digits") if isinstance(value, dict) else getattr(value, "dataset", None)


ClassifierData = Annotated[
    Annotated[DataConfig, Tag("digits")]
    | Annotated[TableDataConfig, Tag("table")]
    | Annotated[ImageFolderConfig, Tag("image_folder")]
    | Annotated[TextTableConfig, Tag("text")],
    Discriminator(_dataset_of),
]


@dataclass(frozen=True)
class Source:
    # `describe` and `materialize` take the source's own config section (Any: each source its own class)
    describe: Callable[[Any, Path], tuple[dict, dict]]  # validate everything, write the manifest: (manifest, counts)
    load: Callable[[Path, dict], Splits] | None = None  # the classifier splits; None for sentence corpora
    materialize: Callable[[Any, Path], None] | None = None  # the built-in example, when the folder is absent


SOURCES: dict[str, Source] = {
    "digits": Source(describe_digits, load_arrays, materialize_digits),
    "table": Source(describe_table, load_table),
    "image_folder": Source(describe_image_folder, load_image_folder),
    "text": Source(describe_text, load_text),
    "docstrings": Source(describe_docstrings, materialize=materialize_docstrings),
    "text_corpus": Source(describe_corpus),
}


def load_splits(data_dir: Path) -> Splits:
    """The versioned folder's train/val/test arrays, through the source its manifest names."""
    manifest = read_manifest(data_dir)
    source = SOURCES.get(manifest.get("dataset", ""))
    if source is None or source.load is None:
        raise DataError(
            f"{Path(data_dir) / MANIFEST}: dataset {manifest.get('dataset')!r} is not a classifier data "
            f"source; known: {sorted(k for k, s in SOURCES.items() if s.load)}"
        )
    return source.load(Path(data_dir), manifest)
