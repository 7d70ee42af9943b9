"""Search trials on real engines: a Dask LocalCluster of worker processes, and a Dask cluster with
PostgreSQL holding the Optuna study and the MLflow store. Every trial must land where the config
says, run in another process, and read the data it fetched by md5."""

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.optimize import optimize
from tasks.config import parse_config
from tasks.core.prefect import free_port, wait_for_http
from tasks.core.settings import ConfigError
from tasks.search.runner import search_runner
from tasks.search.study import storage_of

pytestmark = pytest.mark.e2e

SMALL = {
    "search": {
        "n_trials": 4,
        "epochs": 1,
        "workers": 2,
        "sampler": "random",
        "space": {"families": ["mlp"], "depth": [1, 1], "width": [16, 32], "batch_sizes": [64]},
    },
    "train": {"max_epochs": 2, "patience": 2},
    "compress": {"candidates": {}},
    "validate": {"warmup": 2, "latency_runs": 10, "throughput_runs": 2},
    "gates": {"min_accuracy": 0.3, "max_latency_ratio": None},
    "tracking": {"experiment": "cluster"},
}


def write(root: Path, **sections) -> Path:
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump({**SMALL, **sections}))
    return path


def trial_runs(uri: str, experiment: str, parent: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")


def assert_ran_on_workers(runs: list, cache: Path) -> None:
    pids = {r.data.tags["modelforge.pid"] for r in runs}
    assert len(runs) >= 4 and all(r.info.status == "FINISHED" for r in runs)
    assert str(os.getpid()) not in pids and len(pids) == 2  # two worker processes, neither of them this one
    assert {Path(r.data.tags["modelforge.data_dir"]).parent for r in runs} == {cache}  # fetched by md5


def test_runner_flag_is_a_validated_override(tmp_path):
    import argparse

    from flows.cli import runner_overrides
    from tasks.config import load_config

    config = tmp_path / "c.yaml"
    config.write_text("search: {storage: 'postgresql+psycopg://u@db/optuna'}\ntracking: {uri: 'http://mlflow:5000'}\n")
    assert load_config(config, runner_overrides("dask://10.0.0.5:8786")).runner.address == "tcp://10.0.0.5:8786"
    assert load_config(config, runner_overrides("dask")).runner.multi_machine is False
    with pytest.raises(ConfigError, match=r"search\.storage"):  # what the override implies is validated too
        load_config(tmp_path / "c.yaml", ["search.storage=null", *runner_overrides("ray://head:10001")])
    with pytest.raises(argparse.ArgumentTypeError):
        runner_overrides("spark://x")


def test_file_stores_are_refused_for_workers_on_other_machines():
    with pytest.raises(ConfigError) as err:
        parse_config({"runner": {"kind": "dask", "address": "tcp://10.0.0.5:8786"}})
    assert "search.storage" in str(err.value) and "tracking.uri" in str(err.value)
    parse_config(
        {
            "runner": {"kind": "dask", "address": "tcp://10.0.0.5:8786"},
            "search": {"storage": "postgresql+psycopg://u@db/optuna"},
            "tracking": {"uri": "http://mlflow:5000"},
        }
    )  # server stores: accepted


def test_a_runner_that_cannot_work_fails_before_anything_runs():
    cfg = parse_config(
        {
            "runner": {"kind": "dask", "address": "tcp://10.0.0.5:8786"},
            "search": {"storage": "postgresql+psycopg2://u@db/optuna"},
            "tracking": {"uri": "http://mlflow:5000"},
        }
    )
    with pytest.raises(ConfigError) as err:
        search_runner(cfg.search, cfg.runner, cfg.tracking.uri)
    assert "No module named 'psycopg2'" in str(err.value) and "postgresql+psycopg://" in str(err.value)
    assert "Prefect API" in str(err.value)  # none at all, or one on 127.0.0.1 the cluster's machines cannot reach


def test_search_on_a_dask_local_cluster(tmp_path, prefect_api):
    cwd_files = set(os.listdir())
    cache = tmp_path / "worker-cache"
    config = write(tmp_path, runner={"kind": "dask", "data_cache": str(cache)})
    result = optimize(config_path=str(config), root=str(tmp_path))
    uri = f"sqlite:///{tmp_path}/.modelforge/mlflow.db"
    assert_ran_on_workers(trial_runs(uri, "cluster", result["run_id"]), cache)
    study_name = MlflowClient(tracking_uri=uri).get_run(result["run_id"]).data.params["result.search.study_name"]
    journal = f"journal:///{tmp_path}/.modelforge/search/optuna-journal.log"
    assert len(optuna.load_study(study_name=study_name, storage=storage_of(journal)).trials) >= 4
    assert set(os.listdir()) == cwd_files  # no stray mlflow.db or optuna.db where the workers started
    assert (tmp_path / "deploy" / "bundle" / "model.onnx").exists()


def test_a_worker_failure_reaches_the_run_with_its_own_exception(tmp_path, prefect_api):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the worker cache should be")
    config = write(tmp_path, runner={"kind": "dask", "data_cache": str(blocker)})
    with pytest.raises((FileExistsError, NotADirectoryError)):
        optimize(config_path=str(config), root=str(tmp_path))
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/.modelforge/mlflow.db")
    [run] = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("cluster").experiment_id])
    assert run.info.status == "FAILED" and (
        "FileExistsError" in run.data.tags["error"] or "NotADirectoryError" in run.data.tags["error"]
    )


