"""The deployments of two users' projects on one real Prefect server, started by `modelforge stack start`
in the first project's folder (the temporary server has no workers or triggers). Each project has its
own table and the config `modelforge init` wrote for it; the first is deployed from its folder by a
relative config path, the second from elsewhere, both with tiny `--set` search settings. The second
project's nightly deployment, run on demand with `prefect deployment run` from its folder, finishes and
ships a champion; rows appended to the first project's table and announced by `modelforge data-changed`
start that project's on-new-data run only, which finishes, registers and promotes, while the second
project's champion stays as it was."""

import json
import os
import re
import subprocess
import sys
import time

import httpx
import pandas as pd
import psutil
import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter
from prefect.client.schemas.objects import StateType
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.cli import main as cli_main
from flows.deployments import deploy_model, list_deployments, remove_model
from tasks.config import load_config
from tasks.core.prefect import free_port, stop_stack
from tasks.data.notify import data_resource, notify_data_change
from tasks.examples import breast_cancer, wine

pytestmark = pytest.mark.e2e
TINY = [
    "search.n_trials=2",
    "search.epochs=2",
    "search.space.depth=[1, 1]",
    "search.space.width=[16, 16]",
    "train.max_epochs=3",
    "train.patience=3",
    "compress.candidates={int8_dynamic: [{method: quantize_dynamic}]}",
    "validate.warmup=2",
    "validate.latency_runs=10",
    "validate.throughput_runs=2",
    "gates.min_accuracy=0.5",
    "gates.max_accuracy_drop=5.0",
    "gates.max_latency_ratio=null",
]
PROJECTS = {"wine": wine, "cancer": breast_cancer}  # config wine.yaml -> model wine-classifier, ...


def wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(2)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def cli(*args: str, cwd, env) -> str:
    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # found from the project's stack
    env["PREFECT_WORKER_QUERY_SECONDS"] = "2"  # the worker picks a new run up within 2 s, not 10
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), *filter(None, [env.get("PYTHONPATH")])])
    projects = {}
    for name, example in PROJECTS.items():
        project = tmp_path_factory.mktemp(name)
        rows = pd.read_csv(example(project / "data"))
        rows.iloc[:140].to_csv(project / "data" / "data.csv", index=False)  # the first delivery
        assert (
            cli_main(
                ["init", "--root", str(project), "--data", "data/data.csv", "--label", "label", "--out", f"{name}.yaml"]
            )
            == 0
        )
        projects[name] = {
            "root": project,
            "rows": rows,
            "config": project / f"{name}.yaml",
            "model": f"{name}-classifier",
        }
    first = projects["wine"]["root"]
    try:
        started = cli("stack", "start", "--port", str(free_port()), cwd=first, env=env)
        url = json.loads((first / ".modelforge" / "stack.json").read_text())["api_url"]
        assert url in started
        sets = [f"--set={s}" for s in TINY]
        with pytest.MonkeyPatch.context() as mp, temporary_settings(restore_defaults={PREFECT_API_URL}):
            mp.chdir(first)  # as a user deploys: in the project, by a relative path, to the server of its stack
            assert cli_main(["deploy", "--config", "wine.yaml", *sets]) == 0
        with temporary_settings(updates={PREFECT_API_URL: url}):
            cancer = projects["cancer"]["root"]  # a second project, deployed from elsewhere to the same server
            assert cli_main(["deploy", "--root", str(cancer), "--config", str(cancer / "cancer.yaml"), *sets]) == 0
            yield {"projects": projects, "env": env, "url": url}
    finally:
        stop_stack(first)


def runs_of(deployment: str) -> list:
    with get_client(sync_client=True) as c:
        d = c.read_deployment_by_name(deployment)
        return c.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id={"any_": [d.id]}))


def final_state(flow_run_id, timeout=300):
    def done():
        with get_client(sync_client=True) as c:
            state = c.read_flow_run(flow_run_id).state
        return state if state.is_final() else None

    return wait(done, timeout, f"flow run {flow_run_id}")


def registry(project: dict) -> MlflowClient:
    """The project's own MLflow store (the process-wide tracking URI left as the other tests set it)."""
    uri = load_config(project["config"]).resolved(project["root"]).tracking.uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def champion_dir(project: dict):
    """The champion folder `init` names after the model (its config's name)."""
    return project["root"] / "deploy" / f"{project['model'].removesuffix('-classifier')}-champion"


def champion(project: dict) -> tuple[str, str]:
    """The registry's champion version of the project's model, and the sha256 its champion bundle serves."""
    version = registry(project).get_model_version_by_alias(project["model"], "champion").version
    manifest = json.loads((champion_dir(project) / "manifest.json").read_text())
    return str(version), manifest["sha256"]


