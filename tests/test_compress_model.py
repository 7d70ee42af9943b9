"""One suite every compression handler must pass; a new handler without an entry here fails."""

import numpy as np
import onnx
import pytest
import torch

from tasks.compress.base import HANDLERS
from tasks.compress.binarize import Binarize
from tasks.compress.convert_fp16 import ConvertFp16
from tasks.compress.distill import Distill
from tasks.compress.magnitude_prune import MagnitudePrune
from tasks.compress.quantize_aware import QuantizeAware
from tasks.compress.quantize_dynamic import QuantizeDynamic
from tasks.compress.quantize_static import QuantizeStatic
from tasks.compress.recipe import compress_candidate
from tasks.compress.sparsity_train import SparsityTrain
from tasks.compress.structured_prune import StructuredPrune
from tasks.models import count_params, load_checkpoint
from tasks.onnx.runtime import make_session, predict_logits
from tasks.train.loop import accuracy

STEPS = {
    "magnitude_prune": MagnitudePrune(method="magnitude_prune", sparsity=0.6, finetune_epochs=2),
    "structured_prune": StructuredPrune(method="structured_prune", amount=0.5, finetune_epochs=8),
    "convert_fp16": ConvertFp16(method="convert_fp16"),
    "distill": Distill(method="distill", width_factor=0.5, epochs=15),
    "quantize_dynamic": QuantizeDynamic(method="quantize_dynamic"),
    "quantize_static": QuantizeStatic(method="quantize_static", calibration_samples=64),
    "binarize": Binarize(method="binarize", finetune_epochs=10),
    "sparsity_train": SparsityTrain(method="sparsity_train", finetune_epochs=4),
    "quantize_aware": QuantizeAware(method="quantize_aware", finetune_epochs=2, calibration_samples=64),
}
# Allowed test-accuracy loss vs the teacher: a 3.5x smaller student trained for a few seconds gets more.
MAX_DROP = {"distill": 0.10, "structured_prune": 0.06, "binarize": 0.10}


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
    if STEPS[method].on_onnx:
        agreement = float((logits.argmax(1) == own_logits.argmax(1)).mean())
        assert agreement >= 0.95, f"INT8 predictions agree with FP32 on only {agreement:.1%}"
        assert cand.parity_max_abs is None
    else:
        assert np.abs(logits - own_logits).max() < 1e-4
        assert cand.parity_max_abs < 1e-4
    assert onnx_acc >= teacher_acc - MAX_DROP.get(method, 0.03), (
        f"{method}: {onnx_acc:.3f} vs teacher {teacher_acc:.3f}"
    )


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
    import tasks.compress.recipe as cm

    real = cm.load_splits

    def no_train(d):
        s = real(d)
        return type(s)((s.train[0][:0], s.train[1][:0]), s.val, s.test, s.num_classes, s.manifest)

    monkeypatch.setattr(cm, "load_splits", no_train)
    with pytest.raises(ValueError, match=r"calibration set .* is empty"):
        compress_candidate("q", [STEPS["quantize_static"]], cnn_checkpoint, data_dir, train_cfg, tmp_path)


def test_iterative_per_layer_magnitude_schedule(cnn_checkpoint, data_dir, train_cfg, tmp_path):
    step = MagnitudePrune(method="magnitude_prune", sparsity=0.8, scope="layer", steps=3, finetune_epochs=1)
    cand = compress_candidate("p", [step], cnn_checkpoint, data_dir, train_cfg, tmp_path)
    info = cand.info["magnitude_prune"]
    assert [round(h["sparsity"], 3) for h in info["steps"]] == [0.267, 0.533, 0.8]
    model, _, _ = load_checkpoint(cand.checkpoint)
    for m in model.modules():  # per-layer scope: every layer individually reaches the target
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            assert float((m.weight == 0).float().mean()) == pytest.approx(0.8, abs=0.02)


