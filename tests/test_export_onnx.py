import numpy as np
import onnx
import pytest
import torch

from tasks.models import load_checkpoint
from tasks.onnx.export import export_onnx
from tasks.onnx.runtime import make_session, predict_logits


@pytest.mark.parametrize("fixture", ["cnn_checkpoint", "mlp_checkpoint"])
def test_onnx_matches_pytorch_on_any_batch(fixture, request, splits, tmp_path):
    model, _, _ = load_checkpoint(request.getfixturevalue(fixture))
    result = export_onnx(model, tmp_path / "m.onnx", splits.test[0])
    assert result.parity_max_abs < 1e-4
    onnx.checker.check_model(str(result.path))
    session = make_session(result.path)
    assert session.get_inputs()[0].shape[0] == "batch"
    for n in (1, 7, 64):
        x = splits.test[0][:n]
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(predict_logits(session, x), expected, atol=1e-4, rtol=1e-4)


def test_the_exporters_op_list_is_read_once_per_process(mlp_checkpoint, splits, tmp_path):
    """The registry cache applies to the installed torch/onnxscript (a version that moved the function would
    leave exports slower, silently: this fails instead), and cached exports still match PyTorch."""
    import importlib

    model, _, _ = load_checkpoint(mlp_checkpoint)
    first = export_onnx(model, tmp_path / "a.onnx", splits.val[0][:16])
    lazy = importlib.import_module("torch.onnx._internal._lazy_import")
    ops = importlib.import_module(lazy.onnxscript_apis._name).get_torchlib_ops
    before = ops.cache_info().hits
    second = export_onnx(model, tmp_path / "b.onnx", splits.val[0][:16])
    assert ops.cache_info().hits == before + 1 and ops.cache_info().currsize == 1
    assert max(first.parity_max_abs, second.parity_max_abs) < 1e-4
