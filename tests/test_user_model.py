"""Bring your own model, end to end on the real flow: a user's own module (with pretrained
safetensors weights) and the built-in residual CNN each go search -> train -> structured pruning
through the dependency graph -> INT8 -> export -> validate -> register -> ship -> serve; a model
that cannot work fails before any training with every problem named."""

import csv
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from conftest import serve_bundle
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from tasks.core.settings import ConfigError
from tasks.data import load_splits
from tasks.data.base import read_manifest
from tasks.data.text import split_texts
from tasks.models import ModelConfig
from tasks.train.loop import TrainParams, fit
from tasks.train.stage import TrainConfig, check_model_inputs

TINY = {
    "search": {
        "n_trials": 2,
        "epochs": 2,
        "space": {"lr": [0.005, 0.02], "optimizers": ["adam"], "depth": [1, 2], "channels": [4, 8]},
    },
    "train": {"max_epochs": 8, "patience": 4},
    "compress": {
        "candidates": {
            "structured": [{"method": "structured_prune", "amount": 0.5, "finetune_epochs": 2}],
            "int8_static": [{"method": "quantize_static", "calibration_samples": 64}],
        }
    },
    "validate": {"warmup": 3, "latency_runs": 20, "throughput_runs": 3},
    "gates": {"min_accuracy": 0.7, "max_accuracy_drop": 30.0, "max_latency_ratio": None},
    "tracking": {"experiment": "e2e-user-model"},
}
USER_MODULE = Path(__file__).with_name("user_models.py")


def run_project(root: Path, config: dict) -> dict:
    from flows.optimize import optimize

    (root / "config.yaml").write_text(yaml.safe_dump(config))
    return optimize(config_path=str(root / "config.yaml"), root=str(root))


def candidates(root: Path, report: dict) -> dict[str, dict]:
    """The run's candidate table, by candidate name."""
    with open(root / ".modelforge" / "reports" / report["run_id"] / "candidates.csv") as f:
        return {r["candidate"]: r for r in csv.DictReader(f)}


def shipped_and_served(root: Path) -> dict:
    bundle = root / "deploy" / "bundle"
    x, y = load_splits(root / "data").test
    assert serve_bundle(bundle, {"inputs": x[:32].tolist()}, y[:32].tolist())[1] > 0.6
    return json.loads((bundle / "manifest.json").read_text())


def first_epoch_losses(root: Path, report: dict) -> list[float]:
    """The mean train loss of the first epoch of every search trial and of the final training."""
    mlflow.set_tracking_uri(f"sqlite:///{root}/.modelforge/mlflow.db")
    client = MlflowClient()
    trials = client.search_runs(
        [client.get_run(report["run_id"]).info.experiment_id], f"tags.mlflow.parentRunId = '{report['run_id']}'"
    )
    losses = [client.get_metric_history(t.info.run_id, "train_loss")[0].value for t in trials]
    [history] = (root / ".modelforge").rglob("train_history.json")
    return [*losses, json.loads(history.read_text())[0]["train_loss"]]


@pytest.mark.e2e
def test_a_users_module_with_pretrained_weights_goes_through_the_whole_dag(tmp_path, prefect_api, splits):
    from user_models import small_resnet

    shutil.copy(USER_MODULE, tmp_path / "acme_nets.py")  # the user's own file, in their project folder
    # Recognisable weights: already trained on the digits, so a first epoch from them has a train loss
    # (about 0.5) no first epoch from a fresh initialisation comes near (about 2).
    torch.manual_seed(0)
    pretrained = small_resnet(10, (1, 8, 8))
    fit(pretrained, splits.train, splits.val, TrainParams(lr=0.01, optimizer="adam", epochs=4, patience=4))
    save_file(pretrained.state_dict(), tmp_path / "pretrained.safetensors")
    report = run_project(
        tmp_path, {**TINY, "model": {"spec": "acme_nets:small_resnet", "weights": "pretrained.safetensors"}}
    )
    losses = first_epoch_losses(tmp_path, report)
    assert len(losses) == 3 and max(losses) < 1.2, losses  # both trials and the final training started from them
    shipped_and_served(tmp_path)
    size = {name: float(row["size_kb"]) for name, row in candidates(tmp_path, report).items()}
    assert size["structured"] < 0.6 * size["baseline"]  # physically pruned, through the residual sum and BN
    best = json.loads((tmp_path / ".modelforge" / "search" / "best_params.json").read_text())["params"]
    assert best["family"] == "custom" and best["spec"] == "acme_nets:small_resnet"


@pytest.mark.e2e
def test_the_residual_cnn_family_goes_through_the_whole_dag(tmp_path, prefect_api):
    config = json.loads(json.dumps(TINY))
    config["search"]["space"]["families"] = ["resnet"]
    run_project(tmp_path, config)
    shipped_and_served(tmp_path)
    best = json.loads((tmp_path / ".modelforge" / "search" / "best_params.json").read_text())["params"]
    assert best["family"] == "resnet"


