"""End to end: the real Prefect flow on a tiny config in a throw-away project folder."""

import json

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows.optimize import optimize
from tasks.core.settings import ConfigError
from tasks.data import DataError, load_splits
from tasks.data.digits import DataConfig, materialize_digits
from tasks.data.version import read_data_md5
from tasks.release.ship import sha256_of
from tasks.release.validate import GateError

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("prefect_api")]

TINY = {
    "search": {
        "n_trials": 2,
        "epochs": 2,
        "space": {"families": ["cnn"], "lr": [0.005, 0.02], "optimizers": ["adam"], "depth": [1, 1]},
    },
    "train": {"max_epochs": 10, "patience": 4},
    "compress": {
        "candidates": {
            "int8_static": [{"method": "quantize_static", "calibration_samples": 64}],
            # Deliberately crippled: 1 epoch, 10% width. The accuracy gate must reject it.
            "tiny_student": [{"method": "distill", "width_factor": 0.1, "epochs": 1}],
        }
    },
    "validate": {"warmup": 3, "latency_runs": 20, "throughput_runs": 3},
    "gates": {"max_accuracy_drop": 2.0, "min_accuracy": 0.8, "max_latency_ratio": None},
    "register": {"model_name": "tiny-digits"},
    "tracking": {"experiment": "e2e"},
}


def write_config(root, overrides=None):
    cfg = json.loads(json.dumps(TINY))
    for section, values in (overrides or {}).items():
        cfg.setdefault(section, {}).update(values)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def runs(root, experiment="e2e"):
    mlflow.set_tracking_uri(f"sqlite:///{root}/.modelforge/mlflow.db")
    exp = MlflowClient().get_experiment_by_name(experiment)
    return MlflowClient().search_runs([exp.experiment_id]) if exp else []