# --- PostgreSQL: Debian's server, started here on 127.0.0.1 -------------------------------------------


@pytest.fixture(scope="module")
def postgres():
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        missing = (
            "PostgreSQL is not installed and could not be (`make test` installs Debian's postgresql "
            "when it runs as root with apt-get)"
        )
        if os.environ.get("CI") == "true":  # CI must run the test, as it must the browser test
            pytest.fail(missing)
        pytest.skip(missing)
    bindir = Path(bins[-1]).parent
    folder = Path(tempfile.mkdtemp(prefix="modelforge-pg-"))
    as_user = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(folder, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run(
        [*as_user, bindir / "initdb", "-D", folder / "db", "-A", "trust", "-U", "modelforge", "-N"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *as_user,
            bindir / "pg_ctl",
            "-D",
            folder / "db",
            "-l",
            folder / "log",
            "-w",
            "start",
            "-o",
            f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off",
        ],
        check=True,
        capture_output=True,
    )
    import psycopg

    with psycopg.connect(f"postgresql://modelforge@127.0.0.1:{port}/postgres", autocommit=True) as conn:
        for db in ("optuna", "mlflow"):
            conn.execute(f"CREATE DATABASE {db}")
    yield f"postgresql+psycopg://modelforge@127.0.0.1:{port}"
    subprocess.run([*as_user, bindir / "pg_ctl", "-D", folder / "db", "-m", "fast", "stop"], capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


def test_search_on_a_dask_cluster_with_postgres_for_optuna_and_mlflow(tmp_path, prefect_api, postgres):
    from distributed import (
        LocalCluster,  # a scheduler at an address, as `dask scheduler` + `dask worker` give
    )

    cache = tmp_path / "worker-cache"
    port = free_port()
    # As the README runs it: an MLflow server on the PostgreSQL store (its REST client is stricter than
    # the SQL store: a number as a tag value once failed every trial there and nowhere else).
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"{postgres}/mlflow",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health", server, 120, "mlflow server")
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
            config = write(
                tmp_path,
                runner={"kind": "dask", "address": cluster.scheduler_address, "data_cache": str(cache)},
                search={**SMALL["search"], "storage": f"{postgres}/optuna"},
                tracking={"uri": uri, "experiment": "pg"},
            )
            started = time.time()
            result = optimize(config_path=str(config), root=str(tmp_path))
        runs = trial_runs(uri, "pg", result["run_id"])
        assert MlflowClient(tracking_uri=uri).get_model_version_by_alias("digits-classifier", "champion")
        assert any((tmp_path / "artifacts").rglob("model.onnx"))  # the server's artifact store, not the project
    finally:
        server.terminate()
        server.wait(30)
    assert_ran_on_workers(runs, cache)
    summaries = optuna.get_all_study_summaries(storage=f"{postgres}/optuna")
    [study] = [s for s in summaries if s.datetime_start and s.datetime_start.timestamp() >= started - 5]
    assert study.n_trials >= 4
    assert not (tmp_path / ".modelforge" / "mlflow.db").exists()  # nothing fell back to a local SQLite store
    assert not (tmp_path / ".modelforge" / "mlartifacts").exists()
