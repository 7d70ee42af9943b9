"""Measure every candidate on ONNX Runtime and apply the gates.

A gate never passes silently: every candidate carries the list of gates it failed, and when no
candidate passes `select_candidate` raises `GateError` with the full table of reasons.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from prefect import task

from tasks.compress_model import Candidate
from tasks.config import GateConfig, ValidateConfig
from tasks.run_onnx import available_devices, make_session, measure_speeds, onnx_accuracy
from tasks.version_data import load_splits

BASELINE = "baseline"


class GateError(RuntimeError):
    """No candidate passed the gates."""


@dataclass(frozen=True)
class Report:
    name: str
    onnx: str
    accuracy: float
    latency_p50_ms: float
    latency_p95_ms: float
    throughput_sps: float
    size_bytes: int
    parity_max_abs: float | None
    cuda: dict | None = None  # the same timings on CUDAExecutionProvider, when present
    failed_gates: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failed_gates

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def validate_candidates(candidates: list[Candidate], cfg: ValidateConfig, data_dir: Path) -> list[Report]:
    """Held-out test accuracy, batch-1 latency p50/p95, batch throughput and file size of every
    candidate; timings are taken side by side (interleaved) so latency ratios are fair."""
    x_test, y_test = load_splits(data_dir).test
    timings: dict[str, dict] = {}
    accuracy: dict[str, float] = {}
    for device in available_devices(cfg.use_cuda):
        sessions = {c.name: make_session(c.onnx, device, cfg.intra_op_threads) for c in candidates}
        if device == "cpu":
            accuracy = {k: onnx_accuracy(s, x_test, y_test) for k, s in sessions.items()}
        print(f"[validate] timing {len(sessions)} candidates side by side on {device} "
              f"({cfg.latency_runs} batch-1 runs, {cfg.throughput_runs} batch-{cfg.throughput_batch} runs each)")
        timings[device] = measure_speeds(sessions, x_test, cfg.warmup, cfg.latency_runs, cfg.throughput_batch,
                                         cfg.throughput_runs)
    reports = []
    for c in candidates:
        cpu = timings["cpu"][c.name]
        reports.append(Report(c.name, str(c.onnx), accuracy[c.name], cpu.latency_p50_ms, cpu.latency_p95_ms,
                              cpu.throughput_sps, Path(c.onnx).stat().st_size, c.parity_max_abs,
                              cuda=asdict(timings["cuda"][c.name]) if "cuda" in timings else None))
    return reports


def apply_gates(reports: list[Report], gates: GateConfig) -> list[Report]:
    """Return the reports with `failed_gates` filled in; the baseline is the reference."""
    by_name = {r.name: r for r in reports}
    if BASELINE not in by_name:
        raise GateError("gates need the FP32 baseline candidate as reference, and it is missing")
    base = by_name[BASELINE]
    gated = []
    for r in reports:
        failed = []
        if r.accuracy < gates.min_accuracy:
            failed.append(f"accuracy {r.accuracy:.4f} < min {gates.min_accuracy:.4f}")
        drop = (base.accuracy - r.accuracy) * 100
        if drop > gates.max_accuracy_drop:
            failed.append(f"accuracy drop {drop:.2f} pts > {gates.max_accuracy_drop:.2f}")
        if r.parity_max_abs is not None and not r.parity_max_abs <= gates.max_parity_error:
            failed.append(f"parity {r.parity_max_abs:.2e} > {gates.max_parity_error:.0e}")
        if gates.max_latency_ratio is not None and r.name != BASELINE:
            ratio = r.latency_p50_ms / base.latency_p50_ms
            if ratio > gates.max_latency_ratio:
                failed.append(f"p50 latency {ratio:.2f}x baseline > {gates.max_latency_ratio:.2f}x")
        gated.append(replace(r, failed_gates=failed))
    return gated


def best_passing(reports: list[Report], gates: GateConfig) -> Report | None:
    """The passing candidate ranked first by `gates.select_by` (ties: higher accuracy), or None."""
    passing = [r for r in reports if r.passed]
    if not passing:
        return None
    if gates.select_by == "accuracy":
        return max(passing, key=lambda r: (r.accuracy, -r.latency_p50_ms))
    return min(passing, key=lambda r: (getattr(r, gates.select_by), -r.accuracy))


def require_passing(chosen: Report | None, reports: list[Report]) -> Report:
    if chosen is None:
        reasons = "\n".join(f"  - {r.name}: {'; '.join(r.failed_gates)}" for r in reports)
        raise GateError(f"no candidate passed the gates:\n{reasons}")
    return chosen


validate_candidates_task = task(validate_candidates, name="validate_candidates")
