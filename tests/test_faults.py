"""Fault injection: every test here reproduces a defect a fault review found (issue 11) and failed on
the code before its fix. Grouped by what the project guarantees (README, "Reliability")."""

import ast
import contextlib
import dataclasses
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from prefect import flow

from deploy.loadtest import request, running_server
from flows.cli import main
from flows.optimize import optimize
from serve.app import create_app
from serve.settings import ServeSettings
from serve.sources import BundleSource
from tasks.config import parse_config
from tasks.core import tracking
from tasks.core.lock import WorkdirBusy, lock_workdir
from tasks.core.prefect import free_port
from tasks.core.settings import ConfigError
from tasks.core.tracking import TrackingConfig
from tasks.data import DataError, load_splits
from tasks.data.digits import DataConfig, materialize_digits
from tasks.pipeline_run import pipeline_run
from tasks.release.guard import BundleError
from tasks.release.ship import publish_copy
from tasks.search.space import SearchConfig
from tasks.search.study import open_study, resolve_storage
from tasks.search.summary import SearchError, summarize_search
from tasks.search.trials import TrialTracking, run_trials
from tasks.train.stage import train_model_task

ROOT = Path(__file__).resolve().parents[1]
TINY_SPACE = {"families": ["mlp"], "optimizers": ["adam"], "depth": [1, 1], "width": [32, 48], "batch_sizes": [32]}


def user_folder(path: Path) -> dict[str, bytes]:
    """A folder of someone's own files, two of them named like a bundle's."""
    path.mkdir(parents=True)
    files = {"notes.txt": b"my notes", "manifest.json": b'{"project": "mine"}', "model.onnx": b"my own model"}
    for name, data in files.items():
        (path / name).write_bytes(data)
    return files


def contents(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir()}


def tamper(model: Path) -> None:
    """Flip 64 bytes in the middle of the weights, in place (same file, same manifest)."""
    data = bytearray(model.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    model.write_bytes(bytes(data))


# --- 1. A ship, promotion or rollback never deletes a folder modelforge did not write ----------------


def test_publishing_onto_a_user_folder_is_refused_and_every_file_kept(cnn_bundle, tmp_path):
    files = user_folder(tmp_path / "mine")
    with pytest.raises(BundleError, match="not a bundle modelforge wrote"):
        publish_copy(cnn_bundle, tmp_path / "mine")
    assert contents(tmp_path / "mine") == files
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temp or "-old" folder left behind


def test_a_bundle_holding_user_files_is_not_replaced(cnn_bundle, tmp_path):
    target = publish_copy(cnn_bundle, tmp_path / "served")
    (target / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match=r"notes\.txt"):
        publish_copy(cnn_bundle, target)
    assert (target / "notes.txt").read_text() == "mine"


def test_own_and_pre_marker_bundles_are_replaced(cnn_bundle, tmp_path):
    manifest = json.loads((cnn_bundle / "manifest.json").read_text())
    assert manifest["format"] == "modelforge-bundle/1"
    target = publish_copy(cnn_bundle, tmp_path / "served")
    publish_copy(cnn_bundle, target)  # its own bundle: replaced
    del manifest["format"]  # as written before the marker existed: its model's sha256 proves it
    (target / "manifest.json").write_text(json.dumps(manifest))
    publish_copy(cnn_bundle, target)
    assert json.loads((target / "manifest.json").read_text())["format"] == "modelforge-bundle/1"


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"register": {"bundle_dir": "."}}, "register.bundle_dir: .* is the project folder itself"),
        ({"register": {"bundle_dir": ".."}}, "register.bundle_dir: .* is outside the project"),
        ({"promote": {"champion_bundle_dir": "/tmp"}}, "promote.champion_bundle_dir: /tmp is outside"),
        ({"workdir": "../elsewhere"}, "workdir: .* is outside the project"),
        ({"data": {"dir": "/etc"}}, "data.dir: /etc is outside the project"),
        (
            {"register": {"bundle_dir": "deploy"}, "promote": {"champion_bundle_dir": "deploy/champion"}},
            "register.bundle_dir: .* would contain promote.champion_bundle_dir",
        ),
    ],
)
def test_unsafe_paths_are_a_config_error(tmp_path, raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(raw).resolved(tmp_path)


def test_every_unsafe_path_is_reported_at_once(tmp_path):
    user_folder(tmp_path / "deploy" / "champion")
    with pytest.raises(ConfigError) as err:
        parse_config({"workdir": "/var/tmp/x", "register": {"bundle_dir": ".."}}).resolved(tmp_path)
    assert "5 problem(s)" in str(err.value) and "register.bundle_dir: " in str(err.value)
    assert "promote.champion_bundle_dir" in str(err.value) and "not a bundle modelforge wrote" in str(err.value)


def test_rollback_onto_a_user_folder_changes_nothing(tmp_path, capsys):
    files = user_folder(tmp_path / "mine")
    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump({"promote": {"champion_bundle_dir": "mine"}, "tracking": {"uri": f"sqlite:///{tmp_path}/m.db"}})
    )
    assert main(["rollback", "--config", str(tmp_path / "c.yaml"), "--root", str(tmp_path)]) == 2
    assert "not a bundle modelforge wrote" in capsys.readouterr().err
    assert contents(tmp_path / "mine") == files


