"""The model server (serve/): predictions equal ONNX Runtime's, the Open Inference Protocol v2 with
Triton's own client, probes, metrics, auth, batching on and off, the bounded queue, reloads, the
Triton export, and `modelforge serve` as a process: a registry alias, --max-body-mb, SIGTERM drain."""

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest

from deploy.loadtest import load, request, running_server
from flows.cli import main
from serve.app import create_app
from serve.runtime import CurvePoint, plan_batching
from serve.settings import ServeSettings
from serve.sources import BundleSource
from tasks.compress.recipe import compress_candidate
from tasks.core.prefect import free_port
from tasks.onnx.runtime import make_session, predict_logits
from tasks.release.evaluate import ClassifierEval
from tasks.release.ship import publish_copy, ship_bundle

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "t0ken-for-the-tests-only"


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
    with running_server(create_app(BundleSource(served), ServeSettings(poll_seconds=0.1))) as (host, port):
        yield host, port, served


def sha(bundle):
    return json.loads((bundle / "manifest.json").read_text())["sha256"]


def get(host, port, path, token=None):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def post(host, port, path, body, token=None) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
        conn.request("POST", path, body=json.dumps(body), headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}"), dict(resp.getheaders())
    finally:
        conn.close()


def metric(text: str, name: str, **labels) -> float:
    """The value of one Prometheus sample in an exposition (0 when absent)."""
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample.split("{")[0] == name and all(f'{k}="{v}"' in sample for k, v in labels.items()):
            return float(value)
    return 0.0


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


def test_model_info_says_whether_batching_pays_on_this_cpu(server, bundles):
    host, port, _ = server
    assert request(host, port, "GET", "/health")[1]["model_sha256"] == sha(bundles["cnn"])
    info = request(host, port, "GET", "/model-info")[1]
    assert info["inputs"][0]["shape"] == ["batch", 1, 8, 8] and info["candidate"] == "cnn"
    batching, threads = info["batching"], info["threads"]
    assert threads["workers"] * threads["intra_op_threads"] <= threads["cores"]
    curve = [CurvePoint(**p) for p in batching["curve"]]
    assert [p.batch for p in curve] == [2**i for i in range(len(curve))] and len(curve) >= 4  # measured at start
    decided = plan_batching(curve, 2.0, 50.0)  # the defaults: the same curve gives the same decision
    assert (batching["enabled"], batching["max_batch"], batching["reason"]) == (
        decided.enabled,
        decided.max_batch,
        decided.reason,
    )


@pytest.mark.parametrize(
    "curve, enabled, max_batch, why",
    [
        ([(1, 1.0, 1.2), (2, 1.1, 1.3), (4, 1.3, 1.6), (8, 2.0, 2.4)], True, 8, "batching on"),  # 4x at batch 8
        ([(1, 10.0, 12.0), (2, 19.0, 22.0), (4, 38.0, 45.0)], False, 1, "under the 1.2x"),  # compute-bound: no gain
        (
            [(1, 1.0, 1.2), (2, 1.9, 2.2), (4, 1.5, 60.0)],
            False,
            1,
            "within the 50 ms p99 target: 1.05x",
        ),  # the gain lies beyond the p99 target
        ([(1, 80.0, 90.0), (2, 90.0, 95.0)], False, 1, "beyond the 50 ms target"),
    ],
)
def test_batching_is_enabled_only_where_it_raises_throughput_within_the_p99_target(curve, enabled, max_batch, why):
    points = [CurvePoint(b, p50, p99, round(b / p50 * 1000, 1)) for b, p50, p99 in curve]
    plan = plan_batching(points, 2.0, 50.0)
    assert (plan.enabled, plan.max_batch) == (enabled, max_batch) and why in plan.reason, plan.reason


