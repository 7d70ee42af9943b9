"""Bring your own model, end to end on the real flow: a user's own module (with pretrained
safetensors weights) and the built-in residual CNN each go search -> train -> structured pruning
through the dependency graph -> INT8 -> export -> validate -> register -> ship -> serve; a model
that cannot work fails before any training with every problem named."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from prefect.testing.utilities import prefect_test_harness
from safetensors.torch import save_file

from deploy.loadtest import request, running_server
from deploy.server import BundleSource, create_app
from tasks.config import ConfigError, ModelConfig, TrainConfig
from tasks.data import load_splits
from tasks.train_model import check_model_inputs

TINY = {
    "search": {"n_trials": 2, "epochs": 2, "space": {"lr": [0.005, 0.02], "optimizers": ["adam"], "depth": [1, 2],
                                                     "channels": [4, 8]}},
    "train": {"max_epochs": 8, "patience": 4},
    "compress": {"candidates": {
        "structured": [{"method": "structured_prune", "amount": 0.5, "finetune_epochs": 2}],
        "int8_static": [{"method": "quantize_static", "calibration_samples": 64}],
    }},
    "validate": {"warmup": 3, "latency_runs": 20, "throughput_runs": 3},
    "gates": {"min_accuracy": 0.7, "max_accuracy_drop": 30.0, "max_latency_ratio": None},
    "tracking": {"experiment": "e2e-user-model"},
}
USER_MODULE = Path(__file__).with_name("user_models.py")


def run_project(root: Path, config: dict) -> dict:
    from flows.optimize import optimize

    (root / "config.yaml").write_text(yaml.safe_dump(config))
    with prefect_test_harness():
        return optimize(config_path=str(root / "config.yaml"), root=str(root))


def shipped_and_served(root: Path) -> dict:
    bundle = root / "deploy" / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    x, y = load_splits(root / "data").test
    with running_server(create_app(BundleSource(bundle), poll_seconds=60)) as (host, port):
        status, body = request(host, port, "POST", "/predict", {"inputs": x[:32].tolist()})
    assert status == 200, body
    assert np.mean(np.array(body["labels"]).astype(int) == y[:32]) > 0.6
    return manifest


@pytest.mark.e2e
def test_a_users_module_with_pretrained_weights_goes_through_the_whole_dag(tmp_path):
    from user_models import small_resnet

    shutil.copy(USER_MODULE, tmp_path / "acme_nets.py")  # the user's own file, in their project folder
    save_file(small_resnet(10, (1, 8, 8)).state_dict(), tmp_path / "pretrained.safetensors")
    report = run_project(tmp_path, {**TINY, "model": {"spec": "acme_nets:small_resnet",
                                                      "weights": "pretrained.safetensors"}})
    manifest = shipped_and_served(tmp_path)
    assert manifest["candidate"] in {"baseline", "structured", "int8_static"}
    with open(tmp_path / ".modelforge" / "reports" / report["run_id"] / "candidates.csv") as f:
        size = {r["candidate"]: float(r["size_kb"]) for r in csv.DictReader(f)}
    assert size["structured"] < 0.6 * size["baseline"]  # physically pruned, through the residual sum and BN
    best = json.loads((tmp_path / ".modelforge" / "search" / "best_params.json").read_text())["params"]
    assert best["family"] == "custom" and best["spec"] == "acme_nets:small_resnet"


@pytest.mark.e2e
def test_the_residual_cnn_family_goes_through_the_whole_dag(tmp_path):
    config = json.loads(json.dumps(TINY))
    config["search"]["space"]["families"] = ["resnet"]
    run_project(tmp_path, config)
    shipped_and_served(tmp_path)
    best = json.loads((tmp_path / ".modelforge" / "search" / "best_params.json").read_text())["params"]
    assert best["family"] == "resnet"


def test_every_problem_of_a_model_is_named_before_training(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(USER_MODULE.parent))
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    problems = {
        "user_models:wrong_signature": "must take (num_classes, input_shape)",
        "user_models:not_a_module": "returned str, not a torch.nn.Module",
        "user_models:ten_logits": "gave (2, 10); the data has 3 classes",
        "no_such_package.nets:make": "cannot import 'no_such_package.nets'",
        "user_models:missing": "has no function 'missing'",
    }
    for spec, expected in problems.items():
        with pytest.raises(ConfigError) as err:
            check_model_inputs(TrainConfig(init_from=tmp_path / "plain.pt"), ModelConfig(spec=spec), 3, (1, 8, 8),
                               tmp_path)
        assert expected in str(err.value) and "2 problem(s)" in str(err.value), str(err.value)
        assert "a plain state_dict: for your own module's weights set model.spec and model.weights" in str(err.value)
    with pytest.raises(ConfigError, match="do not fit the model: missing stem.0.weight"):
        check_model_inputs(TrainConfig(), ModelConfig(spec="user_models:small_resnet", weights=tmp_path / "plain.pt"),
                           3, (1, 8, 8), tmp_path)