def test_full_run_ships_a_gated_registered_model(tmp_path):
    result = optimize(config_path=str(write_config(tmp_path)), root=str(tmp_path))

    # Bundle: model + manifest, checksum and data version consistent with DVC.
    bundle = tmp_path / "deploy" / "bundle"
    assert sorted(p.name for p in bundle.iterdir()) == ["manifest.json", "model.onnx"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["sha256"] == sha256_of(bundle / "model.onnx")
    assert manifest["data_version"] == read_data_md5(tmp_path / "data.dvc") == result["data_version"]
    assert manifest["candidate"] == result["chosen"] != "tiny_student"

    # MLflow: one FINISHED parent with the data version, one nested run per trial.
    all_runs = runs(tmp_path)
    parent = next(r for r in all_runs if r.info.run_id == result["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["data_version"] == result["data_version"]
    assert parent.data.tags["chosen_candidate"] == result["chosen"]
    # What the MLflow UI's runs table shows: the data version as a dataset, a name saying what the run
    # did, the config file as its source.
    [dataset] = MlflowClient().get_run(parent.info.run_id).inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.digest) == ("data", result["data_version"][:36])
    assert json.loads(dataset.dataset.source)["uri"] == str((tmp_path / "data").resolve())
    assert parent.info.run_name.startswith(f"{result['data_version'][:8]} {result['chosen']} accuracy 0.")
    assert parent.data.tags["mlflow.source.name"].endswith("config.yaml")
    trials = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    assert parent.data.metrics["baseline.passed"] == 1.0
    assert parent.data.metrics["tiny_student.passed"] == 0.0  # the gate rejected the crippled student
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id, "candidates")}
    assert {"candidates/candidates.png", "candidates/candidates.csv", "candidates/reports.json"} <= artifacts
    reports = json.loads(mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/candidates/reports.json"))
    student = next(r for r in reports if r["name"] == "tiny_student")
    assert any("accuracy drop" in g for g in student["failed_gates"])

    # Registry: the alias serves the same model that was shipped, with the measured accuracy.
    version = MlflowClient().get_model_version_by_alias("tiny-digits", "candidate")
    assert str(version.version) == result["version"]
    model = mlflow.pyfunc.load_model("models:/tiny-digits@candidate")
    x, y = load_splits(tmp_path / "data").test
    logits = np.asarray(model.predict(x)["logits"])
    assert float((logits.argmax(1) == y).mean()) == pytest.approx(manifest["metrics"]["accuracy"])

    # First model in the registry: promoted to champion, and its bundle is what the server loads.
    assert result["promoted"] and result["promotion_reason"] == "no champion yet"
    assert str(MlflowClient().get_model_version_by_alias("tiny-digits", "champion").version) == result["version"]
    champion = json.loads((tmp_path / "deploy" / "champion" / "manifest.json").read_text())
    assert champion["sha256"] == manifest["sha256"]

    # Same data, config and code again: the nightly run finds nothing new, says so and ships nothing.
    again = optimize(config_path=str(write_config(tmp_path)), root=str(tmp_path))
    assert again["equivalent_run"] == result["run_id"] and "unchanged" in again["skipped"]
    skipped = MlflowClient().get_run(again["run_id"])
    assert skipped.info.status == "FINISHED" and "skipped" in skipped.data.tags
    assert len(MlflowClient().search_model_versions("name = 'tiny-digits'")) == 1
    # A config change is not "nothing new".
    changed = optimize(
        config_path=str(write_config(tmp_path, {"gates": {"max_accuracy_drop": 2.5}})), root=str(tmp_path)
    )
    assert "skipped" not in changed and changed["version"] == "2"
    assert len([r for r in runs(tmp_path) if r.data.tags.get("mlflow.parentRunId") == changed["run_id"]]) == 0


def failed_run(root, experiment="e2e"):
    failed = [r for r in runs(root, experiment) if r.info.status == "FAILED"]
    assert len(failed) == 1
    return failed[0]


def test_bad_config_fails_the_run_before_anything_else(tmp_path):
    path = write_config(tmp_path, {"train": {"patience": "soon", "epochs_max": 3}})
    with pytest.raises(ConfigError) as err:
        optimize(config_path=str(path), root=str(tmp_path))
    assert "train.patience" in str(err.value) and "train.epochs_max" in str(err.value)
    run = failed_run(tmp_path)  # filed under the experiment the config names: its tracking section is valid
    assert "train.patience" in run.data.tags["error"]
    assert not (tmp_path / "deploy").exists() and not (tmp_path / "data").exists()


def test_bad_data_fails_before_training(tmp_path):
    materialize_digits(DataConfig(), tmp_path / "data")
    x = np.load(tmp_path / "data" / "val_x.npy")
    x[3] = np.nan
    np.save(tmp_path / "data" / "val_x.npy", x)
    with pytest.raises(DataError, match="val_x: 64 NaN"):
        optimize(config_path=str(write_config(tmp_path)), root=str(tmp_path))
    assert "DataError" in failed_run(tmp_path).data.tags["error"]
    assert not (tmp_path / ".modelforge" / "search").exists() and not (tmp_path / "deploy").exists()


def test_unreadable_init_checkpoint_fails_before_training(tmp_path):
    (tmp_path / "init.pt").write_text("garbage")
    path = write_config(tmp_path, {"train": {"init_from": "init.pt"}})
    with pytest.raises(ValueError, match=r"init\.pt is not a readable modelforge checkpoint"):
        optimize(config_path=str(path), root=str(tmp_path))
    failed_run(tmp_path)
    assert not (tmp_path / ".modelforge" / "search").exists()


def test_no_passing_candidate_fails_loudly_and_ships_nothing(tmp_path):
    path = write_config(tmp_path, {"gates": {"min_accuracy": 1.0}})
    with pytest.raises(GateError, match="no candidate passed the gates"):
        optimize(config_path=str(path), root=str(tmp_path))
    run = failed_run(tmp_path)
    assert "GateError" in run.data.tags["error"]
    # The evidence is still there: the candidate table was logged before the gate failed the run.
    assert "candidates/candidates.md" in {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "candidates")}
    assert not (tmp_path / "deploy").exists()


def test_config_of_another_family_is_refused(tmp_path):
    path = tmp_path / "minilm.yaml"
    path.write_text("family: minilm\n")
    with pytest.raises(ConfigError, match="configures the 'minilm' pipeline, not 'classifier'"):
        optimize(config_path=str(path), root=str(tmp_path))
    [run] = runs(tmp_path, "modelforge")
    assert run.info.status == "FAILED" and "minilm" in run.data.tags["error"]
