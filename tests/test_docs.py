"""The docs are kept true: the site builds strictly with its generated reference complete, Getting
started is followed in a fresh folder of its own and ships and serves a model, the own-model guide's
module and command work, and every `modelforge` command the docs and the README show parses with the
real parser, its `--set` keys included."""

import html
import os
import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from flows.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
TESTED = re.compile(r"<!-- tested: tests/test_docs\.py[^>]*-->\s*```(\w+)\n(.*?)```", re.S)


def marked_blocks(page: str) -> list[tuple[str, str]]:
    """(language, text) of each code block the page marks as run by this file, in order."""
    return TESTED.findall((DOCS / page).read_text())


def command_lines(text: str) -> list[str]:
    """The shell lines of a block: continuations joined, comments dropped."""
    lines = text.replace("\\\n", " ").splitlines()
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def cli_argv(line: str) -> list[str] | None:
    """The arguments of a `modelforge ...` command on a line (after `cd x &&`, without a trailing `&`)."""
    for part in line.split("&&"):
        if part.split()[:1] == ["modelforge"]:
            return [w for w in shlex.split(part, comments=True)[1:] if w != "&"]
    return None


def test_the_site_builds_strictly_with_every_config_key_command_and_endpoint(tmp_path):
    site = tmp_path / "site"
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"},
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    reference = {name: (site / "reference" / name / "index.html").read_text() for name in ("config", "cli", "server")}

    from tasks.config import PIPELINES

    def docs(annotation: object) -> typing.Iterator[str]:
        """Every field doc of the sections an annotation holds, however nested (unions, lists, dicts)."""
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            for arg in typing.get_args(annotation):
                yield from docs(arg)
            return
        for field in annotation.model_fields.values():
            if not field.exclude:
                yield from [field.description] if field.description else []
                yield from docs(field.annotation)

    page = html.unescape(re.sub(r"<[^>]+>", "", reference["config"]))
    missing = {d for root in PIPELINES.values() for d in docs(root) if d.replace("`", "") not in page}
    assert not missing, sorted(missing)[:5]
    parser = build_parser()
    for command in next(a for a in parser._actions if a.dest == "command").choices.values():
        for action in command._actions:
            assert all(flag in reference["cli"] for flag in action.option_strings), action
    from serve.app import create_app

    assert all(path in reference["server"] for path in create_app(None).openapi()["paths"])


def test_every_documented_command_parses_and_its_overrides_name_real_keys():
    from tasks.config import parse_config
    from tasks.core.config_file import apply_overrides
    from tasks.core.settings import ConfigError

    parser, problems, seen = build_parser(), [], 0
    for page in [*PAGES, ROOT / "README.md"]:
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", page.read_text(), re.S):
            for line in command_lines(block):
                argv = cli_argv(line)
                if argv is None or "--help" in argv:
                    continue
                seen += 1
                try:
                    args = parser.parse_args(argv)
                except SystemExit:
                    problems.append(f"{page.name}: {line}")
                    continue
                try:
                    parse_config(apply_overrides({}, args.set))
                except ConfigError as err:
                    problems.append(f"{page.name}: {line}: {err}")
    assert seen > 30 and not problems, problems


def test_docs_name_no_module_of_tasks_and_only_files_that_exist_and_the_readme_links_resolve():
    """tasks/ modules move: the docs point at behaviour, the reference at the code. The tests, benchmarks
    and configs they name exist (but for the configs their own `init --out` writes)."""
    written = {path for page in PAGES for path in re.findall(r"--out (\S+)", page.read_text())}
    for page in PAGES:
        text = page.read_text()
        assert not re.findall(r"tasks/\w", text), page
        for path in re.findall(r"\b((?:tests|bench|configs)/[\w./-]+\.(?:py|yaml))", text):
            assert path in written or (ROOT / path).is_file(), f"{page.name} names {path}"
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert len(links) > 10 and all((ROOT / link).is_file() for link in links), links


@pytest.mark.e2e
def test_getting_started_in_a_fresh_folder_ships_and_serves_a_model(tmp_path, prefect_api, monkeypatch, capsys):
    """The page's commands, run as typed (in-process, on the session's Prefect API), in a folder of their
    own; then the page's request to the bundle its serve command names; then the own-model guide's
    module and `init` in the same project."""
    from conftest import serve_bundle
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
    monkeypatch.chdir(tmp_path)
    (first, run), (_, serve) = marked_blocks("getting-started.md")
    assert first == "bash"
    for line in command_lines(run):
        argv = cli_argv(line)
        assert argv is not None, f"a tested block holds only modelforge commands: {line}"
        assert main(argv) == 0, line
    out = capsys.readouterr().out
    said = re.search(r"`(modelforge: shipped .*?)`", (DOCS / "getting-started.md").read_text()).group(1)
    pattern = ".*?".join(re.escape(part) for part in re.split(r"<candidate>|\.\.\.", said))
    assert re.search(pattern, out), (said, out[-2000:])

    serve_line, curl = command_lines(serve)
    bundle = build_parser().parse_args(cli_argv(serve_line)).bundle
    words = shlex.split(curl)
    assert words[0] == "curl" and any(w.endswith(":8000/predict") for w in words)
    body, _ = serve_bundle(tmp_path / bundle, yaml.safe_load(words[words.index("-d") + 1]))
    assert len(body["labels"]) == 1

    (language, module), (_, init) = marked_blocks("how-to/own-model.md")
    assert language == "python"
    (tmp_path / re.match(r"# (\w+\.py)", module).group(1)).write_text(module)
    for line in command_lines(init):
        assert main(cli_argv(line)) == 0, line
    config = yaml.safe_load((tmp_path / "mine.yaml").read_text())
    assert config["model"]["spec"] == "acme_nets:small_mlp"
    assert not any(
        step["method"] == "distill" for recipe in config["compress"]["candidates"].values() for step in recipe
    )
