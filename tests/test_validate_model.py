import numpy as np
import pytest

from tasks.compress.recipe import compress_candidate
from tasks.onnx.runtime import make_session, predict_logits
from tasks.release.evaluate import ClassifierEval
from tasks.release.validate import (
    GateConfig,
    GateError,
    Report,
    ValidateConfig,
    apply_gates,
    best_passing,
    require_passing,
    validate_candidates,
)


def report(name, acc, p50, parity=1e-6, size=1000, noise=0.02, seed=0):
    """Ten timing rounds around `p50`, each off by up to `noise` (relative), as a loaded machine gives."""
    rounds = tuple(p50 * (1 + np.random.default_rng(seed).uniform(-noise, noise, 10)))
    p50 = float(np.median(rounds))  # as measured: which of two close models is "fastest" is up to the noise
    return Report(
        name,
        f"{name}.onnx",
        {"accuracy": acc},
        "accuracy",
        p50,
        p50 * 2,
        1000 / p50,
        size,
        parity,
        latency_rounds_ms=rounds,
    )


def test_measures_real_onnx_models(cnn_checkpoint, mlp_checkpoint, data_dir, splits, train_cfg, tmp_path):
    cands = [
        compress_candidate(name, [], ckpt, data_dir, train_cfg, tmp_path)
        for name, ckpt in (("cnn", cnn_checkpoint), ("mlp", mlp_checkpoint))
    ]
    reports = validate_candidates(
        cands, ValidateConfig(warmup=2, latency_runs=20, throughput_runs=4), ClassifierEval(data_dir)
    )
    assert [r.name for r in reports] == ["cnn", "mlp"]
    for r, cand in zip(reports, cands, strict=True):
        logits = predict_logits(make_session(cand.onnx), splits.test[0])
        expected = float((logits.argmax(1) == splits.test[1]).mean())
        assert r.quality == {"accuracy": expected} and r.score == expected > 0.5
        assert 0 < r.latency_p50_ms <= r.latency_p95_ms
        assert r.throughput_sps > 0 and r.size_bytes == cand.onnx.stat().st_size


def test_each_gate_rejects_what_breaks_it():
    gates = GateConfig(max_accuracy_drop=1.0, min_accuracy=0.9, max_parity_error=1e-4, max_latency_ratio=1.0)
    reports = apply_gates(
        [
            report("baseline", 0.97, 1.0),
            report("ok", 0.965, 0.5),
            report("inaccurate", 0.95, 0.4),
            report("below_floor", 0.89, 0.4),
            report("broken_export", 0.97, 0.4, parity=1e-2),
            report("slow", 0.97, 1.5),
            report("nan_parity", 0.97, 0.4, parity=float("nan")),
        ],
        gates,
    )
    failed = {r.name: " ".join(r.failed_gates) for r in reports}
    assert failed["baseline"] == "" and failed["ok"] == ""
    assert "accuracy drop 2.00 pts" in failed["inaccurate"]
    assert "min" in failed["below_floor"]
    assert "parity" in failed["broken_export"] and "parity" in failed["nan_parity"]
    assert "latency 1.50x" in failed["slow"]
    assert best_passing(reports, gates).name == "ok"


def test_selection_rules():
    reports = apply_gates(
        [report("baseline", 0.97, 1.0, size=900), report("fast", 0.965, 0.5, size=1000)],
        GateConfig(max_latency_ratio=None),
    )
    assert best_passing(reports, GateConfig(select_by="latency_p50_ms")).name == "fast"
    assert best_passing(reports, GateConfig(select_by="quality")).name == "baseline"
    assert best_passing(reports, GateConfig(select_by="size_bytes")).name == "baseline"


def test_latency_within_timing_noise_is_a_tie_broken_by_quality_then_size():
    """Two p50s apart in the fourth decimal once decided what shipped, differently run to run (the
    default job shipped structured at 0.9917 or student at 0.9972 on identical inputs)."""
    gates = GateConfig(max_latency_ratio=None)
    fastest = set()
    for seed in range(8):  # whichever of them the noise makes fastest, the more accurate one ships
        reports = apply_gates(
            [
                report("baseline", 0.99, 1.0, seed=seed),
                report("structured", 0.9917, 0.0400, seed=seed),
                report("student", 0.9972, 0.0400, seed=seed + 1),
                report("student_small", 0.9972, 0.0400, size=500, seed=seed + 2),
            ],
            gates,
        )
        fastest.add(min(reports, key=lambda r: r.latency_p50_ms).name)
        assert best_passing(reports, gates).name == "student_small"  # equal quality: the smaller file
    assert len(fastest) > 1  # the noise did move the fastest around
    # a difference the rounds agree on and larger than the tie ratio is a real one: the faster ships
    reports = apply_gates([report("baseline", 0.99, 1.0), report("fast", 0.985, 0.5, seed=1)], gates)
    assert best_passing(reports, gates).name == "fast"
    # noisy rounds that straddle 5% slower are not evidence: the more accurate one ships
    reports = apply_gates(
        [report("baseline", 0.99, 1.0, noise=0.2), report("fast", 0.985, 0.94, noise=0.2, seed=1)], gates
    )
    assert best_passing(reports, gates).name == "baseline"


def test_no_passing_candidate_fails_loudly():
    reports = apply_gates([report("baseline", 0.5, 1.0)], GateConfig(min_accuracy=0.9))
    assert best_passing(reports, GateConfig()) is None
    with pytest.raises(GateError, match=r"baseline: accuracy 0\.5000 < min"):
        require_passing(None, reports)
    with pytest.raises(GateError, match="baseline"):
        apply_gates([report("other", 0.99, 1.0)], GateConfig())


def test_embedding_gates_hold_the_worst_sentence_not_only_the_mean():
    def emb(name, worst, mean=0.995, top10=0.9):
        return Report(
            name,
            f"{name}.onnx",
            {"cosine_mean": mean, "cosine_min": worst, "top10_overlap": top10},
            "cosine_min",
            1.0,
            2.0,
            1000.0,
            1000,
            None,
        )

    gates = GateConfig(min_cosine_worst=0.97, min_cosine_mean=0.99, min_top10_overlap=0.8, max_latency_ratio=None)
    reports = apply_gates(
        [
            emb("baseline", 1.0, 1.0, 1.0),
            emb("ok", 0.975),
            emb("one_bad_sentence", 0.90),
            emb("drifted", 0.98, mean=0.985),
            emb("wrong_neighbours", 0.98, top10=0.7),
        ],
        gates,
    )
    failed = {r.name: " ".join(r.failed_gates) for r in reports}
    assert failed["baseline"] == failed["ok"] == ""
    assert failed["one_bad_sentence"] == "worst-case cosine 0.9000 < min 0.9700"  # its mean alone would pass
    assert "mean cosine 0.9850" in failed["drifted"] and "top-10 overlap 0.7000" in failed["wrong_neighbours"]
    assert best_passing(reports, GateConfig(select_by="quality")).name == "baseline"
