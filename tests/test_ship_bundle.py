import json
import shutil

import pytest

from tasks.release.evaluate import ClassifierEval
from tasks.release.ship import sha256_of, ship_bundle


@pytest.fixture()
def onnx_model(cnn_onnx, tmp_path):
    return shutil.copy(cnn_onnx, tmp_path / "model.onnx")


def test_bundle_manifest_describes_the_model(onnx_model, data_dir, tmp_path):
    bundle = ship_bundle(
        onnx_model, tmp_path / "bundle", ClassifierEval(data_dir), "abc.dir", {"candidate": "baseline"}
    )
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["sha256"] == sha256_of(bundle / "model.onnx") == sha256_of(onnx_model)
    assert manifest["inputs"][0] == {"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "tensor(float)"}
    assert manifest["outputs"][0]["shape"] == ["batch", 10]
    assert manifest["data_version"] == "abc.dir" and manifest["candidate"] == "baseline"
    assert "16" in manifest["preprocessing"]


def test_failed_ship_keeps_the_previous_bundle(onnx_model, data_dir, tmp_path):
    ship_bundle(onnx_model, tmp_path / "bundle", ClassifierEval(data_dir), "v1.dir", {})
    before = (tmp_path / "bundle" / "manifest.json").read_text()
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not onnx")
    with pytest.raises(Exception, match=r"(?i)protobuf|load|invalid"):
        ship_bundle(corrupt, tmp_path / "bundle", ClassifierEval(data_dir), "v2.dir", {})
    assert (tmp_path / "bundle" / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bundle",
        "corrupt.onnx",
        "model.onnx",
    ]  # no temp folder left behind
