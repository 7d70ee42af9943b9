"""MkDocs hook: the Reference pages, generated at build time from the code, so they are never written twice.

- reference/config.md: every config key of each pipeline family, with its default and the one-line field doc
  that `modelforge init` writes beside it, by walking the root config classes' pydantic fields (the same
  fields and docs init's commented config is written from);
- reference/cli.md: every command and option, from the CLI's argparse parser;
- reference/server.md: every endpoint of the model server, from its FastAPI OpenAPI schema.

Only the stable entry points are imported (the root config classes, the CLI parser, the app factory), so the
pages follow the code wherever its modules move. A config field without a doc and markdown left unrendered on
any page are warnings, which `mkdocs build --strict` turns into a failed build.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import re
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

log = logging.getLogger("mkdocs.hooks.reference")  # under "mkdocs": --strict counts its warnings

PAGES = {"reference/config.md": "config_page", "reference/cli.md": "cli_page", "reference/server.md": "server_page"}


def on_config(config):
    # The project's own modules, from the checkout being built (not another installed copy).
    root = str(Path(config.config_file_path).resolve().parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return config


def on_files(files, config):
    from mkdocs.structure.files import File

    for path, page in PAGES.items():
        files.append(File.generated(config, path, content=globals()[page]()))
    return files


def cell(text: object) -> str:
    """`text` safe in a table cell: markdown outside code spans is escaped, code spans are kept."""
    parts = str(text).replace("\n", " ").split("`")
    for i in range(0, len(parts), 2):
        parts[i] = re.sub(r"([\\*_\[\]])", r"\\\1", html.escape(parts[i], quote=False))
    return "`".join(parts).replace("|", "\\|")


def code(value: object) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return f"`{text}`" if "`" not in text else cell(text)


# ---- configuration ---------------------------------------------------------------------------------------


def _models(annotation: object) -> list[type[BaseModel]]:
    """The config sections an annotation holds (through Optional, Union, Annotated, list and dict)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models(arg)]


def _values(annotation: object) -> str:
    """A short, readable type: the choices of a Literal, `int`, `list[str]`, `float | null`..."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " / ".join(json.dumps(a) for a in args)
    if origin is typing.Annotated:
        return _values(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_values(a) for a in args)
    if annotation is type(None):
        return "null"
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if a is Ellipsis else _values(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    return getattr(annotation, "__name__", str(annotation))


def _tag(section: type[BaseModel]) -> tuple[str, str] | None:
    """The discriminating field of a union's member (`dataset: table`, `method: distill`): a one-value Literal."""
    for name, field in section.model_fields.items():
        args = typing.get_args(field.annotation)
        if typing.get_origin(field.annotation) is typing.Literal and len(args) == 1:
            return field.alias or name, args[0]
    return None


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True)
    return code(
        value.model_dump(mode="json") if isinstance(value, BaseModel) else json.loads(json.dumps(value, default=str))
    )


def _doc(section: type[BaseModel]) -> str:
    return " ".join((section.__doc__ or "").split())


def config_sections(cls: type[BaseModel], prefix: str = "") -> list[tuple[str, str, list[tuple[str, str, str, str]]]]:
    """(heading, doc, rows) for `cls` and every section below it; a row is (key, default, values, doc)."""
    rows, below = [], []
    own = vars(cls).get("__annotations__", {}) if not prefix else {}
    # A root's own sections (family, data, model, search...) first, as `init` writes them; the shared ones after.
    for name, field in sorted(cls.model_fields.items(), key=lambda item: item[0] not in own):
        if field.exclude:
            continue
        key = f"{prefix}{field.alias or name}"
        sections = _models(field.annotation)
        if not sections:
            if not field.description and (tag := _tag(cls)) and tag[0] == (field.alias or name):
                continue  # said in the heading
            if not field.description:
                log.warning("config key %s (%s) has no field doc: give it Field(description=...)", key, cls.__name__)
            rows.append((key, _default(field), _values(field.annotation), field.description or ""))
            continue
        many, path = len(sections) > 1, key
        if typing.get_origin(field.annotation) is dict:  # named recipes: a list of steps, or one recipe
            path += ".NAME" + ("[]" if typing.get_origin(typing.get_args(field.annotation)[1]) is list else "")
        for section in sections:
            tag = _tag(section) if many or path != key else None
            heading = f"{path} ({tag[0]}: {tag[1]})" if tag else path
            doc = " ".join(filter(None, [field.description, _doc(section)]))
            for head, section_doc, section_rows in config_sections(section, f"{path}."):
                below.append((heading if head == "" else head, doc if head == "" else section_doc, section_rows))
    return [("", _doc(cls), rows), *below]