# --- 2. The server serves only the model its manifest describes -------------------------------------


def test_server_refuses_to_start_on_a_tampered_model(cnn_bundle, tmp_path):
    served = publish_copy(cnn_bundle, tmp_path / "served")
    tamper(served / "model.onnx")
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "serve", "--bundle", str(served), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and "does not match the manifest" in proc.stderr, proc.stderr[-2000:]


def test_tampered_model_at_reload_keeps_the_verified_one_serving(cnn_bundle, tmp_path, splits):
    served = publish_copy(cnn_bundle, tmp_path / "served")
    x = {"inputs": splits.test[0][:3].tolist()}
    with running_server(create_app(BundleSource(served), ServeSettings(poll_seconds=0.05))) as (host, port):
        before = request(host, port, "POST", "/predict", x)[1]
        tamper(served / "model.onnx")  # the manifest is unchanged: only the model file says so
        time.sleep(0.5)
        _status, _reload = request(host, port, "POST", "/reload")
        health = request(host, port, "GET", "/health")[1]
        after = request(host, port, "POST", "/predict", x)[1]
    assert "does not match the manifest" in (health["last_reload_error"] or ""), health
    assert health["reloads"] == 0 and after["logits"] == before["logits"]


def test_model_info_shows_no_absolute_paths(cnn_bundle, tmp_path):
    with running_server(create_app(BundleSource(publish_copy(cnn_bundle, tmp_path / "served")))) as (host, port):
        info = request(host, port, "GET", "/model-info")[1]
    assert info["metrics"]["onnx"] == "model.onnx"
    assert not re.search(r'"/[^"]', json.dumps(info)), info


# --- 8. Bad requests are a 4xx, never a 500, and a large body is refused before it is read -----------


@pytest.fixture(scope="module")
def strict_server(cnn_bundle, tmp_path_factory):
    served = publish_copy(cnn_bundle, tmp_path_factory.mktemp("strict") / "served")
    with running_server(create_app(BundleSource(served), ServeSettings(max_body_bytes=1_000_000))) as (host, port):
        yield host, port


def post(
    host: str, port: int, body, content_type: str = "application/json", chunked: bool = False, path: str = "/predict"
) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type}, encode_chunked=chunked)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def sample(value) -> str:
    pixels = np.zeros((1, 1, 8, 8)).tolist()
    pixels[0][0][0][0] = "@"
    return json.dumps({"inputs": pixels}).replace('"@"', value)


