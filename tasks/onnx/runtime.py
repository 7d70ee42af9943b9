"""ONNX Runtime sessions and measurements: logits, latency percentiles, throughput."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError

PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
SPIN_SETTLE_S = 0.05


def available_devices(use_cuda: bool = True) -> list[str]:
    """'cpu' always; 'cuda' when the installed onnxruntime build can run on a GPU."""
    devices = ["cpu"]
    if use_cuda and PROVIDER_NAMES["cuda"] in ort.get_available_providers():
        devices.append("cuda")
    return devices


# A model-level list of ORT graph fusions its sessions must not apply, as ONNX metadata: it then
# holds wherever the model file goes (bundle, registry, server) without a side file to lose.
UNFUSED_KEY = "modelforge.ort_disabled_optimizers"


def set_session_unfused(model: onnx.ModelProto, optimizers: tuple[str, ...] | list[str]) -> None:
    """Record in `model` the ORT graph optimizers (e.g. "SkipLayerNormFusion") its sessions disable."""
    kept = [p for p in model.metadata_props if p.key != UNFUSED_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=UNFUSED_KEY, value=",".join(optimizers))


def session_unfused(path: Path | bytes) -> list[str]:
    """The optimizers `set_session_unfused` recorded in the model at `path` (or in its bytes)."""
    try:
        model = (
            onnx.load_model_from_string(path)
            if isinstance(path, bytes)
            else onnx.load(str(path), load_external_data=False)
        )
    except (OSError, DecodeError):
        return []  # ORT is about to refuse the same file or bytes, with its own message
    return next((p.value.split(",") for p in model.metadata_props if p.key == UNFUSED_KEY and p.value), [])


def make_session(
    path: Path | bytes,
    device: str = "cpu",
    intra_op_threads: int = 0,
    save_optimized: Path | None = None,
    spin: bool = True,
) -> ort.InferenceSession:
    """A session on `path`, or on the model's bytes (when the caller verified exactly those bytes),
    with the graph fusions the model opts out of disabled; `save_optimized` writes the graph ORT
    actually runs, after its own fusions, for inspection."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.log_severity_level = 3  # ORT's per-node warnings would bury the progress output
    if not spin:  # idle ORT threads would otherwise spin on cores a server's own threads need
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if save_optimized is not None:
        opts.optimized_model_filepath = str(save_optimized)
    providers = [PROVIDER_NAMES[device]] + ([PROVIDER_NAMES["cpu"]] if device != "cpu" else [])
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(
        model, sess_options=opts, providers=providers, disabled_optimizers=session_unfused(path)
    )


# Hugging Face graphs take `input_ids` and `attention_mask`, as every HF runtime expects, while the
# pipeline's arrays hold float token ids (one tensor like every other model's input). The padding id
# that turns one into the other travels in the model's metadata.
PAD_KEY = "modelforge.pad_token_id"
TOKEN_INPUTS = ("input_ids", "attention_mask")


def graph_feeds(input_names: list[str], metadata: dict[str, str], x: np.ndarray) -> dict[str, np.ndarray]:
    """The inputs of a graph with `input_names` and `metadata` for the pipeline's array `x`."""
    if tuple(input_names) == TOKEN_INPUTS:
        ids = x.astype(np.int64)
        return {"input_ids": ids, "attention_mask": (ids != int(metadata.get(PAD_KEY, 0))).astype(np.int64)}
    return {input_names[0]: x}


def feeds(session: ort.InferenceSession, x: np.ndarray) -> dict[str, np.ndarray]:
    """`graph_feeds` for a session's model."""
    return graph_feeds([i.name for i in session.get_inputs()], session.get_modelmeta().custom_metadata_map, x)


def predict_logits(session: ort.InferenceSession, x: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([session.run(None, feeds(session, x[i : i + batch]))[0] for i in range(0, len(x), batch)])


def onnx_accuracy(session: ort.InferenceSession, x: np.ndarray, y: np.ndarray) -> float:
    """Share of samples whose arg-max logit is the label."""
    return float((predict_logits(session, x).argmax(1) == y).mean())


@dataclass(frozen=True)
class Timing:
    latency_p50_ms: float
    latency_p95_ms: float
    throughput_sps: float  # samples per second at the throughput batch size (from the median batch time)
    # The median batch-1 latency of each interleaved round: what a paired comparison of two models'
    # speed rests on (their per-round ratios), so a decision can tell a difference from noise.
    latency_rounds_ms: tuple[float, ...] = ()


def measure_speeds(
    sessions: dict[str, ort.InferenceSession],
    x: np.ndarray | dict[str, np.ndarray],
    warmup: int,
    latency_runs: int,
    batch: int,
    batch_runs: int,
    rounds: int = 10,
    per_session: dict[str, np.ndarray | dict] | None = None,
) -> dict[str, Timing]:
    """Batch-1 latency percentiles and batch-`batch` throughput for several models side by side.

    `x` is the input array, or a dict of input name -> array for multi-input models (samples along
    axis 0; repeated when fewer than `batch`). Runs are interleaved in `rounds` (every model gets a
    slice of its runs each round), so clock, thermal and background-load drift hit every model
    alike and their ratios stay meaningful. `per_session` gives some sessions their own input (the
    same samples in another encoding). Each session's thread pool spin-waits after its last
    run; the pause before the next model's slice lets it go idle, else it steals cores from the
    model being timed (measured: -26% throughput on an identical graph with 8 models on 2 cores).
    """

    def feeds_for(session: ort.InferenceSession, x: np.ndarray | dict[str, np.ndarray]) -> tuple[dict, dict]:
        arrays = x if isinstance(x, dict) else feeds(session, x)
        single = {k: v[:1] for k, v in arrays.items()}
        big = {k: np.resize(v, (batch, *v.shape[1:])).astype(v.dtype) for k, v in arrays.items()}
        return single, big

    prepared = {k: feeds_for(s, (per_session or {}).get(k, x)) for k, s in sessions.items()}
    for key, session in sessions.items():
        single, big = prepared[key]
        for _ in range(warmup):
            session.run(None, single)
        session.run(None, big)
    lat_per_round, batch_per_round = -(-latency_runs // rounds), -(-batch_runs // rounds)
    latencies: dict[str, list[float]] = {k: [] for k in sessions}
    batch_times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for key, session in sessions.items():
            single, big = prepared[key]
            time.sleep(SPIN_SETTLE_S)
            for _ in range(lat_per_round):
                t = time.perf_counter()
                session.run(None, single)
                latencies[key].append(time.perf_counter() - t)
            for _ in range(batch_per_round):
                t = time.perf_counter()
                session.run(None, big)
                batch_times[key].append(time.perf_counter() - t)
    out = {}
    for key in sessions:
        ms = np.array(latencies[key]) * 1000
        # Median batch time: one preempted batch must not move a throughput figure.
        out[key] = Timing(
            float(np.percentile(ms, 50)),
            float(np.percentile(ms, 95)),
            batch / float(np.median(batch_times[key])),
            tuple(float(np.median(r)) for r in np.array_split(ms, rounds)),
        )
    return out
