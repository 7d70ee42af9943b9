"""End to end: the real optimize-encoder flow on a 2-layer MiniLM and a small corpus, in a
throw-away project folder: DVC-versioned corpus, export, candidates, fidelity gates, registry,
bundle with tokenizer, promotion."""

import json

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from transformers import AutoTokenizer

from deploy.loadtest import request, running_server
from flows.encode import optimize_encoder
from serve.app import create_app
from serve.sources import BundleSource
from tasks.core.tracking import TrackingConfig
from tasks.data.docstrings import load_sentences
from tasks.data.version import read_data_md5
from tasks.encoder.minilm import encode_torch, load_minilm, tokenize
from tasks.onnx.runtime import make_session
from tasks.release.compare import compare_runs
from tasks.release.ship import sha256_of

pytestmark = pytest.mark.e2e

TINY = {
    "family": "minilm",
    "data": {"train_sentences": 96, "eval_sentences": 60, "queries": 20},
    "encoder": {"num_layers": 2},
    "compress": {
        "candidates": {
            "int8": [{"method": "ort_optimize"}, {"method": "quantize_dynamic", "per_channel": True}],
            # One layer trained for one short epoch: far from the teacher, so the fidelity gates must reject it.
            "student": [{"method": "distill_layers", "keep": [1], "epochs": 1, "lr": 1e-4, "batch": 32}],
            "student_int8": [
                {"method": "distill_layers", "keep": [1], "epochs": 1, "lr": 1e-4, "batch": 32},
                {"method": "quantize_dynamic", "per_channel": True},
            ],
        }
    },
    "validate": {"warmup": 2, "latency_runs": 10, "throughput_batch": 4, "throughput_runs": 2},
    "gates": {"min_cosine_worst": 0.95, "min_cosine_mean": 0.98, "min_top10_overlap": 0.6, "max_latency_ratio": None},
    "register": {"model_name": "tiny-minilm"},
    "tracking": {"experiment": "e2e-minilm"},
}


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, prefect_api):
    root = tmp_path_factory.mktemp("project")
    (root / "config.yaml").write_text(yaml.safe_dump(TINY))
    result = optimize_encoder(config_path=str(root / "config.yaml"), root=str(root))
    return root, result


def test_encoder_run_ships_a_gated_registered_model(shipped):
    root, result = shipped
    assert result["data_version"] == read_data_md5(root / "corpus.dvc")
    sentences = load_sentences(root / "corpus")
    assert len(sentences.train) == 96 and len(sentences.eval) == 60 and not set(sentences.train) & set(sentences.eval)

    mlflow.set_tracking_uri(f"sqlite:///{root}/.modelforge/mlflow.db")
    client = MlflowClient()
    run = client.get_run(result["run_id"])
    m = run.data.metrics
    assert run.info.status == "FINISHED" and run.data.tags["chosen_candidate"] == result["chosen"]
    assert m["baseline.cosine_min"] == pytest.approx(1.0, abs=1e-6)  # the reference against itself
    assert 0.95 <= m["int8.cosine_min"] < 1.0 and m["int8.size_bytes"] < m["baseline.size_bytes"] / 3
    assert m["student.passed"] == 0.0  # the crippled student is rejected on fidelity
    reports = {
        r["name"]: r
        for r in json.loads(mlflow.artifacts.load_text(f"runs:/{result['run_id']}/candidates/reports.json"))
    }
    assert any("cosine" in gate for gate in reports["student"]["failed_gates"])
    compression = json.loads(mlflow.artifacts.load_text(f"runs:/{result['run_id']}/candidates/compression.json"))
    trained, reused = (compression[k]["info"]["distill_layers"] for k in ("student", "student_int8"))
    assert not trained["reused"] and reused["reused"]  # one student, trained once for both recipes
    assert reused["loss_history"] == trained["loss_history"] and len(trained["loss_history"]) == 1
    assert reports["baseline"]["parity_max_abs"] < 1e-4 and reports["student"]["parity_max_abs"] < 1e-4

    version = client.get_model_version_by_alias("tiny-minilm", "champion")
    assert str(version.version) == result["version"] and result["promoted"]
    [row] = compare_runs(TrackingConfig(uri=f"sqlite:///{root}/.modelforge/mlflow.db", experiment="e2e-minilm"))
    assert row["chosen"] == result["chosen"] and row["quality"].startswith("cosine_min 0.9")


def test_bundle_serves_embeddings_with_its_own_tokenizer(shipped):
    root, result = shipped
    bundle = root / "deploy" / "minilm-bundle"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["sha256"] == sha256_of(bundle / "model.onnx")
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask"]
    assert manifest["candidate"] == result["chosen"] and manifest["data_version"] == result["data_version"]
    tokenizer = AutoTokenizer.from_pretrained(str(bundle / manifest["tokenizer_dir"]))
    texts = ["Return the number of items in a container.", "Open a file and return a stream."]
    feeds = tokenize(tokenizer, texts, manifest["max_length"])
    got = make_session(bundle / "model.onnx").run(None, feeds)[0]
    teacher, _ = load_minilm(num_layers=2)
    cosine = (got * encode_torch(teacher, feeds)).sum(1)
    assert got.shape == (2, 384) and cosine.min() > 0.95  # the shipped model still encodes like the teacher
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)


def test_server_embeds_texts_with_the_shipped_encoder(shipped):
    root, _ = shipped
    bundle = root / "deploy" / "minilm-champion"
    manifest = json.loads((bundle / "manifest.json").read_text())
    texts = ["Return a new sorted list.", "Close the connection to the server."]
    with running_server(create_app(BundleSource(bundle))) as (host, port):
        status, body = request(host, port, "POST", "/embed", {"texts": texts})
        assert status == 200 and body["model_sha256"] == manifest["sha256"]
        tokenizer = AutoTokenizer.from_pretrained(str(bundle / "tokenizer"))
        expected = make_session(bundle / "model.onnx").run(None, tokenize(tokenizer, texts, 128))[0]
        np.testing.assert_allclose(np.array(body["embeddings"]), expected, atol=1e-5)
        # the same texts as a BYTES tensor through the Open Inference Protocol v2, with Triton's client
        import tritonclient.http as triton

        client = triton.InferenceServerClient(f"{host}:{port}")
        text = triton.InferInput("text", [len(texts)], "BYTES")
        text.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
        output = manifest["outputs"][0]["name"]
        np.testing.assert_allclose(client.infer("tiny-minilm", [text]).as_numpy(output), expected, atol=1e-5)
        assert request(host, port, "POST", "/embed", {"texts": ["ok", 3]}) == (
            400,
            {"error": "texts[1] is not a non-empty string (1 such item(s))"},
        )
        status, body = request(host, port, "POST", "/predict", {"inputs": [[0.0]]})
        assert status == 400 and "sentence encoder" in body["error"]
