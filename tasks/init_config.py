"""`modelforge init`: inspect a user's data (a table, labelled texts, a folder of image class
folders) and write a complete, commented config for it.

Every field of the pipeline config is written with its value and its one-line doc, so the file is
also the reference of what can be changed; the written file is loaded back through the same
validation as any config before `init` reports success.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import BaseModel

from tasks.compress.recipe import CompressConfig
from tasks.config import LMPipelineConfig, PipelineConfig, load_config
from tasks.core.settings import ConfigError
from tasks.data import SOURCES
from tasks.data.base import MANIFEST, DataError
from tasks.data.image_folder import SUFFIXES as IMAGE_SUFFIXES
from tasks.data.table import (
    READERS,
    TableDataConfig,
    infer_schema,
    nested_columns,
    read_table,
    table_notes,
)
from tasks.models import FAMILIES
from tasks.models.hf import PACKAGED
from tasks.train.stage import check_model_inputs

BUILTIN_FAMILIES = tuple(f for f, family in FAMILIES.items() if family.builtin)
FAMILIES_FOR = {"table": ["mlp"], "image_folder": ["cnn", "mlp"], "text": ["text"]}  # what suits each source


def _flow(value: object) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def commented_yaml(model: BaseModel, indent: int = 0, first: tuple[str, ...] = ()) -> list[str]:
    """Every field of `model` (those named in `first` first), nested sections indented, each line
    with its field doc as a comment."""
    values = model.model_dump(mode="json", by_alias=True)
    fields = type(model).model_fields
    lines = []
    for name in [*first, *(f for f in fields if f not in first and not fields[f].exclude)]:
        field = fields[name]
        key, pad = field.alias or name, " " * indent
        doc = f"  # {field.description}" if field.description else ""
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            lines += [f"{pad}{key}:{doc}", *commented_yaml(value, indent + 2)]
        elif isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):  # recipes
            lines += [f"{pad}{key}:{doc}", *(f"{pad}  {k}: {_flow(v)}" for k, v in values[key].items())]
        else:
            lines.append(f"{pad}{key}: {_flow(values[key])}{doc}")
    return lines


def _text_column(frame, label: str) -> str | None:
    """The column of free text, when the table is one text column beside the label (words per value
    on average >= 4); None for an ordinary table."""
    import pandas as pd

    others = [c for c in frame.columns if c != label]
    if len(others) != 1 or pd.api.types.is_numeric_dtype(frame[others[0]]):
        return None
    words = frame[others[0]].dropna().astype(str).str.split().str.len()
    return others[0] if len(words) and words.mean() >= 4 else None


def describe_data(data: Path, label: str | None) -> tuple[dict, list[str]]:
    """The `data` section for what is at `data` (a table, labelled texts or a folder of class
    sub-folders of images), and comment lines that say what was found."""
    data = Path(data)
    if data.is_dir():
        classes = {
            d.name: sum(1 for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            for d in sorted(data.iterdir())
            if d.is_dir()
        }
        if not any(classes.values()):
            raise DataError(f"{data}: a folder, but no class sub-folders of PNG/JPEG images in it")
        return {"dataset": "image_folder", "dir": str(data)}, [
            f"{data.name}/: {sum(classes.values())} images in {len(classes)} class folders",
            "classes: " + ", ".join(f"{c} ({n})" for c, n in classes.items()),
        ]
    if not (data.is_file() and data.suffix.lower() in READERS):
        raise DataError(f"{data}: neither a table file ({', '.join(sorted(READERS))}) nor a folder of class folders")
    if not label:
        raise DataError(f"{data} is a table: name its class column with --label")
    frame = read_table(data)
    if label not in frame.columns:
        raise DataError(f"{data}: no column {label!r}; it has {', '.join(map(str, frame.columns))}")
    classes = frame[label].dropna().astype(str).value_counts()
    counted = "classes: " + ", ".join(f"{c} ({n})" for c, n in classes.items())
    if text := _text_column(frame, label):
        return (
            {"dataset": "text", "dir": str(data.parent), "file": data.name, "text": text, "label": label},
            [f"{data.name}: {len(frame)} texts in column {text!r}, {len(classes)} classes", counted],
        )
    nested = nested_columns(frame)  # a model here reads numbers and categories: these go to data.drop
    schema = infer_schema(TableDataConfig(dataset="table", label=label, drop=list(nested)), frame)
    found = [
        f"{data.name}: {len(frame)} rows, {len(schema)} feature columns, {len(classes)} classes",
        "columns: " + ", ".join(f"{c} ({k}, {int(frame[c].isna().sum())} missing)" for c, k in schema.items()),
        counted,
        *(f"column {c!r} holds nested values ({t}): listed in data.drop, not read" for c, t in nested.items()),
        *(f"note: {note}" for note in table_notes(frame, schema)),
    ]
    return {
        "dataset": "table",
        "dir": str(data.parent),
        "file": data.name,
        "label": label,
        **({"drop": list(nested)} if nested else {}),
    }, found


def pretrained_image_input(folder: Path) -> dict:
    """The image size and colour an image checkpoint was trained at (its position embeddings fix the size)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"--model {folder}: config.json cannot be read ({err})") from None
    side = config.get("image_size", 224)
    return {
        "image_size": list(side) if isinstance(side, list) else [side, side],
        "color": "gray" if config.get("num_channels", 3) == 1 else "rgb",
    }