def test_each_model_is_deployed_with_absolute_paths_its_overrides_and_its_own_data_trigger(stack):
    deployed = {d.name: d for d in list_deployments()}
    assert sorted(deployed) == [
        "optimize/cancer-classifier-nightly",
        "optimize/cancer-classifier-on-new-data",
        "optimize/wine-classifier-nightly",
        "optimize/wine-classifier-on-new-data",
    ]
    for name, project in stack["projects"].items():
        data = load_config(project["config"]).resolved(project["root"]).data.dir
        nightly, on_new_data = (deployed[f"optimize/{name}-classifier-{kind}"] for kind in ("nightly", "on-new-data"))
        for d in (nightly, on_new_data):
            assert d.parameters == {
                "config_path": str(project["config"]),
                "root": str(project["root"]),
                "overrides": TINY,
                "lock_wait_s": 3600,
            }
        assert nightly.runs_on == "cron 0 2 * * *"
        assert on_new_data.runs_on == f"event modelforge.data.changed of {data_resource(data)}"
    # A second project's model under a name already deployed would take the first one's deployments over.
    cancer = stack["projects"]["cancer"]
    with pytest.raises(ValueError, match="wine-classifier is already deployed from"):
        deploy_model(cancer["config"], cancer["root"], ["register.model_name=wine-classifier"])
    assert len(list_deployments()) == 4


def test_nightly_deployment_run_on_demand_from_a_project_folder_finishes(stack):
    cancer = stack["projects"]["cancer"]
    started = subprocess.run(
        [sys.executable, "-m", "prefect", "deployment", "run", "optimize/cancer-classifier-nightly"],
        cwd=cancer["root"],
        env={**stack["env"], "PREFECT_API_URL": stack["url"]},
        capture_output=True,
        text=True,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started.stdout).group(1)
    assert final_state(flow_run_id).is_completed()
    assert (champion_dir(cancer) / "model.onnx").exists()
    cancer["champion"] = champion(cancer)


def test_new_rows_in_one_project_start_its_on_new_data_run_only(stack):
    wine_, cancer = stack["projects"]["wine"], stack["projects"]["cancer"]
    wine_["rows"].to_csv(wine_["root"] / "data" / "data.csv", index=False)  # new rows arrive
    announced = cli("data-changed", "--config", "wine.yaml", cwd=wine_["root"], env=stack["env"])
    assert "changed, event emitted" in announced
    runs = wait(lambda: runs_of("optimize/wine-classifier-on-new-data"), 120, "a run of on-new-data after the event")
    assert final_state(runs[0].id).is_completed()
    registered = registry(wine_).get_model_version_by_alias(wine_["model"], "candidate")
    assert champion(wine_)[0] == str(registered.version)  # no champion before: this run's model is promoted
    assert registered.tags["promotion"] == "promoted: no champion yet"
    assert champion(cancer) == cancer["champion"]  # the other project's champion is untouched
    # Announcing the same version again is not news: no event.
    assert not notify_data_change(load_config(wine_["config"]).resolved(wine_["root"]).data, wine_["root"]).emitted

    # The flow runs on the server (the nightly schedules' future runs aside): each deployment ran only when asked.
    with get_client(sync_client=True) as c:
        names = {d.id: f"optimize/{d.name}" for d in c.read_deployments()}
        ran = sorted(
            (names[r.deployment_id], r.name, r.state.name, r.total_run_time.total_seconds())
            for r in c.read_flow_runs()
            if r.deployment_id and r.state.type != StateType.SCHEDULED
        )
    print("".join(f"\nflow run {run:<22} {deployment:<40} {state} ({s:.0f} s)" for deployment, run, state, s in ran))
    assert [(d, state) for d, _, state, _ in ran] == [
        ("optimize/cancer-classifier-nightly", "Completed"),
        ("optimize/wine-classifier-on-new-data", "Completed"),
    ]


def test_remove_and_stack_stop(stack):
    removed = remove_model("cancer-classifier")
    assert sorted(d.name for d in removed) == [
        "optimize/cancer-classifier-nightly",
        "optimize/cancer-classifier-on-new-data",
    ]
    assert sorted(d.model for d in list_deployments()) == ["wine-classifier", "wine-classifier"]
    first = stack["projects"]["wine"]["root"]
    pids = json.loads((first / ".modelforge" / "stack.json").read_text())["pids"]
    assert (first / ".modelforge" / "logs" / "prefect-worker.log").exists()
    assert cli_main(["stack", "stop", "--root", str(first)]) == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{stack['url']}/health", timeout=2)
    for pid in pids.values():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