@pytest.mark.parametrize("mode", ["on", "off"])
def test_batching_on_coalesces_concurrent_requests_and_off_does_not(bundles, tmp_path, splits, mode):
    settings = ServeSettings(batching=mode, max_batch=64, max_wait_ms=100)
    x = splits.test[0][:16]
    expected = predict_logits(make_session(bundles["cnn"] / "model.onnx"), x)
    with running_server(create_app(BundleSource(bundles["cnn"]), settings)) as (host, port):
        start = threading.Barrier(16)

        def one(i):
            start.wait()
            return request(host, port, "POST", "/predict", {"inputs": x[i : i + 1].tolist()})

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(one, range(16)))
        info = request(host, port, "GET", "/model-info")[1]["batching"]
        text = get(host, port, "/metrics")[1]
    assert all(status == 200 for status, _ in answers)
    np.testing.assert_allclose(np.array([b["logits"][0] for _, b in answers]), expected, rtol=1e-4, atol=1e-4)
    calls, samples = metric(text, "modelforge_batch_size_count"), metric(text, "modelforge_batch_size_sum")
    assert samples == 16 and info["enabled"] == (mode == "on")
    if mode == "on":
        assert calls < 16, f"{calls:.0f} ORT calls for 16 concurrent requests: nothing was coalesced"
    else:
        assert calls == 16 and metric(text, "modelforge_batch_size_bucket", le="1.0") == 16


class GatedSource(BundleSource):
    """A bundle folder whose loads wait for the test to open the gate: what a slow load looks like."""

    def __init__(self, bundle_dir):
        super().__init__(bundle_dir)
        self.gate = threading.Event()

    def load(self, options):
        assert self.gate.wait(30)
        return super().load(options)