@pytest.mark.e2e
def test_a_local_hugging_face_image_classifier_is_fine_tuned_compressed_and_serves(tmp_path, prefect_api):
    import onnx
    from user_models import tiny_vit

    vit = str(tiny_vit(tmp_path / "vit"))  # a 2-label checkpoint: the digits get a fresh 10-class head
    config = json.loads(json.dumps(TINY))
    config.update(
        {
            "model": {"pretrained": vit},
            "search": {
                "n_trials": 2,
                "epochs": 3,
                "space": {
                    "lr": [0.003, 0.006],
                    "optimizers": ["adamw"],
                    "freeze_epochs": [0, 1],
                    "backbone_lr_scale": [0.5, 1.0],
                },
            },
            "train": {"max_epochs": 12, "patience": 4},
            "compress": {
                "candidates": {
                    "heads": [{"method": "structured_prune", "amount": 0.5, "finetune_epochs": 4}],
                    "int8_dynamic": [{"method": "quantize_dynamic"}],
                    "one_layer": [{"method": "distill", "epochs": 6}],
                }
            },  # the teacher's own first layer, distilled
        }
    )
    report = run_project(tmp_path, config)
    table = candidates(tmp_path, report)
    assert float(table["baseline"]["accuracy"]) > 0.7
    assert float(table["heads"]["size_kb"]) < 0.9 * float(table["baseline"]["size_kb"])
    assert float(table["one_layer"]["size_kb"]) < 0.8 * float(table["baseline"]["size_kb"])
    manifest = shipped_and_served(tmp_path)
    graph = onnx.load(str(tmp_path / "deploy" / "bundle" / manifest["model_file"]))
    assert [i.name for i in graph.graph.input] == ["pixel_values"]  # HF's own input name


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
            check_model_inputs(
                TrainConfig(init_from=tmp_path / "plain.pt"), ModelConfig(spec=spec), 3, (1, 8, 8), tmp_path
            )
        assert expected in str(err.value) and "2 problem(s)" in str(err.value), str(err.value)
        assert "a plain state_dict: for your own module's weights set model.spec and model.weights" in str(err.value)
    (tmp_path / "not_a_checkpoint").mkdir()  # an HF folder without its config and weights
    with pytest.raises(ConfigError, match=r"not_a_checkpoint has no config.json, weights \(\*.safetensors\)"):
        check_model_inputs(
            TrainConfig(), ModelConfig(pretrained=str(tmp_path / "not_a_checkpoint")), 3, (1, 8, 8), tmp_path
        )
    with pytest.raises(ConfigError, match=r"do not fit the model: missing stem\.0\.weight"):
        check_model_inputs(
            TrainConfig(),
            ModelConfig(spec="user_models:small_resnet", weights=tmp_path / "plain.pt"),
            3,
            (1, 8, 8),
            tmp_path,
        )


TOPICS = {
    "math": "sum product integer number divide square root add",
    "files": "path folder file read write open close directory",
    "net": "socket host port connect send receive server request",
}


def topic_texts(n_per_topic: int = 60) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        {"text": " ".join(rng.choice(words.split(), 6)) + f" item {i}", "label": topic}
        for topic, words in TOPICS.items()
        for i in range(n_per_topic)
    ]


def test_the_tiny_hugging_face_checkpoint_is_the_same_in_every_build(tmp_path):
    # The fine-tuning test below reached 0.73 once and 1.0 in other runs: its checkpoint's token ids
    # came in a different order from each build, so the same random embedding rows met other tokens.
    from user_models import tiny_bert

    texts = [r["text"] for r in topic_texts()]
    first, second = tiny_bert(tmp_path / "first", texts), tiny_bert(tmp_path / "second", texts)
    for name in ("tokenizer.json", "config.json", "model.safetensors"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


@pytest.mark.e2e
def test_a_local_hugging_face_checkpoint_is_fine_tuned_pruned_by_heads_quantized_and_serves_texts(
    tmp_path, prefect_api
):
    import pandas as pd
    from user_models import tiny_bert

    rows = topic_texts()
    (tmp_path / "data").mkdir()
    pd.DataFrame(rows).to_csv(tmp_path / "data" / "texts.csv", index=False)
    bert = str(tiny_bert(tmp_path / "bert", [r["text"] for r in rows]))
    config = json.loads(json.dumps(TINY))
    config.update(
        {
            "data": {"dataset": "text", "tokenizer": bert, "max_length": 16},
            "model": {"pretrained": bert},
            "search": {
                "n_trials": 2,
                "epochs": 4,
                "space": {
                    "lr": [0.003, 0.006],
                    "optimizers": ["adamw"],
                    "batch_sizes": [16],
                    "freeze_epochs": [0, 1],
                    "backbone_lr_scale": [0.5, 1.0],
                    "augment": ["none"],
                },
            },
            "train": {"max_epochs": 10, "patience": 4},
            "compress": {
                "candidates": {
                    "heads": [
                        {"method": "structured_prune", "amount": 0.5, "finetune_epochs": 6, "finetune_lr_scale": 0.5}
                    ],
                    "int8_dynamic": [{"method": "quantize_dynamic"}],
                    # the transformer teaches a built-in bag-of-tokens student over the same token ids
                    "student": [
                        {"method": "distill", "student": {"family": "text", "width": 8, "depth": 1}, "epochs": 20}
                    ],
                }
            },
        }
    )
    report = run_project(tmp_path, config)
    table = candidates(tmp_path, report)
    assert (
        float(table["baseline"]["accuracy"]) > 0.9
    )  # 1.0 in every run since the checkpoint is the same in every build
    assert float(table["heads"]["size_kb"]) < 0.9 * float(table["baseline"]["size_kb"])
    assert float(table["int8_dynamic"]["size_kb"]) < 0.6 * float(table["baseline"]["size_kb"])
    assert float(table["student"]["size_kb"]) < 0.6 * float(table["baseline"]["size_kb"])
    assert float(table["student"]["accuracy"]) > 0.9
    bundle = tmp_path / "deploy" / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["preprocessing"]["tokenizer"] == bert and manifest["labels"] == sorted(TOPICS)
    texts, labels, split = split_texts(tmp_path / "data", read_manifest(tmp_path / "data"))
    test = [(t, y) for t, y, s in zip(texts, labels, split, strict=True) if s == "test"]
    acc = serve_bundle(bundle, {"texts": [t for t, _ in test]}, [y for _, y in test])[1]
    assert acc > 0.9  # raw texts in, class names out