def v2(datatype="FP32", shape=(1, 1, 8, 8), data=None, name="input", **extra) -> bytes:
    """An Open Inference Protocol v2 request for the served digits model."""
    data = np.zeros(shape).tolist() if data is None else data
    return json.dumps(
        {"inputs": [{"name": name, "datatype": datatype, "shape": list(shape), "data": data, **extra}]}
    ).encode()


INFER = "/v2/models/model/infer"
JSON = "application/json"


# One table of malformed requests for every protocol the server speaks: each is a clear 4xx naming
# the problem, and the server answers the next request.
@pytest.mark.parametrize(
    "path, body, content_type, status, message",
    [
        ("/predict", b"{not json", JSON, 400, "not valid JSON"),
        ("/predict", json.dumps({"data": []}).encode(), JSON, 400, '"inputs"'),
        ("/predict", json.dumps({"inputs": [[1, 2], [3]]}).encode(), JSON, 400, "rectangular"),
        ("/predict", json.dumps({"inputs": "eight by eight"}).encode(), JSON, 400, "only numbers"),
        (
            "/predict",
            json.dumps({"inputs": np.zeros((2, 64)).tolist()}).encode(),
            JSON,
            400,
            "expected ['batch', 1, 8, 8]",
        ),
        ("/predict", json.dumps({"inputs": np.zeros((2, 1, 8, 7)).tolist()}).encode(), JSON, 400, "shape [2, 1, 8, 7]"),
        ("/predict", json.dumps({"inputs": []}).encode(), JSON, 400, "shape [0]"),
        ("/predict", sample("NaN").encode(), JSON, 400, "NaN is not a number JSON allows"),
        ("/predict", json.dumps({"inputs": np.zeros((1025, 1, 8, 8)).tolist()}).encode(), JSON, 413, "limit of 1024"),
        ("/predict", b'{"inputs": ' + b"[" * 1000 + b"1" + b"]" * 1000 + b"}", JSON, 400, "nested"),
        ("/predict", sample("1" * 400).encode(), JSON, 400, "400 digits"),
        ("/predict", sample('"0.5"').encode(), JSON, 400, "only numbers"),
        ("/predict", sample("true").encode(), JSON, 400, "only numbers, found bool"),
        ("/predict", sample("1").encode(), "text/plain", 415, "application/json"),
        ("/predict", sample("1e39").encode(), JSON, 400, "float32"),
        ("/predict", json.dumps({"inputs": np.full((1, 1, 8, 8), 3e38).tolist()}).encode(), JSON, 400, "not finite"),
        ("/predict", b'{"inputs": [' + b"0.5, " * 400_000 + b"0.5]}", JSON, 413, "limit of 1000000 bytes"),
        ("/embed", json.dumps({"texts": ["a"]}).encode(), JSON, 400, "this bundle is a classifier"),
        (INFER, b"{not json", JSON, 400, "not valid JSON"),
        (INFER, json.dumps({"inputs": {}}).encode(), JSON, 400, '"inputs" array'),
        (INFER, v2(name="pixels"), JSON, 400, "inputs must be exactly ['input']"),
        (INFER, v2(datatype="INT64"), JSON, 400, "datatype INT64, the model expects FP32"),
        (INFER, v2(shape=(1, 64)), JSON, 400, "shape [1, 64], the model expects [-1, 1, 8, 8]"),
        (INFER, v2(data=[0.5] * 63), JSON, 400, "63 values do not fill shape [1, 1, 8, 8]"),
        (INFER, v2(data=["0.5"] * 64), JSON, 400, "must hold only numbers"),
        (INFER, v2(data=[1e39] * 64), JSON, 400, "NaN or infinity"),
        (INFER, v2(shape=(1025, 1, 8, 8), data=[]), JSON, 413, "limit of 1024"),
        (INFER, v2(data=None, parameters={"binary_data_size": 256}), JSON, 400, "runs past the body"),
        (INFER, v2(data=[3e38] * 64), JSON, 400, "not finite"),
        ("/v2/models/other/infer", v2(), JSON, 404, "unknown model 'other'"),
    ],
)
def test_malformed_requests_are_a_clear_4xx(strict_server, path, body, content_type, status, message):
    got_status, got = post(*strict_server, body, content_type, path=path)
    assert got_status == status and message in got["error"], got
    assert request(*strict_server, "GET", "/health")[0] == 200


