import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from tasks import track_run
from tasks.models import Arch, build_model, save_checkpoint
from tasks.compress_model import compress_candidate
from tasks.config import PromoteConfig, RegisterConfig, TrackingConfig, ValidateConfig
from tasks.evaluate_model import ClassifierEval
from tasks.promote_model import decide, promote_model, rollback
from tasks.register_model import register_model
from tasks.ship_bundle import ship_bundle

FAST_TIMING = ValidateConfig(warmup=2, latency_runs=20, throughput_runs=2)


@pytest.mark.parametrize("challenger, champion, promoted, why", [
    ({"accuracy": 0.95, "latency_p50_ms": 1.0}, None, True, "no champion"),
    ({"accuracy": 0.97, "latency_p50_ms": 2.0}, {"accuracy": 0.95, "latency_p50_ms": 1.0}, True, "accuracy better by 2.00"),
    ({"accuracy": 0.949, "latency_p50_ms": 0.5}, {"accuracy": 0.95, "latency_p50_ms": 1.0}, True, "2.00x faster"),
    ({"accuracy": 0.95, "latency_p50_ms": 1.5}, {"accuracy": 0.95, "latency_p50_ms": 1.0}, False, "not faster"),
    ({"accuracy": 0.93, "latency_p50_ms": 0.1}, {"accuracy": 0.95, "latency_p50_ms": 1.0}, False, "accuracy worse by 2.00"),
])
def test_decision_rule(challenger, champion, promoted, why):
    ok, reason = decide(challenger, champion, tolerance_pts=0.25)
    assert ok == promoted and why in reason


def test_decision_rule_on_another_quality_metric():
    ok, reason = decide({"cosine_min": 0.985, "latency_p50_ms": 1.0}, {"cosine_min": 0.99, "latency_p50_ms": 2.0},
                        tolerance_pts=0.25, quality="cosine_min")
    assert not ok and reason == "cosine_min worse by 0.50 pts"


def test_champion_challenger_and_rollback(tmp_path, cnn_checkpoint, data_dir, train_cfg):
    track_run.setup_tracking(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="promo",
                                            artifact_dir=tmp_path / "art"))
    exp = MlflowClient().get_experiment_by_name("promo").experiment_id
    torch.manual_seed(0)
    arch = Arch("cnn", 10, (1, 8, 8), conv=(8, 16), hidden=(32,))
    untrained = save_checkpoint(tmp_path / "untrained.pt", build_model(arch), arch, {})
    cfg = PromoteConfig(champion_bundle_dir=tmp_path / "champion")
    reg_cfg = RegisterConfig(model_name="promo-model")

    def release(name, checkpoint):
        onnx_path = compress_candidate(name, [], checkpoint, data_dir, train_cfg, tmp_path / "c").onnx
        run_id = track_run.start_run(exp, name)
        registered = register_model(onnx_path, reg_cfg, run_id, ClassifierEval(data_dir))
        bundle = ship_bundle(onnx_path, tmp_path / f"bundle-{name}", ClassifierEval(data_dir), "v.dir", {"candidate": name})
        track_run.log_artifacts(run_id, bundle, "bundle")
        return promote_model(registered, bundle, cfg, FAST_TIMING, ClassifierEval(data_dir), run_id), bundle

    def champion_sha():
        return json.loads((tmp_path / "champion" / "manifest.json").read_text())["sha256"]

    def alias(a):
        return str(MlflowClient().get_model_version_by_alias("promo-model", a).version)

    first, bad_bundle = release("untrained", untrained)
    assert first.promoted and first.reason == "no champion yet" and alias("champion") == "1"
    second, good_bundle = release("trained", cnn_checkpoint)
    assert second.promoted and "accuracy better by" in second.reason
    assert second.champion["accuracy"] < 0.3 < 0.8 < second.challenger["accuracy"]  # same test split for both
    assert (alias("champion"), alias("previous-champion")) == ("2", "1")
    assert champion_sha() == json.loads((good_bundle / "manifest.json").read_text())["sha256"]
    third, _ = release("untrained-again", untrained)
    assert not third.promoted and "accuracy worse by" in third.reason and alias("champion") == "2"
    run = MlflowClient().get_run(MlflowClient().get_model_version("promo-model", "3").run_id)
    assert run.data.tags["promotion.decision"] == "kept"
    assert run.data.metrics["promotion.champion.accuracy"] > run.data.metrics["promotion.challenger.accuracy"]

    assert rollback("promo-model", cfg) == "1"
    assert (alias("champion"), alias("previous-champion")) == ("1", "2")
    assert champion_sha() == json.loads((bad_bundle / "manifest.json").read_text())["sha256"]
    assert rollback("promo-model", cfg) == "2"  # a second rollback undoes the first
    assert champion_sha() == json.loads((good_bundle / "manifest.json").read_text())["sha256"]


def test_rollback_without_previous_champion_is_a_clear_error(tmp_path):
    track_run.setup_tracking(TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="none",
                                            artifact_dir=tmp_path / "art"))
    with pytest.raises(ValueError, match="no 'previous-champion' version to roll back to"):
        rollback("never-registered", PromoteConfig(champion_bundle_dir=tmp_path / "champion"))
