"""Serving benchmark: one registered model served three ways, driven side by side in one run.

    .venv/bin/python bench/serve.py [--seconds 3] [--rounds 2] [--bentoml-venv /tmp/bentoml-venv]

Two models are trained briefly on digits, exported and registered (MLflow registry, alias
`champion`, with the modelforge bundle logged beside the MLflow ONNX model): a small CNN like the
default digits champion (server overhead dominates) and a wide residual CNN (compute-bound). Each is
served by `modelforge serve --model-uri models:/<name>@champion`, by `mlflow models serve -m
models:/<name>@champion --env-manager local`, and by BentoML with adaptive batching (in its own
virtual environment; its rows are skipped, saying why, where it cannot be installed). Closed-loop
keep-alive clients on loopback send one sample per request at concurrency 1, 8 and 32, in rounds
that interleave the servers, each step bounded in time. Then modelforge alone under load: the alias
moves (a reload) and SIGTERM drains it; every request must be answered.

Ends with `RESULT serve_vs_mlflow_c32=<> serve_vs_bentoml_c32=<> serve_p50_vs_mlflow_c1=<>
serve_drain_dropped=<>` (ratios: the worse of the two models).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 8, 32)
BENTO_SERVICE = """
import os

import bentoml
import numpy as np
import onnxruntime as ort


@bentoml.service(workers=1)
class Classifier:
    def __init__(self):
        self.session = ort.InferenceSession(os.environ["BENCH_MODEL"], providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    @bentoml.api(batchable=True, max_batch_size=64, max_latency_ms=1000)
    def predict(self, inputs: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: inputs.astype(np.float32)})[0]
"""


# --- models ------------------------------------------------------------------------------------------


def build_models(work: Path) -> dict[str, dict]:
    """Train, export, ship and register the two models (and a second digits version for the reload)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from tasks.compress.recipe import compress_candidate
    from tasks.data import load_splits
    from tasks.data.digits import DataConfig, materialize_digits
    from tasks.models import Arch, build_model, save_checkpoint
    from tasks.onnx.runtime import make_session
    from tasks.release.evaluate import ClassifierEval
    from tasks.release.register import RegisterConfig, register_model
    from tasks.release.ship import ship_bundle
    from tasks.train.loop import TrainParams, fit
    from tasks.train.stage import TrainConfig

    data = work / "data"
    materialize_digits(DataConfig(), data)
    splits = load_splits(data)
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    experiment = client.create_experiment("bench-serve", artifact_location=str(work / "artifacts"))
    archs = {
        "bench-digits": [
            Arch("cnn", 10, (1, 8, 8), conv=(8, 16), hidden=(32,)),
            Arch("mlp", 10, (1, 8, 8), hidden=(64,)),
        ],
        "bench-resnet": [Arch("resnet", 10, (1, 8, 8), conv=(128, 256))],
    }
    models = {}
    for name, versions in archs.items():
        for i, arch in enumerate(versions, 1):
            import torch

            torch.manual_seed(i)
            model = build_model(arch)
            epochs = 1 if arch.family == "resnet" else 3  # serving speed, not accuracy, is measured here
            fit(model, splits.train, splits.val, TrainParams(lr=0.01, optimizer="adam", epochs=epochs, patience=epochs))
            ckpt = save_checkpoint(work / f"{name}-{i}.pt", model, arch, {})
            onnx_path = compress_candidate(
                "baseline", [], ckpt, data, TrainConfig(max_epochs=1), work / f"c-{name}-{i}"
            ).onnx
            bundle = ship_bundle(
                onnx_path,
                work / f"bundle-{name}-{i}",
                ClassifierEval(data),
                "bench",
                {"candidate": arch.family, "registered_model": {"name": name, "version": str(i)}},
            )
            with mlflow.start_run(experiment_id=experiment) as run:  # as the pipeline registers and ships
                mlflow.log_artifacts(str(bundle), "bundle")
            register_model(
                onnx_path, RegisterConfig(model_name=name, alias="candidate"), run.info.run_id, ClassifierEval(data)
            )
            if i == 1:
                x = splits.test[0][:2]
                client.set_registered_model_alias(name, "champion", "1")
                session = make_session(onnx_path, intra_op_threads=1)
                start = time.perf_counter()
                for _ in range(50):
                    session.run(None, {session.get_inputs()[0].name: x[:1]})
                ms = (time.perf_counter() - start) / 50 * 1e3
                models[name] = {"onnx": bundle / "model.onnx", "sample": splits.test[0][:1].tolist(), "ort_ms": ms}
                print(f"[bench] {name}: {arch.family}, ORT batch-1 {ms:.2f} ms on one thread", flush=True)
    return models


# --- servers -----------------------------------------------------------------------------------------


@dataclass
class Server:
    kind: str
    port: int
    proc: subprocess.Popen
    ready_path: str
    log: Path

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{self.ready_path}", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait()