@pytest.fixture(scope="module")
def table_bundle(train_cfg, tmp_path_factory) -> tuple[Path, dict]:
    """A bundle trained (briefly) on the wine table, which takes raw records, and one such record."""
    import pandas as pd
    from conftest import train_small

    from tasks.compress.recipe import compress_candidate
    from tasks.data.table import TableDataConfig, describe_table
    from tasks.examples import wine
    from tasks.models import Arch
    from tasks.release.evaluate import ClassifierEval
    from tasks.release.ship import ship_bundle

    tmp = tmp_path_factory.mktemp("table")
    data = wine(tmp / "data").parent
    record = json.loads(pd.read_csv(data / "data.csv").drop(columns="label").iloc[:1].to_json(orient="records"))[0]
    describe_table(TableDataConfig(dataset="table", label="label"), data)
    splits = load_splits(data)
    ckpt = train_small(Arch("mlp", 3, tuple(splits.train[0].shape[1:]), hidden=(16,)), splits, tmp / "m.pt", epochs=3)
    onnx_path = compress_candidate("baseline", [], ckpt, data, train_cfg, tmp / "c").onnx
    return ship_bundle(onnx_path, tmp / "bundle", ClassifierEval(data), "v1.dir", {"candidate": "baseline"}), record


@pytest.mark.parametrize("value", ["3.5e38", "1e39", "1e308", "-1e308", "9" * 4000])
def test_a_table_record_beyond_float32_is_a_400_naming_the_column(table_bundle, value):
    """Issue 25, item 3: these were a 500 ("Out of range float values are not JSON compliant")."""
    bundle, record = table_bundle
    with running_server(create_app(BundleSource(bundle), ServeSettings(poll_seconds=60))) as (host, port):
        assert post(host, port, json.dumps({"records": [record]}).encode())[0] == 200
        record = json.dumps({"records": [{**record, "alcohol": "@"}]}).replace('"@"', value)
        status, got = post(host, port, record.encode())
        assert status == 400 and "record 0: column 'alcohol'" in got["error"] and "float32" in got["error"], got
        assert request(host, port, "GET", "/health")[0] == 200


def test_a_chunked_body_over_the_limit_is_cut_off(strict_server):
    chunks = (b"[" + b"0.5, " * 20_000 + b"0.5]," for _ in range(40))  # no Content-Length to check up front
    status, got = post(*strict_server, chunks, chunked=True)
    assert status == 413 and "exceeds the limit" in got["error"]


def test_a_valid_sample_still_predicts(strict_server):
    status, got = post(*strict_server, sample("1").encode())
    assert status == 200 and len(got["predictions"]) == 1


def test_a_slow_inference_does_not_stall_the_event_loop(cnn_bundle, tmp_path, splits):
    class SlowSession:  # the real session, one second slower per call (sleep releases the GIL, as ORT does)
        def __init__(self, session):
            self.session = session

        def run(self, *args):
            time.sleep(1.0)
            return self.session.run(*args)

        def __getattr__(self, name):
            return getattr(self.session, name)

    app = create_app(BundleSource(publish_copy(cnn_bundle, tmp_path / "served")))
    with running_server(app) as (host, port):
        holder = app.state.ctx.holder
        holder.model = dataclasses.replace(holder.model, session=SlowSession(holder.model.session))
        slow = threading.Thread(
            target=request, args=(host, port, "POST", "/predict", {"inputs": splits.test[0][:1].tolist()})
        )
        slow.start()
        time.sleep(0.3)
        start = time.monotonic()
        assert request(host, port, "GET", "/health")[0] == 200
        waited = time.monotonic() - start
        slow.join()
    assert waited < 0.5, f"/health waited {waited:.2f}s behind a running inference"


