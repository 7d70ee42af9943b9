"""One suite every compression handler must pass; a new handler without an entry here fails."""

import numpy as np
import onnx
import pytest
import torch

from tasks.build_model import count_params, load_checkpoint
from tasks.compress_model import HANDLERS, ONNX_METHODS, compress_candidate
from tasks.config import Distill, MagnitudePrune, QuantizeDynamic, QuantizeStatic
from tasks.run_onnx import make_session, predict_logits
from tasks.train_model import accuracy

STEPS = {
    "magnitude_prune": MagnitudePrune(method="magnitude_prune", sparsity=0.6, finetune_epochs=2),
    "distill": Distill(method="distill", width_factor=0.5, epochs=15),
    "quantize_dynamic": QuantizeDynamic(method="quantize_dynamic"),
    "quantize_static": QuantizeStatic(method="quantize_static", calibration_samples=64),
}
# Allowed test-accuracy loss vs the teacher: a 3.5x smaller student trained for a few seconds gets more.
MAX_DROP = {"distill": 0.10}


def test_every_handler_is_covered():
    assert set(STEPS) == set(HANDLERS)


@pytest.mark.parametrize("method", sorted(STEPS))
def test_handler_contract(method, cnn_checkpoint, data_dir, splits, train_cfg, tmp_path):
    teacher, _, _ = load_checkpoint(cnn_checkpoint)
    teacher_acc = accuracy(teacher, *splits.test)
    cand = compress_candidate(method, [STEPS[method]], cnn_checkpoint, data_dir, train_cfg, tmp_path)
    onnx.checker.check_model(str(cand.onnx))
    logits = predict_logits(make_session(cand.onnx), splits.test[0])
    onnx_acc = float((logits.argmax(1) == splits.test[1]).mean())
    own_model, _, _ = load_checkpoint(cand.checkpoint)  # the PyTorch model this ONNX file came from
    with torch.no_grad():
        own_logits = own_model(torch.from_numpy(splits.test[0])).numpy()
    if method in ONNX_METHODS:
        agreement = float((logits.argmax(1) == own_logits.argmax(1)).mean())
        assert agreement >= 0.95, f"INT8 predictions agree with FP32 on only {agreement:.1%}"
        assert cand.parity_max_abs is None
    else:
        assert np.abs(logits - own_logits).max() < 1e-4
        assert cand.parity_max_abs < 1e-4
    assert onnx_acc >= teacher_acc - MAX_DROP.get(method, 0.03), f"{method}: {onnx_acc:.3f} vs teacher {teacher_acc:.3f}"


def test_magnitude_prune_reaches_target_sparsity(cnn_checkpoint, data_dir, train_cfg, tmp_path):
    cand = compress_candidate("p", [STEPS["magnitude_prune"]], cnn_checkpoint, data_dir, train_cfg, tmp_path)
    model, _, _ = load_checkpoint(cand.checkpoint)
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    sparsity = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert sparsity == pytest.approx(0.6, abs=0.01)  # fine-tuning must not regrow pruned weights
    assert cand.info["magnitude_prune"]["sparsity"] == pytest.approx(sparsity)


def test_distilled_student_is_smaller(cnn_checkpoint, data_dir, train_cfg, tmp_path):
    cand = compress_candidate("s", [STEPS["distill"]], cnn_checkpoint, data_dir, train_cfg, tmp_path)
    student, arch, _ = load_checkpoint(cand.checkpoint)
    teacher, _, _ = load_checkpoint(cnn_checkpoint)
    assert arch.conv == (4, 8) and count_params(student) < count_params(teacher) / 2


def test_recipe_chains_torch_then_onnx_steps(cnn_checkpoint, data_dir, train_cfg, tmp_path):
    recipe = [STEPS["magnitude_prune"], STEPS["quantize_static"]]
    cand = compress_candidate("chain", recipe, cnn_checkpoint, data_dir, train_cfg, tmp_path)
    assert set(cand.info) >= {"magnitude_prune", "quantize_static"}
    ops = {n.op_type for n in onnx.load(str(cand.onnx)).graph.node}
    assert "QuantizeLinear" in ops


def test_empty_calibration_set_is_a_clear_error(cnn_checkpoint, data_dir, train_cfg, tmp_path, monkeypatch):
    import tasks.compress_model as cm
    real = cm.load_splits

    def no_train(d):
        s = real(d)
        return type(s)((s.train[0][:0], s.train[1][:0]), s.val, s.test, s.num_classes, s.manifest)

    monkeypatch.setattr(cm, "load_splits", no_train)
    with pytest.raises(ValueError, match="calibration set .* is empty"):
        compress_candidate("q", [STEPS["quantize_static"]], cnn_checkpoint, data_dir, train_cfg, tmp_path)