def wait_until(check, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_not_ready_while_loading_and_while_a_reload_verifies_but_always_live(bundles, tmp_path):
    served = publish_copy(bundles["cnn"], tmp_path / "served")
    source = GatedSource(served)
    app = create_app(source, ServeSettings(poll_seconds=0.05))
    sample = {"inputs": np.zeros((1, 1, 8, 8)).tolist()}
    with running_server(app, wait_ready=False) as (host, port):
        assert get(host, port, "/livez")[0] == 200 and get(host, port, "/v2/health/live")[0] == 200
        status, body = get(host, port, "/readyz")
        assert status == 503 and "loading" in body and get(host, port, "/v2/health/ready")[0] == 503
        status, body, headers = post(host, port, "/predict", sample)
        assert status == 503 and "loading" in body["error"] and headers["retry-after"] == "1"
        source.gate.set()
        wait_until(lambda: get(host, port, "/readyz")[0] == 200)
        source.gate.clear()
        publish_copy(bundles["mlp"], served)
        wait_until(lambda: "verifying" in get(host, port, "/readyz")[1])
        assert get(host, port, "/v2/health/ready")[0] == 503 and get(host, port, "/livez")[0] == 200
        status, body, _ = post(host, port, "/predict", sample)  # the verified model keeps answering meanwhile
        assert status == 200 and body["model_sha256"] == sha(bundles["cnn"])
        source.gate.set()
        wait_until(lambda: get(host, port, "/readyz")[0] == 200)
        assert post(host, port, "/predict", sample)[1]["model_sha256"] == sha(bundles["mlp"])


def test_v2_protocol_with_the_triton_client(bundles, splits):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    x = splits.test[0][:4].astype(np.float32)
    expected = predict_logits(make_session(bundles["cnn"] / "model.onnx"), x)
    with running_server(create_app(BundleSource(bundles["cnn"]), ServeSettings(model_name="digits"))) as (host, port):
        client = triton.InferenceServerClient(f"{host}:{port}")
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
        meta = client.get_model_metadata("digits")
        graph = onnx.load(str(bundles["cnn"] / "model.onnx"))
        assert [i["name"] for i in meta["inputs"]] == [i.name for i in graph.graph.input]
        assert meta["inputs"][0]["datatype"] == "FP32" and meta["inputs"][0]["shape"] == [-1, 1, 8, 8]
        assert meta["outputs"][0]["shape"] == [-1, 10] and meta["versions"] == ["1"]
        for binary in (True, False):  # Triton's binary tensor extension (its default) and plain JSON
            tensor = triton.InferInput(meta["inputs"][0]["name"], list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            output = triton.InferRequestedOutput(meta["outputs"][0]["name"], binary_data=binary)
            result = client.infer("digits", [tensor], outputs=[output], request_id="r1")
            np.testing.assert_allclose(result.as_numpy(meta["outputs"][0]["name"]), expected, rtol=1e-5, atol=1e-5)
            assert result.get_response()["id"] == "r1"
        wrong = triton.InferInput(meta["inputs"][0]["name"], list(x.shape), "INT64")
        wrong.set_data_from_numpy(x.astype(np.int64))
        with pytest.raises(InferenceServerException) as err:
            client.infer("digits", [wrong])
        assert err.value.status() == "400" and "datatype INT64, the model expects FP32" in err.value.message()
        with pytest.raises(InferenceServerException) as err:
            client.get_model_metadata("other")
        assert err.value.status() == "404" and "serves 'digits'" in err.value.message()
        client.close()


def test_auth_token_on_everything_but_the_probes_docs_off_metrics_and_read_timeouts(bundles):
    settings = ServeSettings(auth_token=TOKEN, read_timeout_s=0.5)
    sample = {"inputs": np.zeros((2, 1, 8, 8)).tolist()}
    with running_server(create_app(BundleSource(bundles["cnn"]), settings)) as (host, port):
        for probe in ("/livez", "/readyz", "/v2/health/live", "/v2/health/ready"):
            assert get(host, port, probe)[0] == 200, probe
        for path in ("/health", "/model-info", "/metrics", "/v2/models/model", "/docs", "/openapi.json"):
            assert get(host, port, path)[0] == 401, path
            assert get(host, port, path, token="wrong-token-of-some-length")[0] == 401, path
        assert post(host, port, "/predict", sample)[0] == 401 and post(host, port, "/reload", {})[0] == 401
        assert post(host, port, "/predict", sample, TOKEN)[0] == 200
        assert get(host, port, "/docs", TOKEN)[0] == 404  # off unless asked for
        status, text = get(host, port, "/metrics", TOKEN)
        assert status == 200
        assert metric(text, "modelforge_requests_total", endpoint="/predict", status="200") == 1
        assert metric(text, "modelforge_requests_total", endpoint="unmatched", status="401") >= 2
        assert metric(text, "modelforge_queue_duration_seconds_count") == 1
        assert metric(text, "modelforge_inference_duration_seconds_count") == 1
        assert metric(text, "modelforge_batch_size_sum") == 2 and "modelforge_queue_depth 0.0" in text
        assert f'modelforge_model_info{{candidate="cnn",family="classifier",sha256="{sha(bundles["cnn"])}"' in text
        # a client that trickles its headers is cut off; one that never finishes its body gets a 408
        with socket.create_connection((host, port)) as slow:
            slow.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
            slow.settimeout(5)
            assert slow.recv(100) == b""  # closed by the server
        with socket.create_connection((host, port)) as slow:
            slow.sendall(
                f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: "
                'application/json\r\nContent-Length: 100\r\n\r\n{"inputs"'.encode()
            )
            slow.settimeout(5)
            assert slow.recv(100).startswith(b"HTTP/1.1 408")
    with running_server(create_app(BundleSource(bundles["cnn"]), ServeSettings(docs=True))) as (host, port):
        assert get(host, port, "/docs")[0] == 200


def test_binding_beyond_loopback_needs_a_token_and_threads_fit_the_cores(bundles, monkeypatch, capsys):
    monkeypatch.delenv("MODELFORGE_AUTH_TOKEN", raising=False)
    assert main(["serve", "--bundle", str(bundles["cnn"]), "--host", "0.0.0.0"]) == 2
    assert "beyond loopback: pass --auth-token" in capsys.readouterr().err
    monkeypatch.setenv("MODELFORGE_AUTH_TOKEN", TOKEN)
    assert ServeSettings(host="0.0.0.0").auth_token == TOKEN
    cores = len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match=f"exceed the {cores} cores"):
        ServeSettings(workers=cores, intra_op_threads=2)
    assert ServeSettings(workers=cores).threads_per_worker == 1


class SlowSession:  # the real session, slower per call (sleep releases the GIL, as ORT does)
    def __init__(self, session, seconds):
        self.session, self.seconds = session, seconds

    def run(self, *args):
        time.sleep(self.seconds)
        return self.session.run(*args)

    def __getattr__(self, name):
        return getattr(self.session, name)


def test_a_full_queue_is_a_429_and_a_missed_deadline_a_503_with_retry_after(bundles):
    import dataclasses

    settings = ServeSettings(batching="off", max_queue=2, request_timeout_ms=1000)
    app = create_app(BundleSource(bundles["cnn"]), settings)
    with running_server(app) as (host, port):
        holder = app.state.ctx.holder
        holder.model = dataclasses.replace(holder.model, session=SlowSession(holder.model.session, 0.6))
        start = threading.Barrier(8)

        def one(_):
            start.wait()
            return post(host, port, "/predict", {"inputs": np.zeros((1, 1, 8, 8)).tolist()})

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(8)))
    statuses = sorted(status for status, _, _ in answers)
    assert set(statuses) == {200, 429, 503}, statuses
    for status, body, headers in answers:
        if status != 200:
            assert int(headers["retry-after"]) >= 1 and (
                "queue is full" in body["error"] or "deadline" in body["error"]
            )


