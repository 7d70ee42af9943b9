"""The deployments on a real Prefect server (started here, on loopback), on a user's table: a
scheduled-style run of `nightly` completes; then rows are appended, `modelforge data-changed`
announces the new version, and its event makes `on-new-data` start a run that completes, keeps the
old test rows in test and warm-starts its search from the nightly study."""

import os
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from conftest import warm_started_trials
from flows.deployments import NIGHTLY, ON_NEW_DATA, deploy_all
from tasks.config import load_config
from tasks.data.base import read_manifest
from tasks.data.examples import wine
from tasks.data.table import split_rows
from tasks.notify_data import notify_data_change
from tasks.start_prefect import free_port

pytestmark = pytest.mark.e2e
POOL = "modelforge-test-pool"
TINY = {
    "data": {"dataset": "table", "dir": "data", "label": "label"},
    "search": {"n_trials": 2, "epochs": 2, "space": {"families": ["mlp"], "depth": [1, 1], "width": [16, 16]}},
    "train": {"max_epochs": 3, "patience": 3},
    "compress": {"candidates": {"int8_static": [{"method": "quantize_static", "calibration_samples": 32}]}},
    "validate": {"warmup": 2, "latency_runs": 10, "throughput_runs": 2},
    "gates": {"min_accuracy": 0.5, "max_accuracy_drop": 5.0, "max_latency_ratio": None},
    "tracking": {"experiment": "deployments"},
}


def wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(2)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-server")
    url = f"http://127.0.0.1:{free_port()}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": url,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    prefect = [sys.executable, "-m", "prefect"]
    server = subprocess.Popen([*prefect, "server", "start", "--host", "127.0.0.1", "--port", url.split(":")[-1][:-4]],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    worker = None
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            def healthy():
                try:
                    with get_client(sync_client=True) as c:
                        return c.api_healthcheck() is None
                except Exception:
                    return False

            wait(healthy, 120, "the Prefect server")
            project = tmp_path_factory.mktemp("project")
            wine(project / "data")
            full = pd.read_csv(project / "data" / "data.csv")
            full.iloc[:140].to_csv(project / "data" / "data.csv", index=False)  # the first delivery
            (project / "config.yaml").write_text(yaml.safe_dump(TINY))
            ids = deploy_all(project, str(project / "config.yaml"), pool=POOL)
            worker = subprocess.Popen([*prefect, "worker", "start", "--pool", POOL], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            yield {"ids": ids, "project": project, "rows": full, "env": env}
    finally:
        for proc in (worker, server):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:  # seen on a loaded 2-core machine: the worker's graceful stop hangs
                    proc.kill()
                    proc.wait(30)


def final_state(flow_run_id, timeout=300):
    def done():
        with get_client(sync_client=True) as c:
            state = c.read_flow_run(flow_run_id).state
        return state if state.is_final() else None

    return wait(done, timeout, f"flow run {flow_run_id}")


def test_nightly_deployment_run_completes(stack):
    flow_run = run_deployment(f"optimize/{NIGHTLY}", timeout=0)
    assert final_state(flow_run.id).is_completed()
    assert (stack["project"] / "deploy" / "champion" / "model.onnx").exists()


def test_appended_rows_announced_by_data_changed_start_a_warm_started_on_new_data_run(stack):
    project, config = stack["project"], stack["project"] / "config.yaml"
    old_rows, old_split = split_rows(project / "data", read_manifest(project / "data"))
    stack["rows"].to_csv(project / "data" / "data.csv", index=False)  # new rows arrive
    cli = [sys.executable, "-m", "flows.cli", "data-changed", "--config", str(config), "--root", str(project)]
    announced = subprocess.run(cli, env=stack["env"], capture_output=True, text=True)
    assert announced.returncode == 0 and "changed, event emitted" in announced.stdout, announced.stderr
    deployment = DeploymentFilter(id=DeploymentFilterId(any_=[stack["ids"][ON_NEW_DATA]]))

    def triggered():
        with get_client(sync_client=True) as c:
            return c.read_flow_runs(deployment_filter=deployment, flow_run_filter=FlowRunFilter())

    runs = wait(triggered, 120, "a run of on-new-data after the event")
    assert final_state(runs[0].id).is_completed()
    new_rows, new_split = split_rows(project / "data", read_manifest(project / "data"))
    test_now = set(new_rows[new_split == "test"].to_json(orient="records", lines=True).splitlines())
    old_test = old_rows[old_split == "test"].to_json(orient="records", lines=True).splitlines()
    assert len(test_now) > len(old_test) and set(old_test) <= test_now
    warm = warm_started_trials(project)
    assert len(warm) == 2 and all(t.state.name == "COMPLETE" for t in warm)
    # Announcing the same version again is not news: no event.
    assert not notify_data_change(load_config(config).data, project).emitted