def free_port() -> int:
    from tasks.core.prefect import free_port as port

    return port()


def start(kind: str, model: str, info: dict, work: Path, bentoml_venv: Path | None, extra: tuple = ()) -> Server:
    port = free_port()
    # mlflow starts `uvicorn` by name: this interpreter's scripts must come first on PATH
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if kind == "modelforge":
        cmd = [
            sys.executable,
            "-m",
            "flows.cli",
            "serve",
            "--model-uri",
            f"models:/{model}@champion",
            "--config",
            str(work / "config.yaml"),
            "--root",
            str(work),
            "--port",
            str(port),
            *extra,
        ]
        ready = "/readyz"
    elif kind == "mlflow":
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            f"models:/{model}@champion",
            "--env-manager",
            "local",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ]
        ready = "/ping"
    else:
        (work / "bento").mkdir(exist_ok=True)
        (work / "bento" / "service.py").write_text(BENTO_SERVICE)
        cmd = [
            str(bentoml_venv / "bin" / "bentoml"),
            "serve",
            "service:Classifier",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        env = {
            **os.environ,
            "BENCH_MODEL": str(info["onnx"]),
            "BENTOML_HOME": str(work / "bentoml-home"),
            "BENTOML_DO_NOT_TRACK": "true",
        }
        ready = "/readyz"
    log = work / f"{kind}-{model}-{port}.log"
    proc = subprocess.Popen(
        cmd,
        cwd=work / "bento" if kind == "bentoml" else ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = Server(kind, port, proc, ready, log)
    deadline = time.monotonic() + 180
    while not server.ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"{kind} did not start serving {model}: {log.read_text()[-1500:]}")
        time.sleep(0.2)
    return server


def bentoml_available(venv: Path) -> str | None:
    """None when BentoML runs from `venv` (installed there on demand, bounded in time), else why not."""
    bentoml = venv / "bin" / "bentoml"
    if not bentoml.exists():
        try:
            subprocess.run(["python3", "-m", "venv", str(venv)], check=True, timeout=120)
            subprocess.run(
                [str(venv / "bin" / "pip"), "install", "-q", "bentoml==1.4.40", "onnxruntime==1.32.0", "numpy==2.4.6"],
                check=True,
                timeout=900,
            )
        except (subprocess.SubprocessError, OSError) as err:
            return f"could not install BentoML into {venv}: {err}"
    return None if bentoml.exists() else f"no bentoml executable in {venv}"


# --- load --------------------------------------------------------------------------------------------


@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    unaccepted: int = 0  # after SIGTERM: connections the closing listener refused or never read from
    first_error: str = ""

    def add(self, other: Load) -> None:
        self.latencies += other.latencies
        self.errors += other.errors
        self.seconds += other.seconds
        self.first_error = self.first_error or other.first_error

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        return float(np.percentile(np.array(self.latencies) * 1e3, q)) if self.latencies else float("nan")


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    status, body = int(head[9:12]), b""
    if m := re.search(rb"(?i)\r\ncontent-length: *(\d+)", head):
        body = await reader.readexactly(int(m.group(1)))
    elif re.search(rb"(?i)\r\ntransfer-encoding: *chunked", head):
        while (size := int((await reader.readuntil(b"\r\n")).strip(), 16)) > 0:
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
    return status, body, bool(re.search(rb"(?i)\r\nconnection: *close", head))


async def _client(port: int, request: bytes, stop_at: float, load: Load, signalled: asyncio.Event) -> None:
    writer = None
    while time.perf_counter() < stop_at:
        if writer is None:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if signalled.is_set():
                    load.unaccepted += 1
                    return
                load.errors.append("connect")
                await asyncio.sleep(0.05)
                continue
            fresh = True
        start = time.perf_counter()
        try:
            writer.write(request)
            status, body, close = await _read_response(reader)
        except (OSError, asyncio.IncompleteReadError, ValueError) as err:
            writer.close()
            writer = None
            if fresh and signalled.is_set():  # a connection the draining server never read from
                load.unaccepted += 1
                return
            load.errors.append(type(err).__name__)
            continue
        load.latencies.append(time.perf_counter() - start)
        if status != 200:
            load.errors.append(str(status))
            load.first_error = load.first_error or body[:300].decode(errors="replace")
        fresh = False
        if close:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()


async def _drive(
    port: int, path: str, body: bytes, concurrency: int, seconds: float, during: list[tuple[float, callable]] = ()
) -> Load:
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    load, signalled = Load(), asyncio.Event()
    start = time.perf_counter()
    clients = [
        asyncio.create_task(_client(port, request, start + seconds, load, signalled)) for _ in range(concurrency)
    ]
    for at, action in during:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        if action(signalled) is False:
            break
    await asyncio.gather(*clients)
    load.seconds = time.perf_counter() - start
    return load


def drive(port: int, path: str, body: bytes, concurrency: int, seconds: float, during=()) -> Load:
    return asyncio.run(_drive(port, path, body, concurrency, seconds, during))


# --- the run -----------------------------------------------------------------------------------------


def compare(models: dict, work: Path, kinds: list[str], bentoml_venv: Path | None, seconds: float, rounds: int) -> dict:
    results = {}
    for model, info in models.items():
        body = json.dumps({"inputs": info["sample"]}).encode()
        servers = {}
        try:
            for kind in kinds:  # one by one, inside the try: a server that fails to start stops the others
                servers[kind] = start(kind, model, info, work, bentoml_venv)
            with urllib.request.urlopen(f"http://127.0.0.1:{servers['modelforge'].port}/model-info", timeout=10) as r:
                print(f"[bench] {model}: modelforge {json.load(r)['batching']['reason']}", flush=True)
            totals = {(k, c): Load() for k in kinds for c in CONCURRENCY}
            for r in range(rounds):
                for c in CONCURRENCY:
                    order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]  # who goes first rotates
                    for kind in order:
                        path = "/invocations" if kind == "mlflow" else "/predict"
                        drive(servers[kind].port, path, body, c, 0.5)  # warm-up, not counted
                        totals[kind, c].add(drive(servers[kind].port, path, body, c, seconds))
        finally:
            for server in servers.values():
                server.stop()
        for (kind, c), load in totals.items():
            results[model, kind, c] = load
            print(
                f"[bench] {model:13s} {kind:10s} c={c:<3d} {load.rps:8.0f} req/s  p50 {load.pct(50):7.2f} ms  "
                f"p99 {load.pct(99):7.2f} ms  errors {len(load.errors)} {load.first_error}",
                flush=True,
            )
    return results


