"""`modelforge` as a user types it: `run` as a process that finishes, `--force`, `rollback`,
`compare`, `example`, `--wait` behind a busy work dir, and the flow a config's `family` picks.

One project serves the whole module: a weak first run (v1, a process), then a stronger one (v2,
promoted), so that a rollback has somewhere to go back to."""

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.cli import main
from tasks.core.lock import lock_workdir

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
CONFIG = {
    "search": {
        "n_trials": 1,
        "epochs": 1,
        "space": {
            "families": ["mlp"],
            "optimizers": ["adam"],
            "lr": [0.005, 0.005],
            "depth": [1, 1],
            "width": [32, 32],
            "batch_sizes": [64],
        },
    },
    "train": {"max_epochs": 1, "patience": 1},
    "compress": {"candidates": {}},
    "validate": {"warmup": 2, "latency_runs": 10, "throughput_runs": 2},
    "gates": {"min_accuracy": 0.1, "max_latency_ratio": None},
    "register": {"model_name": "cli-digits"},
    "tracking": {"experiment": "cli"},
}
STRONGER = ["--set", "train.max_epochs=15", "--set", "train.patience=15"]
SHIPPED = re.compile(
    r"modelforge: shipped baseline -> (\S+) \(models:/cli-digits@candidate v(\d+)\); "
    r"(promoted to champion|champion kept): (.+)"
)


@pytest.fixture()
def api_in_env(prefect_api, monkeypatch):
    """In-process CLI runs use the session's Prefect API instead of starting a server of their own."""
    from prefect.settings import PREFECT_API_URL

    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_api):
    root = tmp_path_factory.mktemp("cli-project")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    first = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--root", str(root)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    v1 = json.loads((root / "deploy" / "champion" / "manifest.json").read_text())["sha256"]
    with pytest.MonkeyPatch.context() as mp:
        from prefect.settings import PREFECT_API_URL

        mp.setenv("PREFECT_API_URL", PREFECT_API_URL.value())
        second = main(["run", "--config", str(config), "--root", str(root), *STRONGER])
    return {"root": root, "config": config, "first": first, "second": second, "v1_sha": v1}


def cli(project, *args: str) -> int:
    return main([*args, "--config", str(project["config"]), "--root", str(project["root"])])


def champion(root: Path) -> tuple[str, str]:
    mlflow.set_tracking_uri(f"sqlite:///{root}/.modelforge/mlflow.db")
    version = MlflowClient().get_model_version_by_alias("cli-digits", "champion").version
    return str(version), json.loads((root / "deploy" / "champion" / "manifest.json").read_text())["sha256"]


def test_run_is_a_process_that_finishes_with_exit_code_0_and_the_result_line(project):
    first = project["first"]
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    lines = first.stdout.strip().splitlines()
    match = SHIPPED.fullmatch(lines[-1])
    assert match and match.groups()[1:] == ("1", "promoted to champion", "no champion yet"), lines[-1]
    assert Path(match.group(1)) == project["root"] / "deploy" / "bundle"
    assert "temporary server pid" in first.stdout + first.stderr  # it started and stopped its own Prefect API


def test_rollback_waits_behind_a_busy_work_dir_then_restores_the_previous_champion(project, capsys):
    assert project["second"] == 0
    assert champion(project["root"])[0] == "2"  # the stronger run beat the weak first one
    holding, release = threading.Event(), threading.Event()

    def another_run():
        with lock_workdir(project["root"] / ".modelforge", "modelforge run --config other.yaml"):
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=another_run)
    holder.start()
    holding.wait(30)
    try:
        assert cli(project, "rollback") == 2  # without --wait: refused at once, naming the holder
        assert "in use by modelforge run --config other.yaml" in capsys.readouterr().err
        threading.Timer(2.0, release.set).start()
        started = time.monotonic()
        assert cli(project, "rollback", "--wait", "60") == 0  # queued behind the holder, then done
        waited = time.monotonic() - started
    finally:
        release.set()
        holder.join()
    assert waited >= 1.5, waited
    assert "waiting up to 60s" in capsys.readouterr().out
    assert champion(project["root"]) == ("1", project["v1_sha"])  # alias and served bundle both back on v1


def test_compare_prints_the_runs_side_by_side(project, capsys):
    assert cli(project, "compare") == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].split() == [
        "started",
        "run",
        "status",
        "data_version",
        "chosen",
        "quality",
        "p50_ms",
        "size_kb",
        "version",
        "promotion",
    ]
    assert [r.split()[3] for r in rows[1:]] == ["FINISHED", "FINISHED"]  # newest first: v2, then v1
    assert [r.split()[-2:] for r in rows[1:]] == [["2", "promoted"], ["1", "promoted"]]  # version, promotion


def test_force_reruns_what_would_be_nothing_new(project, api_in_env, capsys):
    # The same data, config and code as the second run: without --force this run stops after versioning
    # the data (test_optimize_flow covers that), with it the whole pipeline runs and registers again.
    assert cli(project, "run", "--force", *STRONGER) == 0
    out = capsys.readouterr().out
    match = SHIPPED.search(out)
    assert match and match.group(2) == "3" and "nothing new" not in out, out[-2000:]


def test_example_writes_a_data_set_a_config_can_use(tmp_path, capsys):
    assert main(["example", "wine", "data/wine", "--root", str(tmp_path)]) == 0  # relative: in the project
    assert f"modelforge: wrote the wine example to {tmp_path / 'data' / 'wine'}" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "data" / "wine" / "data.csv")
    assert len(table) == 178 and sorted(table["label"].unique()) == ["class_0", "class_1", "class_2"]


def test_family_minilm_runs_the_encoder_flow(tmp_path, api_in_env, monkeypatch):
    import flows.encode
    import flows.optimize

    called = []

    def flow_named(name):
        def record(**kwargs):
            called.append((name, kwargs["config_path"]))
            return {"skipped": f"{name} (recorded by the test)"}

        return record

    monkeypatch.setattr(flows.encode, "optimize_encoder", flow_named("optimize-encoder"))
    monkeypatch.setattr(flows.optimize, "optimize", flow_named("optimize"))
    for family in ("minilm", "classifier"):
        config = tmp_path / f"{family}.yaml"
        config.write_text(yaml.safe_dump({"family": family}))
        assert main(["run", "--config", str(config), "--root", str(tmp_path)]) == 0
    assert called == [
        ("optimize-encoder", str(tmp_path / "minilm.yaml")),
        ("optimize", str(tmp_path / "classifier.yaml")),
    ]


def test_every_error_the_result_line_explains_is_found_where_the_cli_looks():
    # The CLI names them by module (so that `serve` and `ui` start without torch, Optuna and Prefect):
    # a module moved or an error renamed must be renamed there too, or its clean message is lost.
    import importlib

    from flows.cli import EXPLAINED, STOPS

    for name, module in {**EXPLAINED, **STOPS}.items():
        assert issubclass(getattr(importlib.import_module(module), name), BaseException), (name, module)