def candidates_for(families: list[str]) -> dict[str, list]:
    """The default candidates, less distillation when a family has no student of its own (a user's
    module has no narrower twin: that candidate would fail after search and training)."""
    defaults = CompressConfig().model_dump()["candidates"]
    student_for_all = all(FAMILIES[f].scales or FAMILIES[f].shallower is not None for f in families)
    return {
        name: recipe
        for name, recipe in defaults.items()
        if student_for_all or not any(step["method"] == "distill" for step in recipe)
    }


def validated_manifest(cfg: PipelineConfig) -> dict:
    """The data source's whole validation, leaving the data folder as it was: the manifest it writes is
    the previous version a later drift check compares with, and only a run versions the data."""
    path = Path(cfg.data.dir) / MANIFEST
    before = path.read_bytes() if path.is_file() else None
    try:
        return SOURCES[cfg.data.dataset].describe(cfg.data, cfg.data.dir)[0]
    finally:
        if before is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(before)


def check_runnable(cfg: PipelineConfig, root: Path, data: Path) -> None:
    """What `run` checks before any training, run here so `init` never writes a config `run` refuses:
    the folders' safety, the data source's whole validation and the model on the data's shapes."""
    try:
        resolved = cfg.resolved(root)
    except ConfigError as err:
        if "data.dir" not in str(err):
            raise
        folder = Path(f"data/{data.stem}")
        raise ConfigError(
            f"{data} must lie in a folder of its own inside the project ({root}), which DVC versions "
            f"whole; e.g. `mkdir -p {folder} && cp {data} {folder}/` (or `mv`), then "
            f"`modelforge init --data {folder / data.name} ...`"
        ) from None
    manifest = validated_manifest(resolved)
    check_model_inputs(
        resolved.train, resolved.model, int(manifest["num_classes"]), tuple(manifest["input_shape"]), root
    )


def lm_config(model: Path, data: Path, out: Path, root: Path) -> tuple[BaseModel, list[str]]:
    """The causal-LM config for `model` (a Hugging Face folder or .gguf file) and the text corpus `data`."""
    from tasks.data.corpus import TEXT_SUFFIXES
    from tasks.lm.model import check_model

    check_model(model)
    if not data.is_dir():
        raise DataError(f"{data}: a causal LM takes a corpus folder of .txt/.md/.jsonl documents")
    files = [p for p in data.rglob("*") if p.suffix in (*TEXT_SUFFIXES, ".jsonl")]
    name = out.stem.replace("_", "-")
    inside = lambda p: str(p.resolve().relative_to(root)) if p.resolve().is_relative_to(root) else str(p.resolve())
    cfg = LMPipelineConfig.model_validate(
        {
            "lm": {"model": inside(model)},
            "data": {"dir": inside(data)},
            "register": {"model_name": f"{name}-lm", "bundle_dir": f"deploy/{name}-bundle"},
            "promote": {"champion_bundle_dir": f"deploy/{name}-champion"},
            "tracking": {"experiment": name},
        }
    )
    return cfg, [
        f"{data.name}/: {len(files)} document files; model {model.name} "
        f"({'GGUF' if model.is_file() else 'Hugging Face folder'})",
        "gates.max_ppl_increase_pct / min_top1 / max_kl judge every candidate against the FP32 model.",
    ]