# --- 3, 4. Ctrl-C and SIGTERM stop a run cleanly; a SIGKILLed run is closed by the next one ----------


class Run:
    """`modelforge run` in its own session with SIGINT restored, as a terminal would start it (a
    background job of a non-interactive shell would ignore SIGINT)."""

    def __init__(self, root: Path, config: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--root", str(root)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def wait_for(self, pattern: str, timeout: float = 240) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.kill()
        pytest.fail(f"no {pattern!r} in the output:\n" + "".join(self.lines[-40:]))

    def stop(self, sig: int, group: bool) -> tuple[int, float]:
        """Send `sig` (to the whole process group, as a terminal's Ctrl-C does, or to the process, as
        `kill` does); return the exit code and the seconds until the process was gone."""
        server = int(self.wait_for(r"temporary server pid (\d+)").group(1))
        start = time.monotonic()
        os.killpg(self.proc.pid, sig) if group else self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail("the run did not stop within 60 s:\n" + "".join(self.lines[-40:]))
        took = time.monotonic() - start
        for _ in range(50):  # the temporary Prefect server goes with the run, even a SIGKILLed one
            try:
                os.kill(server, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            os.kill(server, signal.SIGKILL)
            pytest.fail(f"the temporary Prefect server (pid {server}) outlived the run")
        return rc, took

    def said(self, rc: int, took: float) -> str:
        """The exit code, the seconds it took and the run's last lines (what a failed assertion shows)."""
        return f"exit code {rc} after {took:.1f} s; the run's last lines:\n" + "".join(self.lines[-60:])

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def finished_trials(root: Path) -> int:
    [db] = (root / ".modelforge" / "search").glob("optuna.db")
    [summary] = optuna.get_all_study_summaries(f"sqlite:///{db}")
    return len(
        optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{db}").get_trials(
            states=(TrialState.COMPLETE,)
        )
    )


@pytest.mark.e2e
def test_signals_stop_the_run_cleanly_and_a_rerun_resumes(tmp_path):
    config = tmp_path / "long.yaml"
    config.write_text(
        yaml.safe_dump(
            {"search": {"n_trials": 1000, "epochs": 15, "space": TINY_SPACE}, "tracking": {"experiment": "signals"}}
        )
    )
    # Ctrl-C in a terminal: SIGINT to the whole process group.
    first = Run(tmp_path, config)
    first.wait_for(r"\[search\] trial 2/1000")
    rc, took = first.stop(signal.SIGINT, group=True)
    assert rc == 130 and took < 15, first.said(rc, took)
    assert "interrupted (stopped by SIGINT)" in "".join(first.lines)
    kept = finished_trials(tmp_path)
    assert kept >= 2

    # The rerun resumes with every finished trial kept; then it is SIGKILLed (nothing can clean up).
    second = Run(tmp_path, config)
    second.wait_for(rf"resuming study .*: {kept}/1000 trials already finished")
    second.wait_for(rf"\[search\] trial {kept + 1}/1000")
    assert second.stop(signal.SIGKILL, group=True)[0] == -signal.SIGKILL

    # The next run closes the orphan; `kill` (SIGTERM to the process alone) stops it cleanly too.
    third = Run(tmp_path, config)
    third.wait_for(r"marked 1 orphaned run\(s\) FAILED")
    rc, took = third.stop(signal.SIGTERM, group=False)
    assert rc == 143 and took < 15, third.said(rc, took)

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/.modelforge/mlflow.db")
    client = MlflowClient()
    every = client.search_runs(
        [client.get_experiment_by_name("signals").experiment_id], order_by=["attributes.start_time ASC"]
    )
    parents = [r for r in every if "mlflow.parentRunId" not in r.data.tags]
    expected = [("KILLED", "stopped by SIGINT"), ("FAILED", "orphaned: its process"), ("KILLED", "stopped by SIGTERM")]
    assert [r.info.status for r in parents] == [status for status, _ in expected]
    for run, (_, reason) in zip(parents, expected, strict=True):
        assert reason in run.data.tags["error"], run.data.tags["error"]
    assert not [r for r in every if r.info.status == "RUNNING"]  # no trial run left RUNNING either
    interrupted = [
        r
        for r in every
        if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id and r.info.status != "FINISHED"
    ]
    assert [r.info.status for r in interrupted] == ["KILLED"]  # the trial that was training


def test_a_signal_in_the_middle_of_a_tracking_write_leaves_the_store_writable(tmp_path):
    """A signal's exception lands in the main thread between any two bytecodes, SQLAlchemy transactions
    included; the run must still close at once (CI saw SQLite left locked: the closing write waited 20 s, then
    failed, and the stopped run exited 1 with its MLflow run left RUNNING)."""
    from tasks.core.stop import RunInterrupted

    experiment = tracking.setup_tracking(
        tracking.TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="x", artifact_dir=tmp_path / "a")
    )

    def interrupt(_signum, _frame):
        raise RunInterrupted("stopped by SIGALRM")

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        for i in range(40):
            run_id = tracking.start_run(experiment, f"run {i}")
            with contextlib.suppress(RunInterrupted):
                # Alarms spread over the writes' own timing (~1-10 ms each), so they land in every part of it.
                signal.setitimer(signal.ITIMER_REAL, 0.001 + 0.0007 * i)
                for step in range(10_000):  # until the alarm
                    tracking.log_params(run_id, {f"p{step}.{j}": j for j in range(20)})
                    tracking.log_text(run_id, "x" * 1000, f"t{step}.txt")
            start = time.monotonic()
            tracking.fail_run(run_id, RunInterrupted("stopped by SIGALRM"), "KILLED")
            assert time.monotonic() - start < 5
            assert MlflowClient().get_run(run_id).info.status == "KILLED"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- 5. Failures surface with their real exception and do not eat the next run's budget --------------


