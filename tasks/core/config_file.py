"""Reading a config file safely (bounded size, alias bombs refused, unknown keys dropped before their
values are built) and validating it against a section class with every problem reported at once."""

from __future__ import annotations

import copy
import math
import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from tasks.core.settings import ConfigError, excerpt

MAX_CONFIG_BYTES = 256 * 2**10  # configs are a few KB; parsing 1 MB of YAML took 14 s here (pure Python)


def format_errors(errors: Sequence[Mapping[str, Any]]) -> list[str]:
    return [f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errors]


def _expanded_size(root: yaml.Node) -> float:
    """About how many characters `root` stands for with every alias written out (8 per node besides
    its text), computed once per distinct node; an alias inside its own anchor is a cycle: infinite."""
    sizes: dict[int, float] = {}
    open_: set[int] = set()

    def size(node: yaml.Node) -> float:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_:
            return math.inf
        open_.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            total: float = 8 + len(node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 8 + sum(size(item) for item in node.value)
        else:
            total = 8 + sum(size(key) + size(value) for key, value in node.value)
        open_.discard(id(node))
        sizes[id(node)] = total
        return total

    return size(root)


def _section_keys(annotation: object) -> set[str] | None:
    """The keys a field of this type takes when it is a section (the union of a union's members'),
    None when it is not one (a value, or a mapping of names such as the candidates)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _section_keys(typing.get_args(annotation)[0])
    if origin is Union:
        found = [k for arg in typing.get_args(annotation) if (k := _section_keys(arg)) is not None]
        return set().union(*found) if found else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {key for name, f in annotation.model_fields.items() for key in (name, f.alias) if key}
    return None


def _drop_unknown_keys(root: yaml.MappingNode, pipelines: Mapping[str, type[BaseModel]]) -> list[str]:
    """Keys the pipeline and its sections do not take, removed from the parsed file before any value
    is built (a huge or alias-bombed value under a misspelt key is never expanded), one problem each."""
    family = next(
        (v.value for k, v in root.value if k.value == "family" and isinstance(v, yaml.ScalarNode)), "classifier"
    )
    if family not in pipelines:
        return []  # parse_config names the unknown family
    problems: list[str] = []

    def prune(node: yaml.MappingNode, keys: set[str], where: str) -> None:
        kept = []
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else key.tag
            if name in keys or key.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` brings known keys
                kept.append((key, value))
            else:
                problems.append(f"{where}{excerpt(name, 80)}: unknown key (line {key.start_mark.line + 1}), not read")
        node.value[:] = kept

    cls = pipelines[family]
    sections = _section_keys(cls)
    assert sections is not None  # a pipeline's config is a section
    prune(root, sections, "")
    fields = {key: f for name, f in cls.model_fields.items() for key in (name, f.alias) if key}
    for key, value in root.value:
        if (
            isinstance(value, yaml.MappingNode)
            and key.value in fields
            and (keys := _section_keys(fields[key.value].annotation))
        ):
            prune(value, keys, f"{key.value}.")
    return problems


def safe_yaml(text: str, what: str, pipelines: Mapping[str, type[BaseModel]] | None = None) -> tuple[object, list[str]]:
    """`text` as YAML, refused with a ConfigError when its aliases expand past MAX_CONFIG_BYTES (the
    nodes are checked before any value is built); given the `pipelines` (family -> config class), the unknown keys
    of a config's sections are dropped first and returned as problems."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        unknown = _drop_unknown_keys(node, pipelines) if pipelines and isinstance(node, yaml.MappingNode) else []
        if (size := _expanded_size(node)) > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{what}: an alias (*name) refers to its own anchor (&name), a cycle"
                if size == math.inf
                else f"{what} expands to about {size / 2**10:,.0f} KB with its YAML aliases (*name) written "
                f"out, over the {MAX_CONFIG_BYTES // 2**10} KB limit (an alias bomb?); write the "
                "values out or use fewer aliases"
            )
        return loader.construct_document(node), unknown
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} is not valid YAML: {excerpt(err, 500)}") from None
    except RecursionError:
        raise ConfigError(f"{what} nests too deeply") from None
    finally:
        loader.dispose()


def read_config_file(path: str | Path, pipelines: Mapping[str, type[BaseModel]]) -> tuple[dict, list[str]]:
    """The config file as a mapping, and its unknown keys as problems. Refused with a ConfigError
    before it is parsed when it is over MAX_CONFIG_BYTES, and when its aliases expand past that."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)  # a bounded read: the "file" may be a pipe or /dev/zero
            size = max(len(data), os.fstat(f.fileno()).st_size)
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from None
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"config {path} is over the {MAX_CONFIG_BYTES // 2**10} KB limit for a config file "
            f"({size:,} bytes or more; a config is a few KB: is it the right file?)"
        )
    try:
        text = data.decode()
    except UnicodeDecodeError as err:
        raise ConfigError(f"config {path} is not UTF-8 text (byte {err.start})") from None
    raw, unknown = safe_yaml(text, f"config {path}", pipelines)
    if raw is None:
        return {}, []
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    return raw, unknown


def _without(raw: object, loc: tuple) -> bool:
    """Delete from `raw` the deepest mapping key on the error location `loc` (union tags that are not
    keys are skipped); False when there is nothing left to delete (an error about the whole file)."""
    target, key, node = None, None, raw
    for part in loc:
        if isinstance(node, dict) and part in node:
            target, key, node = node, part, node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
    if target is None:
        return False
    del target[key]
    return True


def all_errors(cls: type[BaseModel], raw: dict) -> list[ErrorDetails]:
    """Every problem in one pass. Pydantic runs a section's cross-field checks only once its fields
    are valid, so each failing key is dropped (falling back to its default) and the rest validated
    again, until the errors stop changing: a bad field and a cross-field conflict show together."""
    errors: list[ErrorDetails] = []
    work = copy.deepcopy(raw)
    for _ in range(8):  # nesting depth bounds the rounds; 8 is ample
        try:
            cls.model_validate(work)
            break
        except ValidationError as err:
            fresh = [e for e in err.errors() if (e["loc"], e["msg"]) not in {(x["loc"], x["msg"]) for x in errors}]
            errors += fresh
            if not fresh or not all([_without(work, e["loc"]) for e in fresh]):
                break
    return errors


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """`raw` with each `dotted.key=value` set (the value read as YAML: 3, 0.5, true, [a, b], text), as
    `modelforge run --set search.n_trials=3` asks; the result is validated like the file itself."""
    out, problems = copy.deepcopy(raw), []
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            problems.append(f"--set {item!r}: expected KEY=VALUE with a dotted KEY (e.g. search.n_trials=3)")
            continue
        node = out
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"--set {item!r}: {'.'.join(parts[: depth + 1])} is not a section")
                break
        else:
            try:
                node[parts[-1]] = safe_yaml(text, f"--set {excerpt(repr(item), 80)}: the value")[0]
            except ConfigError as err:
                problems.append(str(err))
    if problems:
        raise ConfigError("invalid overrides:\n" + "\n".join(f"  - {p}" for p in problems))
    return out