def reload_and_drain(models: dict, work: Path, seconds: float) -> tuple[Load, int]:
    """modelforge under load (concurrency 8): the alias moves at 1/3 (reload), SIGTERM at 2/3."""
    from mlflow.tracking import MlflowClient

    info = models["bench-digits"]
    server = start("modelforge", "bench-digits", info, work, None, ("--drain-grace-s", "1", "--poll-seconds", "0.2"))
    sent = {}

    def move_alias(_signalled) -> None:
        MlflowClient().set_registered_model_alias("bench-digits", "champion", "2")

    def terminate(signalled) -> None:
        signalled.set()
        sent["at"] = time.monotonic()
        os.killpg(server.proc.pid, signal.SIGTERM)

    body = json.dumps({"inputs": info["sample"]}).encode()
    load = drive(
        server.port, "/predict", body, 8, seconds * 3, during=[(seconds, move_alias), (seconds * 2, terminate)]
    )
    code = server.proc.wait(60)
    log = server.log.read_text()
    print(
        f"[bench] reload + drain: {len(load.latencies)} answered, {len(load.errors)} failed "
        f"{sorted(set(load.errors))}, {load.unaccepted} client(s) refused after SIGTERM; exit code {code}; "
        f"reloaded: {'reloaded model' in log}; drained in {time.monotonic() - sent['at']:.1f} s",
        flush=True,
    )
    return load, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured seconds per server x concurrency x round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bentoml-venv", type=Path, default=Path("/tmp/bentoml-venv"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        uri = f"sqlite:///{work}/mlflow.db"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        (work / "config.yaml").write_text(json.dumps({"tracking": {"uri": uri}}))
        why_not = bentoml_available(args.bentoml_venv)
        kinds = ["modelforge", "mlflow"] + ([] if why_not else ["bentoml"])
        if why_not:
            print(f"[bench] BentoML rows skipped: {why_not}", flush=True)
        models = build_models(work)
        results = compare(models, work, kinds, args.bentoml_venv, args.seconds, args.rounds)
        drain, code = reload_and_drain(models, work, args.seconds)

    def ratio(other: str, c: int, fn) -> float:
        return min(fn(results[m, "modelforge", c], results[m, other, c]) for m in models)

    vs_mlflow = ratio("mlflow", 32, lambda a, b: a.rps / b.rps)
    vs_bento = ratio("bentoml", 32, lambda a, b: a.rps / b.rps) if not why_not else float("nan")
    p50_vs_mlflow = max(results[m, "modelforge", 1].pct(50) / results[m, "mlflow", 1].pct(50) for m in models)
    dropped = len(drain.errors) + (code != 0)
    print(
        f"RESULT serve_vs_mlflow_c32={vs_mlflow:.2f} serve_vs_bentoml_c32={vs_bento:.2f} "
        f"serve_p50_vs_mlflow_c1={p50_vs_mlflow:.2f} serve_drain_dropped={dropped}"
    )


if __name__ == "__main__":
    main()