def is_causal_lm(model: str | None, root: Path) -> bool:
    from tasks.lm.model import ARCHITECTURES

    path = root / model if model else None
    if path is None or not path.exists():
        return False
    if path.suffix == ".gguf":
        return True
    try:
        return json.loads((path / "config.json").read_text()).get("architectures", ["?"])[0] in ARCHITECTURES
    except (OSError, ValueError):
        return False


def init_config(data: Path, label: str | None, model: str | None, out: Path, root: Path) -> Path:
    """Write a config for the data at `data` (relative paths are taken from `root`) to `out`, after
    checking it loads; returns `out`. An existing `out` is never overwritten."""
    root, out = Path(root).resolve(), Path(out)
    target = out if out.is_absolute() else root / out
    if target.exists():
        raise ConfigError(f"{target} exists; choose another --out (init never overwrites a config)")
    absolute = Path(data) if Path(data).is_absolute() else root / data
    if model is not None and is_causal_lm(model, root):
        cfg, found = lm_config(root / model, absolute, out, root)
        return _write(
            cfg, data, found, out, target, ("family", "lm", "data", "compress", "gates"), "compress.search.n_trials=30"
        )
    section, found = describe_data(absolute, label)
    section["dir"] = (
        str(Path(section["dir"]).resolve().relative_to(root))
        if Path(section["dir"]).resolve().is_relative_to(root)
        else section["dir"]
    )
    spec = model if model and ":" in model else None  # a user's own "package.module:function"
    # a pretrained Hugging Face classifier: the packaged MiniLM, or a local checkpoint folder (text or image)
    pretrained = model if model == PACKAGED or (model and (absolute_model := root / model).is_dir()) else None
    if pretrained and pretrained != PACKAGED:
        pretrained = str(absolute_model.resolve())
    if pretrained and section["dataset"] not in ("text", "image_folder"):
        raise ConfigError(
            f"--model {model} is a pretrained Hugging Face model (texts or images); {data} is {section['dataset']} data"
        )
    if pretrained and section["dataset"] == "text":
        section["tokenizer"] = pretrained  # its texts must be tokenized by its own tokenizer
    if pretrained and section["dataset"] == "image_folder":
        section.update(pretrained_image_input(Path(pretrained)))
    families = ["custom"] if spec else ["hf"] if pretrained else [model] if model else FAMILIES_FOR[section["dataset"]]
    if unknown := [f for f in families if f not in FAMILIES]:
        raise ConfigError(
            f"--model {unknown[0]}: known model families are {', '.join(BUILTIN_FAMILIES)}, or your "
            f"own module as package.module:function, or a pretrained Hugging Face model ({PACKAGED} or a "
            "local Hugging Face folder)"
        )
    if section["dataset"] != "image_folder" and (images := [f for f in families if FAMILIES[f].images]):
        raise ConfigError(f"--model {images[0]} takes images; {data} is {section['dataset']} data")
    name = out.stem.replace("_", "-")
    # Shift augmentation is for images; the space default would waste trials on it elsewhere.
    augment = ["shift"] if section["dataset"] == "image_folder" else ["none"]
    cfg = PipelineConfig.model_validate(
        {
            "data": section,
            "model": {"spec": spec, "pretrained": pretrained},
            "search": {"space": {"families": families, "augment": augment}},
            "compress": {"candidates": candidates_for(families)},
            # Bundle folders of their own: two models' champions never share (and replace) one folder.
            "register": {"model_name": f"{name}-classifier", "bundle_dir": f"deploy/{name}-bundle"},
            "promote": {"champion_bundle_dir": f"deploy/{name}-champion"},
            "tracking": {"experiment": name},
        }
    )
    check_runnable(cfg, root, Path(data))
    found.append("gates.min_accuracy is an absolute floor on test accuracy: set it to what your use needs.")
    return _write(
        cfg, data, found, out, target, ("family", "data", "model", "search", "train", "compress"), "search.n_trials=30"
    )


def _write(
    cfg: BaseModel, data: Path, found: list[str], out: Path, target: Path, first: tuple[str, ...], override: str
) -> Path:
    """`cfg` written to `target` with its docs, after a header of what was found; loaded back, or removed."""
    header = [
        f"# modelforge config written by `modelforge init` for {data}",
        *(f"# {line}" for line in found),
        "# Run it:   modelforge run --config " + str(out),
        "# Override: modelforge run --config " + str(out) + " --set " + override,
        "",
    ]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(header + commented_yaml(cfg, first=first)) + "\n")
    try:
        load_config(target)
    except ConfigError:
        target.unlink()
        raise
    return target
