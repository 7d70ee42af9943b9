import hashlib
import json

import numpy as np
import pytest

from deploy.loadtest import load, request, running_server
from deploy.server import BadRequest, BundleSource, create_app, parse_inputs
from tasks.compress_model import compress_candidate
from tasks.evaluate_model import ClassifierEval
from tasks.run_onnx import make_session, predict_logits
from tasks.ship_bundle import publish_copy, ship_bundle


@pytest.fixture(scope="module")
def bundles(cnn_checkpoint, mlp_checkpoint, data_dir, train_cfg, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bundles")
    out = {}
    for name, ckpt in (("cnn", cnn_checkpoint), ("mlp", mlp_checkpoint)):
        onnx_path = compress_candidate(name, [], ckpt, data_dir, train_cfg, tmp / "c").onnx
        out[name] = ship_bundle(onnx_path, tmp / name, ClassifierEval(data_dir), "v.dir", {"candidate": name})
    return out


@pytest.fixture()
def server(bundles, tmp_path):
    served = publish_copy(bundles["cnn"], tmp_path / "served")
    with running_server(create_app(BundleSource(served), poll_seconds=0.1)) as (host, port):
        yield host, port, served


def sha(bundle):
    return json.loads((bundle / "manifest.json").read_text())["sha256"]


def test_predict_matches_onnx_runtime(server, bundles, splits):
    host, port, _ = server
    x = splits.test[0][:5]
    status, body = request(host, port, "POST", "/predict", {"inputs": x.tolist()})
    assert status == 200 and body["model_sha256"] == sha(bundles["cnn"])
    expected = predict_logits(make_session(bundles["cnn"] / "model.onnx"), x)
    np.testing.assert_allclose(np.array(body["logits"]), expected, rtol=1e-5, atol=1e-5)
    assert body["predictions"] == expected.argmax(1).tolist()
    status, single = request(host, port, "POST", "/predict", {"inputs": x[0].tolist()})  # one sample, no batch axis
    assert status == 200 and single["predictions"] == body["predictions"][:1]


def test_health_and_model_info(server, bundles):
    host, port, _ = server
    assert request(host, port, "GET", "/health")[1]["model_sha256"] == sha(bundles["cnn"])
    info = request(host, port, "GET", "/model-info")[1]
    assert info["inputs"][0]["shape"] == ["batch", 1, 8, 8] and info["candidate"] == "cnn"


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    ({"data": []}, 400, '"inputs"'),
    ({"inputs": [[1, 2], [3]]}, 400, "rectangular"),
    ({"inputs": "eight by eight"}, 400, "only numbers"),
    ({"inputs": np.zeros((2, 64)).tolist()}, 400, "expected ['batch', 1, 8, 8]"),
    ({"inputs": np.zeros((2, 1, 8, 7)).tolist()}, 400, "shape [2, 1, 8, 7]"),
    ({"inputs": []}, 400, "shape [0]"),
    ({"inputs": np.full((1, 1, 8, 8), np.nan).tolist()}, 400, "NaN"),
    ({"inputs": np.zeros((1025, 1, 8, 8)).tolist()}, 413, "limit of 1024"),
])
def test_malformed_input_is_a_clear_4xx_and_the_server_survives(server, body, status, message):
    host, port, _ = server
    got_status, got = request(host, port, "POST", "/predict", body)
    assert got_status == status and message in got["error"], got
    assert request(host, port, "GET", "/health")[0] == 200


def test_parse_inputs_rejects_empty_batch():
    with pytest.raises(BadRequest) as err:
        parse_inputs({"inputs": np.zeros((0, 1, 8, 8)).tolist()}, (1, 8, 8))
    assert err.value.status == 400


def test_reload_under_load_drops_no_request(server, bundles):
    host, port, served = server
    sample = {"inputs": np.zeros((1, 1, 8, 8)).tolist()}
    report = load(host, port, sample, seconds=3, threads=4, max_requests=20_000,
                  halfway=lambda: publish_copy(bundles["mlp"], served))
    assert report.errors == 0 and report.requests > 100
    assert report.models_seen == (sha(bundles["cnn"]), sha(bundles["mlp"]))  # old model, then the new one
    health = request(host, port, "GET", "/health")[1]
    assert health["model_sha256"] == sha(bundles["mlp"]) and health["reloads"] == 1


def test_broken_new_bundle_keeps_the_old_model(server, bundles, tmp_path):
    host, port, served = server
    broken = tmp_path / "broken"
    broken.mkdir()
    # The hash matches (so this tests the next line of defence: a model ORT cannot load).
    (broken / "manifest.json").write_text(json.dumps({"sha256": hashlib.sha256(b"garbage").hexdigest(),
                                                      "model_file": "model.onnx", "input_shape": [1, 8, 8]}))
    (broken / "model.onnx").write_bytes(b"garbage")
    publish_copy(broken, served)
    status, reload = request(host, port, "POST", "/reload")  # whether the watcher got there first or not
    assert status == 200 and not reload["reloaded"] and "Protobuf" in reload["last_reload_error"]
    assert request(host, port, "GET", "/health")[1]["reloads"] == 0
    status, body = request(host, port, "POST", "/predict", {"inputs": np.zeros((1, 1, 8, 8)).tolist()})
    assert status == 200 and body["model_sha256"] == sha(bundles["cnn"])