def test_reload_under_load_drops_no_request(server, bundles):
    host, port, served = server
    sample = {"inputs": np.zeros((1, 1, 8, 8)).tolist()}
    report = load(
        host,
        port,
        sample,
        seconds=3,
        threads=4,
        max_requests=20_000,
        halfway=lambda: publish_copy(bundles["mlp"], served),
    )
    assert report.errors == 0 and report.requests > 100
    assert report.models_seen == (sha(bundles["cnn"]), sha(bundles["mlp"]))  # old model, then the new one
    health = request(host, port, "GET", "/health")[1]
    assert health["model_sha256"] == sha(bundles["mlp"]) and health["reloads"] == 1
    assert metric(get(host, port, "/metrics")[1], "modelforge_reloads_total") == 1


def test_broken_new_bundle_keeps_the_old_model(server, bundles, tmp_path):
    host, port, served = server
    broken = tmp_path / "broken"
    broken.mkdir()
    # The hash matches (so this tests the next line of defence: a model ORT cannot load).
    (broken / "manifest.json").write_text(
        json.dumps(
            {"sha256": hashlib.sha256(b"garbage").hexdigest(), "model_file": "model.onnx", "input_shape": [1, 8, 8]}
        )
    )
    (broken / "model.onnx").write_bytes(b"garbage")
    publish_copy(broken, served)
    status, reload = request(host, port, "POST", "/reload")  # whether the watcher got there first or not
    assert status == 200 and not reload["reloaded"] and "Protobuf" in reload["last_reload_error"]
    assert request(host, port, "GET", "/health")[1]["reloads"] == 0
    status, body = request(host, port, "POST", "/predict", {"inputs": np.zeros((1, 1, 8, 8)).tolist()})
    assert status == 200 and body["model_sha256"] == sha(bundles["cnn"])
    assert metric(get(host, port, "/metrics")[1], "modelforge_reload_failures_total") == 1


def test_export_triton_writes_a_repository_matching_the_onnx_signature(bundles, tmp_path, capsys):
    import importlib.util

    import tritonclient
    from google.protobuf import text_format

    # Triton's own ModelConfig schema, shipped with its client (the grpc package around it needs grpcio).
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    schema = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(schema)

    assert (
        main(
            [
                "export-triton",
                "--bundle",
                str(bundles["cnn"]),
                "--out",
                str(tmp_path / "repo"),
                "--name",
                "digits",
                "--max-batch-size",
                "32",
            ]
        )
        == 0
    )
    config = text_format.Parse((tmp_path / "repo" / "digits" / "config.pbtxt").read_text(), schema.ModelConfig())
    model_bytes = (tmp_path / "repo" / "digits" / "1" / "model.onnx").read_bytes()
    assert hashlib.sha256(model_bytes).hexdigest() == sha(bundles["cnn"])
    graph = onnx.load_model_from_string(model_bytes).graph
    dims = lambda v: [d.dim_value or -1 for d in v.type.tensor_type.shape.dim]
    assert config.name == "digits" and config.platform == "onnxruntime_onnx" and config.max_batch_size == 32
    for got, want in ((config.input, graph.input), (config.output, graph.output)):
        assert [(t.name, list(t.dims)) for t in got] == [(v.name, dims(v)[1:]) for v in want]  # batch axis implied
        assert all(schema.DataType.Name(t.data_type) == "TYPE_FP32" for t in got)
    assert config.HasField("dynamic_batching") and config.instance_group[0].kind == schema.ModelInstanceGroup.KIND_CPU
    assert (tmp_path / "repo" / "digits" / "labels.txt").read_text().split() == [str(i) for i in range(10)]
    assert (
        main(["export-triton", "--bundle", str(bundles["cnn"]), "--out", str(tmp_path / "repo"), "--name", "digits"])
        == 2
        and "exists" in capsys.readouterr().err
    )