def search_cfg(**kw) -> SearchConfig:
    return SearchConfig(epochs=1, space=TINY_SPACE, **kw)


def test_failures_of_an_earlier_run_do_not_use_up_the_budget(data_dir, tmp_path):
    cfg = search_cfg(n_trials=2)
    study = open_study(cfg, "s", resolve_storage(cfg, tmp_path))
    for _ in range(3):  # an earlier run whose trials all failed (a bug since fixed)
        study.tell(study.ask(), state=TrialState.FAIL)
    assert run_trials(cfg, data_dir, tmp_path, "s") == 2
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2


def test_a_failure_outside_training_reports_its_real_error(data_dir, tmp_path):
    tracking.setup_tracking(TrackingConfig(uri=f"sqlite:///{tmp_path}/m.db", artifact_dir=tmp_path / "a"))
    cfg = search_cfg(n_trials=1)
    run_trials(
        cfg, data_dir, tmp_path, "s", TrialTracking(f"sqlite:///{tmp_path}/m.db", "424242", "none")
    )  # no such experiment
    with pytest.raises(SearchError) as err:
        summarize_search(cfg, tmp_path, "s")
    assert "trial 0: MlflowException" in str(err.value) and "?" not in str(err.value)


def tiny_project(root: Path, **sections) -> Path:
    raw = {
        "search": {"n_trials": 1, "epochs": 1, "space": TINY_SPACE},
        "train": {"max_epochs": 2},
        "compress": {"candidates": {}},
        "tracking": {"experiment": "faults"},
        **sections,
    }
    (root / "c.yaml").write_text(yaml.safe_dump(raw))
    return root / "c.yaml"


