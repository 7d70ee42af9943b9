"""ONNX Runtime sessions and measurements: logits, latency percentiles, throughput."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def available_devices(use_cuda: bool = True) -> list[str]:
    """'cpu' always; 'cuda' when the installed onnxruntime build can run on a GPU."""
    devices = ["cpu"]
    if use_cuda and PROVIDER_NAMES["cuda"] in ort.get_available_providers():
        devices.append("cuda")
    return devices


def make_session(path: Path, device: str = "cpu", intra_op_threads: int = 0) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.log_severity_level = 3  # ORT's per-node warnings would bury the progress output
    providers = [PROVIDER_NAMES[device]] + ([PROVIDER_NAMES["cpu"]] if device != "cpu" else [])
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


def predict_logits(session: ort.InferenceSession, x: np.ndarray, batch: int = 256) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


@dataclass(frozen=True)
class Timing:
    latency_p50_ms: float
    latency_p95_ms: float
    throughput_sps: float  # samples per second at the throughput batch size


def measure_speed(
    session: ort.InferenceSession, x: np.ndarray, warmup: int, latency_runs: int, batch: int, batch_runs: int
) -> Timing:
    """Batch-1 latency percentiles and batch-`batch` throughput, each after `warmup` untimed runs."""
    name = session.get_inputs()[0].name
    single = x[:1]
    big = np.resize(x, (batch, *x.shape[1:])).astype(x.dtype)  # repeats samples when x is short
    for _ in range(warmup):
        session.run(None, {name: single})
    times = []
    for _ in range(latency_runs):
        t = time.perf_counter()
        session.run(None, {name: single})
        times.append(time.perf_counter() - t)
    for _ in range(max(1, warmup // 4)):
        session.run(None, {name: big})
    t = time.perf_counter()
    for _ in range(batch_runs):
        session.run(None, {name: big})
    elapsed = time.perf_counter() - t
    ms = np.array(times) * 1000
    return Timing(float(np.percentile(ms, 50)), float(np.percentile(ms, 95)), batch * batch_runs / elapsed)