def test_structured_prune_rebuilds_smaller_layers(cnn_checkpoint, mlp_checkpoint, data_dir, train_cfg, tmp_path):
    base = compress_candidate("base", [], cnn_checkpoint, data_dir, train_cfg, tmp_path)
    cand = compress_candidate("s", [STEPS["structured_prune"]], cnn_checkpoint, data_dir, train_cfg, tmp_path)
    _, arch, _ = load_checkpoint(cand.checkpoint)
    assert arch.conv == (4, 8) and arch.hidden == (16,)
    info = cand.info["structured_prune"]
    assert info["params_after"] < info["params_before"] / 3
    assert cand.onnx.stat().st_size < base.onnx.stat().st_size / 2  # the graph itself shrank
    conv_shapes = [tuple(i.dims) for i in onnx.load(str(cand.onnx)).graph.initializer if len(i.dims) == 4]
    assert sorted(conv_shapes) == [(4, 1, 3, 3), (8, 4, 3, 3)]
    mlp = compress_candidate("m", [STEPS["structured_prune"]], mlp_checkpoint, data_dir, train_cfg, tmp_path)
    assert load_checkpoint(mlp.checkpoint)[1].hidden == (16, 16)


def test_structured_prune_keeps_the_function_of_kept_units(cnn_checkpoint, data_dir, train_cfg, tmp_path, splits):
    """amount=0 keeps every unit: the rebuilt model must compute exactly what the original did."""
    step = StructuredPrune(method="structured_prune", amount=0.0, finetune_epochs=0)
    cand = compress_candidate("s0", [step], cnn_checkpoint, data_dir, train_cfg, tmp_path)
    original, _, _ = load_checkpoint(cnn_checkpoint)
    rebuilt, _, _ = load_checkpoint(cand.checkpoint)
    x = torch.from_numpy(splits.test[0][:32])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), original(x))


def test_accuracy_aware_fallback_excludes_sensitive_nodes(cnn_checkpoint, data_dir, train_cfg, tmp_path):
    # One calibration sample and per-tensor scales make INT8 lose accuracy; zero tolerance forces fallback.
    step = QuantizeStatic(
        method="quantize_static", calibration_samples=1, per_channel=False, max_accuracy_loss=0.0, max_fallback_nodes=4
    )
    cand = compress_candidate("q", [step], cnn_checkpoint, data_dir, train_cfg, tmp_path)
    info = cand.info["quantize_static"]
    assert info["val_acc_int8_full"] < info["val_acc_fp32"], "precondition: harsh calibration must lose accuracy"
    assert info["nodes_excluded"], "tight tolerance must push nodes back to FP32"
    ranked = list(info["node_sqnr_loss_db"])
    assert info["nodes_excluded"] == ranked[: len(info["nodes_excluded"])]  # most sensitive first
    assert info["val_acc_int8"] > info["val_acc_int8_full"]
    assert info["accuracy_criterion_met"] == (info["val_acc_int8"] >= info["val_acc_fp32"])
    graph = {n.name: n for n in onnx.load(str(cand.onnx)).graph.node}
    for name in info["nodes_excluded"]:  # excluded nodes read float weights, not dequantized INT8 ones
        assert not graph[name].input[1].endswith("_DequantizeLinear_Output")


def test_no_fallback_without_a_tolerance(cnn_checkpoint, data_dir, train_cfg, tmp_path):
    step = QuantizeStatic(method="quantize_static", calibration_samples=1, per_channel=False)
    cand = compress_candidate("q", [step], cnn_checkpoint, data_dir, train_cfg, tmp_path)
    assert cand.info["quantize_static"]["nodes_excluded"] == []
    graph = onnx.load(str(cand.onnx)).graph
    int8 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    dequantized = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(layers) == 4  # the CNN's two convs and two linear layers, every one of them
    for node in layers:  # each reads its weight dequantized from an INT8 initializer: nothing fell back
        assert dequantized.get(node.input[1]) in int8, node.name
