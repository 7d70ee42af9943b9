import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from tasks.compress.recipe import compress_candidate
from tasks.core import tracking
from tasks.core.tracking import TrackingConfig
from tasks.models import Arch, build_model, save_checkpoint
from tasks.release.evaluate import ClassifierEval
from tasks.release.promote import (
    PromoteConfig,
    PromotionError,
    check_champion_before_training,
    decide,
    promote_model,
    rollback,
)
from tasks.release.register import RegisterConfig, register_model
from tasks.release.ship import ship_bundle
from tasks.release.stats import mcnemar_exact, ratio_interval
from tasks.release.validate import ValidateConfig

FAST_TIMING = ValidateConfig(warmup=2, latency_runs=20, throughput_runs=2)


def acc(gain, p):
    return {"gain_pts": gain, "p_value": p, "test": "McNemar exact"}


def fast(speedup, low, high):
    return {"speedup": speedup, "interval": [low, high]}


@pytest.mark.parametrize(
    "quality, speed, promoted, why",
    [
        (None, None, True, "no champion yet"),
        (acc(2.0, 0.001), fast(0.5, 0.45, 0.55), True, "accuracy better by 2.00 pts (McNemar exact p = 0.001)"),
        # better on paper, but the test cannot tell, and the speed-up may be noise: the champion stays
        (acc(0.5, 0.3), fast(1.1, 1.01, 1.2), False, "not better by the test (+0.50 pts"),
        (acc(-0.1, 0.8), fast(2.0, 1.8, 2.2), True, "within 0.25 pts (-0.10, McNemar exact p = 0.8) and 2.00x faster"),
        (acc(-0.1, 0.8), fast(1.3, 1.04, 1.5), False, "not above 1.05x"),
        (acc(-2.0, 0.01), fast(3.0, 2.9, 3.1), False, "accuracy worse by 2.00 pts"),
        (acc(-0.2, 0.01), fast(3.0, 2.9, 3.1), False, "accuracy worse by 0.20 pts"),  # within tolerance but significant
    ],
)
def test_decision_rule(quality, speed, promoted, why):
    ok, reason = decide(quality, speed, PromoteConfig())
    assert ok == promoted and why in reason


def test_decision_rule_on_a_bootstrap_interval():
    quality = {"gain_pts": -0.5, "interval_pts": [-0.9, -0.1], "test": "paired bootstrap"}
    ok, reason = decide(quality, fast(2.0, 1.9, 2.1), PromoteConfig(), "cosine_min")
    assert not ok and reason == "cosine_min worse by 0.50 pts (paired bootstrap 95% interval -0.90 to -0.10 pts)"
    quality = {"gain_pts": 0.4, "interval_pts": [0.1, 0.7], "test": "paired bootstrap"}
    assert decide(quality, fast(1.0, 0.9, 1.1), PromoteConfig(), "cosine_min")[0]


def test_paired_statistics():
    rng = np.random.default_rng(0)
    right = rng.random(400) < 0.9
    worse = right & (rng.random(400) < 0.9)  # wrong on about 36 more samples
    assert mcnemar_exact(right, worse) < 1e-6 and mcnemar_exact(right, right) == 1.0
    ratio, low, high = ratio_interval([2.0, 2.1, 1.9, 2.0, 2.05] * 2, [1.0, 1.02, 0.98, 1.0, 1.01] * 2)
    assert 1.9 < low <= ratio <= high < 2.1


