"""The `image_folder` data source: mixed formats and sizes, validation, hash splits, the same
preprocessing for training and serving, and the real flow end to end on PNG digits."""

import base64
import io
import json
import shutil

import numpy as np
import pytest
import yaml
from conftest import serve_bundle
from PIL import Image

from deploy.loadtest import request, running_server
from serve.app import create_app
from serve.settings import ServeSettings
from serve.sources import BundleSource
from tasks.data import DataError, load_splits
from tasks.data.image_folder import (
    ImageFolderConfig,
    describe_image_folder,
    encode_images,
)
from tasks.examples import digits_png


def folder_cfg(**kw) -> ImageFolderConfig:
    return ImageFolderConfig(dataset="image_folder", image_size=(16, 16), **kw)


def write_images(root, per_class=12, seed=0):
    """Three classes told apart by brightness, saved as gray PNG, RGB PNG and JPEG of several sizes."""
    rng = np.random.default_rng(seed)
    for label, level in (("dark", 40), ("mid", 128), ("bright", 220)):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            size = (12 + 4 * (i % 3), 20 + 2 * (i % 4))
            pixels = np.clip(rng.normal(level, 20, size=(*size, 3)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
            if i % 3 == 0:
                image.convert("L").save(root / label / f"{i}.png")
            elif i % 3 == 1:
                image.save(root / label / f"{i}.png")
            else:
                image.save(root / label / f"{i}.jpg", quality=95)
    return root


def test_mixed_formats_and_sizes_load_as_one_normalised_tensor(tmp_path):
    data = write_images(tmp_path / "data")
    manifest, counts = describe_image_folder(folder_cfg(), data)
    assert manifest["classes"] == ["bright", "dark", "mid"] and sum(counts.values()) == 36
    assert manifest["input_shape"] == [1, 16, 16] and len(manifest["files"]) == 36
    splits = load_splits(data)
    assert splits.train[0].shape[1:] == (1, 16, 16)
    assert abs(float(splits.train[0].mean())) < 1e-4  # normalised with train statistics
    # serving prepares a file exactly like training did
    name, _info = next((n, i) for n, i in manifest["files"].items() if i["split"] == "test")
    served = encode_images(manifest["preprocessing"], [(data / name).read_bytes()])
    assert any(np.allclose(served[0], row, atol=1e-6) for row in splits.test[0])


def test_a_new_class_is_drift(tmp_path):
    data = write_images(tmp_path / "data")
    describe_image_folder(folder_cfg(), data)
    write_images(tmp_path / "extra", per_class=8, seed=2)
    shutil.copytree(tmp_path / "extra" / "dark", data / "new_class")
    with pytest.raises(DataError, match=r"label\(s\) not in the previous version: new_class"):
        describe_image_folder(folder_cfg(), data)


TINY = {
    "data": {"dataset": "image_folder", "image_size": [16, 16]},
    "search": {
        "n_trials": 2,
        "epochs": 3,
        "space": {"families": ["cnn"], "lr": [0.005, 0.02], "optimizers": ["adam"], "depth": [1, 1]},
    },
    "train": {"max_epochs": 12, "patience": 4},
    "compress": {"candidates": {}},
    "validate": {"warmup": 3, "latency_runs": 20, "throughput_runs": 3},
    "gates": {"min_accuracy": 0.8, "max_latency_ratio": None},
    "register": {"model_name": "tiny-digits-png"},
    "tracking": {"experiment": "e2e-images"},
}


@pytest.mark.e2e
def test_image_folder_flow_ships_and_serves_pngs_and_jpegs(tmp_path, prefect_api):
    # Appended images keeping their split, and the warm start on them, are test_data_sources' contract;
    # test_data_table runs them through the flow.
    from flows.optimize import optimize

    digits_png(tmp_path / "data")
    for label in range(3, 10):
        shutil.rmtree(tmp_path / "data" / str(label))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(TINY))
    optimize(config_path=str(tmp_path / "config.yaml"), root=str(tmp_path))
    bundle = tmp_path / "deploy" / "bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["labels"] == ["0", "1", "2"] and manifest["preprocessing"]["kind"] == "image"
    test_files = [
        n
        for n, i in json.loads((tmp_path / "data" / "manifest.json").read_text())["files"].items()
        if i["split"] == "test"
    ][:6]
    pngs = [(tmp_path / "data" / n).read_bytes() for n in test_files]
    jpegs = []
    for png in pngs:  # the same images as a phone would send them: RGB JPEG
        jpeg = io.BytesIO()
        Image.open(io.BytesIO(png)).convert("RGB").save(jpeg, format="JPEG", quality=95)
        jpegs.append(jpeg.getvalue())
    truth = [n.split("/")[0] for n in test_files]
    body, acc = serve_bundle(bundle, {"images": [base64.b64encode(b).decode() for b in pngs + jpegs]}, truth * 2)
    assert acc >= 4 / 6
    assert body["labels"][6:] == body["labels"][:6]  # an RGB JPEG is converted like training data: same class
    with running_server(create_app(BundleSource(bundle), ServeSettings(poll_seconds=60))) as (host, port):
        status, body = request(host, port, "POST", "/predict", {"images": ["bm90IGFuIGltYWdl"]})
        assert status == 400 and "image 0: not a readable PNG/JPEG" in body["error"]
        status, body = request(host, port, "POST", "/predict", {"records": [{"a": 1}]})
        assert status == 400 and "not trained on table data" in body["error"]