def registry_with_two_versions(root: Path, bundles) -> str:
    """An MLflow store holding `tiny` v1 (the CNN bundle, alias champion) and v2 (the MLP bundle)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri, registry_uri=uri)  # else a registry URI set earlier in the process wins
    client.create_registered_model("tiny")
    experiment = client.create_experiment("serve", artifact_location=str(root / "artifacts"))
    for name in ("cnn", "mlp"):
        run = client.create_run(experiment)
        client.log_artifacts(run.info.run_id, str(bundles[name]), "bundle")
        client.create_model_version("tiny", f"runs:/{run.info.run_id}/bundle", run.info.run_id)
        client.set_terminated(run.info.run_id)
    client.set_registered_model_alias("tiny", "champion", "1")
    return uri


def test_cli_serves_a_registry_alias_follows_it_limits_bodies_and_drains_on_sigterm(bundles, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = registry_with_two_versions(tmp_path, bundles)
    (tmp_path / "c.yaml").write_text(f"tracking: {{uri: '{uri}'}}\n")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "serve",
            "--model-uri",
            "models:/tiny@champion",
            "--config",
            str(tmp_path / "c.yaml"),
            "--root",
            str(tmp_path),
            "--port",
            str(port),
            "--max-body-mb",
            "0.01",
            "--poll-seconds",
            "0.2",
            "--drain-grace-s",
            "1",
            "--drain-timeout-s",
            "10",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    host = "127.0.0.1"
    try:
        wait_until(lambda: _ready(host, port) or proc.poll() is not None, timeout=120)
        assert proc.poll() is None, proc.communicate()[0][-3000:]  # a server that died at start says why
        assert request(host, port, "GET", "/health")[1]["model_sha256"] == sha(bundles["cnn"])
        status, body = request(host, port, "POST", "/predict", {"inputs": np.zeros((40, 1, 8, 8)).tolist()})
        assert status == 413 and "limit of 10485 bytes" in body["error"]  # --max-body-mb 0.01
        MlflowClient(uri, registry_uri=uri).set_registered_model_alias(
            "tiny", "champion", "2"
        )  # the alias moves: the server follows
        wait_until(lambda: request(host, port, "GET", "/health")[1]["model_sha256"] == sha(bundles["mlp"]))

        # SIGTERM under load: not ready at once, requests keep being answered, then a clean exit 0
        results, stop, signalled = [], threading.Event(), threading.Event()

        def client():
            conn, fresh = http.client.HTTPConnection(host, port, timeout=10), True
            while not stop.is_set():
                try:
                    conn.request(
                        "POST",
                        "/predict",
                        body=json.dumps({"inputs": np.zeros((1, 1, 8, 8)).tolist()}),
                        headers={"Content-Type": "application/json"},
                    )
                    resp = conn.getresponse()
                    resp.read()
                    results.append(resp.status)
                    fresh = resp.getheader("connection") == "close"  # draining: reconnect, as a balancer would
                    if fresh:
                        conn.close()
                        conn = http.client.HTTPConnection(host, port, timeout=10)
                except OSError as err:
                    if isinstance(err, ConnectionRefusedError) or (fresh and signalled.is_set()):
                        return  # a connection the closing listener never accepted: nothing was dropped
                    results.append(type(err).__name__)
                    return
                except http.client.HTTPException as err:
                    if fresh and signalled.is_set():
                        return
                    results.append(type(err).__name__)
                    return

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        sent_at = time.monotonic()
        signalled.set()
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: get(host, port, "/readyz")[0] == 503, timeout=1)
        assert proc.wait(timeout=15) == 0
        stop.set()
        for t in threads:
            t.join(10)
        assert time.monotonic() - sent_at < 10
        assert len(results) > 20 and set(results) == {200}, [r for r in results if r != 200][:5]
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.communicate()[0]
    assert "SIGTERM: draining" in output, output[-2000:]


def _ready(host, port) -> bool:
    try:
        return get(host, port, "/readyz")[0] == 200
    except OSError:
        return False