def test_champion_challenger_and_rollback(tmp_path, cnn_checkpoint, data_dir, train_cfg):
    tracking.setup_tracking(
        TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="promo", artifact_dir=tmp_path / "art")
    )
    exp = MlflowClient().get_experiment_by_name("promo").experiment_id
    torch.manual_seed(0)
    arch = Arch("cnn", 10, (1, 8, 8), conv=(8, 16), hidden=(32,))
    untrained = save_checkpoint(tmp_path / "untrained.pt", build_model(arch), arch, {})
    cfg = PromoteConfig(champion_bundle_dir=tmp_path / "champion")
    reg_cfg = RegisterConfig(model_name="promo-model")

    def release(name, checkpoint):
        onnx_path = compress_candidate(name, [], checkpoint, data_dir, train_cfg, tmp_path / "c").onnx
        run_id = tracking.start_run(exp, name)
        registered = register_model(onnx_path, reg_cfg, run_id, ClassifierEval(data_dir))
        bundle = ship_bundle(
            onnx_path,
            tmp_path / f"bundle-{name}",
            ClassifierEval(data_dir),
            "v.dir",
            {"candidate": name, "registered_model": asdict(registered)},
        )
        tracking.log_artifacts(run_id, bundle, "bundle")
        return promote_model(registered, bundle, cfg, FAST_TIMING, ClassifierEval(data_dir), run_id), bundle

    def champion_sha():
        return json.loads((tmp_path / "champion" / "manifest.json").read_text())["sha256"]

    def alias(a):
        return str(MlflowClient().get_model_version_by_alias("promo-model", a).version)

    first, bad_bundle = release("untrained", untrained)
    assert first.promoted and first.reason == "no champion yet" and alias("champion") == "1"
    second, good_bundle = release("trained", cnn_checkpoint)
    assert second.promoted and "accuracy better by" in second.reason and "McNemar exact p = " in second.reason
    assert second.champion["accuracy"] < 0.3 < 0.8 < second.challenger["accuracy"]  # same test split for both
    assert (alias("champion"), alias("previous-champion")) == ("2", "1")
    assert champion_sha() == json.loads((good_bundle / "manifest.json").read_text())["sha256"]
    third, _ = release("untrained-again", untrained)
    assert not third.promoted and "accuracy worse by" in third.reason and alias("champion") == "2"
    run = MlflowClient().get_run(MlflowClient().get_model_version("promo-model", "3").run_id)
    assert run.data.tags["promotion.decision"] == "kept"
    assert run.data.metrics["promotion.champion.accuracy"] > run.data.metrics["promotion.challenger.accuracy"]

    assert run.data.metrics["promotion.p_value"] < 0.05  # the decision logs its evidence

    # Another task under the same name (3-class data where the champion has 10) is refused before
    # training, and a champion folder holding another model's champion is never replaced.
    from tasks.data.table import TableDataConfig, describe_table
    from tasks.examples import wine

    wine(tmp_path / "wine")
    describe_table(TableDataConfig(dataset="table", dir=tmp_path / "wine", label="label"), tmp_path / "wine")
    with pytest.raises(PromotionError, match=r"promo-model v2 \('champion'\) differs in classes: champion \[0, 1, 2"):
        check_champion_before_training("promo-model", tmp_path / "wine", cfg)
    with pytest.raises(PromotionError, match="serves the champion of 'promo-model', not 'wine-classifier'"):
        check_champion_before_training("wine-classifier", tmp_path / "wine", cfg)
    check_champion_before_training("promo-model", data_dir, cfg)  # the same task passes

    assert rollback("promo-model", cfg) == "1"
    assert (alias("champion"), alias("previous-champion")) == ("1", "2")
    assert champion_sha() == json.loads((bad_bundle / "manifest.json").read_text())["sha256"]
    assert rollback("promo-model", cfg) == "2"  # a second rollback undoes the first
    assert champion_sha() == json.loads((good_bundle / "manifest.json").read_text())["sha256"]


def test_rollback_without_previous_champion_is_a_clear_error(tmp_path):
    tracking.setup_tracking(
        TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="none", artifact_dir=tmp_path / "art")
    )
    with pytest.raises(ValueError, match="no 'previous-champion' version to roll back to"):
        rollback("never-registered", PromoteConfig(champion_bundle_dir=tmp_path / "champion"))


def test_a_champion_is_scored_in_its_own_encoding_when_the_data_grows(tmp_path):
    """New rows bring a category the champion never saw: the challenger's table is one column wider.
    It is still the same task, and the champion is fed the same test rows in its own encoding."""
    import pandas as pd

    from tasks.data.table import TableDataConfig, describe_table
    from tasks.examples import wine
    from tasks.release.promote import task_mismatch

    wine(tmp_path / "wine")
    cfg = TableDataConfig(dataset="table", dir=tmp_path / "wine", label="label", allow_drift=True)
    old, _ = describe_table(cfg, tmp_path / "wine")
    frame = pd.read_csv(tmp_path / "wine/data.csv")
    grown = frame.head(60).assign(site="valley")  # a site the first version never had
    pd.concat([frame, grown]).to_csv(tmp_path / "wine/data.csv", index=False)
    new, _ = describe_table(cfg, tmp_path / "wine")
    assert new["input_shape"][0] == old["input_shape"][0] + 1
    ours, theirs = ClassifierEval(tmp_path / "wine"), ClassifierEval(tmp_path / "wine").encoded_as(old)
    assert theirs._splits.test[0].shape == (len(ours._splits.test[0]), old["input_shape"][0])
    assert (theirs._splits.test[1] == ours._splits.test[1]).all()  # the same test rows, paired
    tensors = lambda width: [{"name": "x", "dtype": "tensor(float)", "shape": ["batch", width]}]
    assert (
        task_mismatch(
            {"inputs": tensors(old["input_shape"][0]), "labels": old["classes"]},
            {"inputs": tensors(new["input_shape"][0]), "labels": new["classes"]},
        )
        == []
    )
    assert task_mismatch({"labels": ["a", "b"]}, {"labels": ["a", "b", "c"]}) == [
        "classes: champion ['a', 'b'], challenger ['a', 'b', 'c']"
    ]