def config_page() -> str:
    from tasks.config import PIPELINES

    lines = [
        "# Configuration reference",
        "",
        "Generated from the pipeline's config classes when the site is built: every key a config file may",
        "set, its default, the values it takes and the one-line doc `modelforge init` writes beside it in the",
        "configs it generates. A file's `family` picks the pipeline; unknown keys are errors, and every",
        "problem is reported in one pass. Any key can be overridden for one run by its dotted path:",
        "`modelforge run --config my.yaml --set search.n_trials=3`.",
        "",
    ]
    for family, root in PIPELINES.items():
        for heading, doc, rows in config_sections(root):
            lines += [f"## `family: {family}`" if heading == "" else f"### `{heading}`", ""]
            if doc:
                lines += [cell(doc), ""]
            if rows:
                lines += [
                    "| key | default | values | doc |",
                    "| --- | --- | --- | --- |",
                    *(f"| `{key}` | {default} | {cell(values)} | {cell(doc)} |" for key, default, values, doc in rows),
                    "",
                ]
    return "\n".join(lines)


# ---- command line ----------------------------------------------------------------------------------------


def _option(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`" + (
            f" ({' / '.join(map(str, action.choices))})" if action.choices else ""
        )
    flags = ", ".join(action.option_strings)
    if action.nargs == 0:
        return f"`{flags}`"
    metavar = action.metavar or (
        ("{" + ",".join(map(str, action.choices)) + "}") if action.choices else action.dest.upper()
    )
    return f"`{flags} {'[' + metavar + ']' if action.nargs == '?' else metavar}`"


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    return [(name, helps.get(name, ""), p) for name, p in sub.choices.items()]


def cli_page() -> str:
    from flows.cli import build_parser

    parser = build_parser()
    lines = [
        "# Command-line reference",
        "",
        "Generated from `modelforge`'s argument parser when the site is built; `modelforge COMMAND --help`",
        "prints the same.",
        "",
        cell(parser.description or ""),
        "",
        "| command | what it does |",
        "| --- | --- |",
        *(f"| [`{name}`](#{name}) | {cell(text)} |" for name, text, _ in _subcommands(parser)),
        "",
    ]
    for name, text, sub in _subcommands(parser):
        lines += [
            f"## {name}",
            "",
            cell(text),
            "",
            "```text",
            sub.format_usage().strip(),
            "```",
            "",
            "| option | default | what it does |",
            "| --- | --- | --- |",
        ]
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            unset = action.default is None or action.default is False or action.default in ([], argparse.SUPPRESS)
            default = "required" if action.required else "" if unset else code(action.default)
            lines.append(f"| {_option(action)} | {default} | {cell(action.help or '')} |")
        lines.append("")
    return "\n".join(lines)


# ---- model server ----------------------------------------------------------------------------------------


def _schema_name(schema: dict) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_schema_name(s) for s in schema["anyOf"])
    return schema.get("type", "any")


def server_page() -> str:
    from serve.app import create_app

    schema = create_app(None).openapi()  # builds routes only: no model is loaded until the app starts
    lines = [
        "# Model server reference",
        "",
        f"Generated from the OpenAPI schema of the model server (`{schema['info']['title']}`) when the site is",
        "built: every endpoint `modelforge serve` answers, whatever the bundle's family (an endpoint of",
        "another family answers with a pointer to its own). With `--auth-token`, every endpoint but the",
        "health probes needs `Authorization: Bearer <token>`; `--docs` serves this schema at `/openapi.json`.",
        "See [Serving](../how-to/serving.md) for the protocols' bodies and behaviour.",
        "",
        "| method | path | what | parameters | request body | responses |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            params = ", ".join(f"`{p['name']}` ({p['in']})" for p in op.get("parameters", []))
            body = op.get("requestBody", {}).get("content", {})
            bodies = ", ".join(f"{kind}: {_schema_name(c.get('schema', {}))}" for kind, c in body.items())
            responses = ", ".join(f"{code_} {r.get('description', '')}" for code_, r in op.get("responses", {}).items())
            what = " ".join(filter(None, [op.get("summary"), op.get("description")]))
            lines.append(
                f"| {method.upper()} | `{path}` | {cell(what)} | {params} | {cell(bodies)} | {cell(responses)} |"
            )
    return "\n".join(lines) + "\n"


# ---- nothing unrendered ----------------------------------------------------------------------------------

UNRENDERED = re.compile(r"\[[^\]\n]+\]\[[^\]\n]*\]|\[[^\]\n]+\]\([^)\s]+\)|^\s*\|.*\|\s*$|```", re.M)


def on_page_content(output, page, config, files):
    """Markdown that reached the HTML as text (a reference link without its target, a broken table, an
    unclosed fence) is a warning: --strict fails the build on it."""
    text = re.sub(r"<(pre|code)\b.*?</\1>", "", output, flags=re.S)
    text = re.sub(r"<[^>]+>", "", text)
    for found in UNRENDERED.findall(text):
        log.warning("%s: unrendered markdown: %s", page.file.src_uri, found.strip()[:120])
    return output