@pytest.mark.e2e
def test_an_unreachable_study_storage_fails_the_run_with_its_own_error(prefect_api, tmp_path):
    config = tiny_project(
        tmp_path, search={"n_trials": 1, "space": TINY_SPACE, "storage": "postgresql+psycopg://u@127.0.0.1:9/none"}
    )
    with pytest.raises(Exception) as err:  # no database listens on port 9
        optimize(config_path=str(config), root=str(tmp_path))
    # Before: AttributeError: 'NoneType' object has no attribute 'flat'. Now the real error, raised where the
    # study is first opened, before any worker starts (test_connect_runner's
    # test_a_worker_failure_reaches_the_run_with_its_own_exception covers one raised inside a Dask worker).
    from sqlalchemy.exc import OperationalError

    assert isinstance(err.value, OperationalError) and "127.0.0.1" in str(err.value), repr(err.value)


# --- 6. One run at a time per work dir ----------------------------------------------------------------


def test_a_second_run_on_a_busy_workdir_names_the_run_that_holds_it(prefect_api, tmp_path):
    config = tiny_project(tmp_path)
    with lock_workdir(tmp_path / ".modelforge", "optimize --config other.yaml") as note:
        note(mlflow_run="abc123")
        with pytest.raises(WorkdirBusy, match=r"in use by optimize --config other.yaml, mlflow_run abc123 \(pid"):
            optimize(config_path=str(config), root=str(tmp_path))
    assert not (tmp_path / "data").exists()  # refused before any stage ran


# --- 7. Labels and manifests are checked before training, not after registering --------------------


def test_two_d_labels_and_a_missing_manifest_key_are_one_data_error(tmp_path):
    materialize_digits(DataConfig(), tmp_path)
    np.save(tmp_path / "val_y.npy", np.load(tmp_path / "val_y.npy")[:, None])  # (N, 1): broadcasts in pred == y
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest["preprocessing"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError) as err:
        load_splits(tmp_path)
    assert "val_y: labels have shape [270, 1]" in str(err.value) and "missing 'preprocessing'" in str(err.value)


# --- 9. Config: every problem in one pass; a failed run is filed where the config says -----------------


def test_field_and_cross_field_problems_are_reported_together():
    with pytest.raises(ConfigError) as err:
        parse_config({"search": {"objectives": ["accuracy", "latency"], "pruner": "median", "n_trials": 0}})
    assert "search.n_trials" in str(err.value) and "multi-objective studies cannot prune" in str(err.value)
    assert "(2 problem(s))" in str(err.value)


def test_a_bad_config_is_filed_under_the_experiment_it_names(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"train": {"patience": "soon"}, "tracking": {"experiment": "mine"}}))
    with pytest.raises(ConfigError), pipeline_run(config, tmp_path):
        pass
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/.modelforge/mlflow.db")
    [run] = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("mine").experiment_id])
    assert run.info.status == "FAILED" and "train.patience" in run.data.tags["error"]


# --- 10. No pickles: task results are JSON, checkpoints load weights only ----------------------------


def test_the_cached_training_result_is_json(prefect_api, data_dir, train_cfg, tmp_path):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    best = {
        "family": "mlp",
        "lr": 0.01,
        "optimizer": "adam",
        "depth": 1,
        "width": 16,
        "activation": "relu",
        "dropout": 0.0,
        "channels": 8,
        "kernel": 3,
    }

    @flow
    def train_twice():
        return [train_model_task(train_cfg, best, data_dir, "faults-v1", tmp_path) for _ in range(2)]

    first, second = train_twice()
    assert first == second and first.checkpoint.is_file()
    [record] = [p for p in Path(PREFECT_LOCAL_STORAGE_PATH.value()).iterdir() if p.name.startswith("train-faults-v")]
    assert json.loads(record.read_text())["metadata"]["serializer"]["type"] == "json"


def test_every_torch_load_is_weights_only():
    calls = []
    for path in [
        *ROOT.glob("tasks/**/*.py"),
        *ROOT.glob("flows/*.py"),
        *ROOT.glob("deploy/*.py"),
        *ROOT.glob("bench/*.py"),
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                safe = any(k.arg == "weights_only" and ast.unparse(k.value) == "True" for k in node.keywords)
                calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", safe))
    assert calls and all(safe for _, safe in calls), calls
