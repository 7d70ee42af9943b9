"""Measure every candidate on ONNX Runtime and apply the gates.

A gate never passes silently: every candidate carries the list of gates it failed, and when no
candidate passes `select_candidate` raises `GateError` with the full table of reasons.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, Protocol

from prefect import task
from pydantic import Field

from tasks.compress.base import Candidate
from tasks.core.settings import Section
from tasks.onnx.runtime import available_devices, make_session, measure_speeds
from tasks.release.evaluate import Evaluator
from tasks.release.stats import ratio_interval


class ValidateConfig(Section):
    warmup: int = Field(20, ge=0, description="Untimed runs before measuring.")
    latency_runs: int = Field(500, ge=5, description="Timed batch-1 runs for the p50/p95 latency.")
    throughput_batch: int = Field(64, ge=1, description="Batch size of the throughput measurement.")
    throughput_runs: int = Field(100, ge=1, description="Timed batches for the throughput measurement.")
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0 = runtime default).")
    use_cuda: bool = Field(True, description="Also measure on CUDAExecutionProvider when it is available.")


class GateConfig(Section):
    max_accuracy_drop: float = Field(
        1.0, ge=0, description="Allowed test-accuracy drop vs the FP32 baseline, in points."
    )
    min_accuracy: float = Field(0.90, ge=0, le=1, description="Absolute floor on test accuracy.")
    max_parity_error: float = Field(1e-4, gt=0, description="Max |ORT - PyTorch| on test logits for exported models.")
    max_latency_ratio: float | None = Field(
        1.1,
        gt=0,
        description="Reject a compressed model whose p50 latency exceeds this multiple of the baseline's "
        "(1.1 leaves room for timing noise on models that run in microseconds).",
    )
    min_cosine_worst: float = Field(
        0.97, ge=-1, le=1, description="Embeddings: floor on the worst per-sentence cosine to the FP32 model."
    )
    min_cosine_mean: float = Field(0.99, ge=-1, le=1, description="Embeddings: floor on the mean per-sentence cosine.")
    min_top10_overlap: float = Field(
        0.8, ge=0, le=1, description="Embeddings: floor on top-10 retrieval overlap with the FP32 model."
    )
    select_by: Literal["latency_p50_ms", "size_bytes", "quality"] = Field(
        "latency_p50_ms",
        description="Among passing candidates pick the lowest latency/size or the best primary quality "
        "(accuracy; worst-case cosine for embeddings).",
    )
    latency_tie: float = Field(
        1.05,
        ge=1,
        description="select_by latency: a candidate counts as slower than the fastest only when the 95% "
        "interval of its latency ratio over the timing rounds lies above this; the tied ones are ranked by quality, "
        "then size (so timing noise never decides).",
    )


BASELINE = "baseline"


class GateError(RuntimeError):
    """No candidate passed the gates."""


@dataclass(frozen=True)
class Report:
    name: str
    onnx: str
    quality: dict[str, float]  # held-out quality metrics (accuracy; or cosine/retrieval fidelity)
    primary: str  # the quality metric that ranks candidates
    latency_p50_ms: float
    latency_p95_ms: float
    throughput_sps: float
    size_bytes: int
    parity_max_abs: float | None
    cuda: dict | None = None  # the same timings on CUDAExecutionProvider, when present
    failed_gates: list[str] = field(default_factory=list)
    latency_rounds_ms: tuple[float, ...] = ()  # per interleaved timing round, for paired comparisons

    @property
    def passed(self) -> bool:
        return not self.failed_gates

    @property
    def score(self) -> float:
        return self.quality[self.primary]

    def to_dict(self) -> dict:
        """Flat: quality metrics sit beside the timings (`accuracy`, `cosine_min`, ...)."""
        d = asdict(self)
        return {**d.pop("quality"), **d, "passed": self.passed}


def validate_candidates(candidates: list[Candidate], cfg: ValidateConfig, evaluator: Evaluator) -> list[Report]:
    """Held-out quality, batch-1 latency p50/p95, batch throughput and file size of every
    candidate; timings are taken side by side (interleaved) so latency ratios are fair."""
    timings: dict[str, dict] = {}
    quality: dict[str, dict] = {}
    inputs = evaluator.timing_inputs()
    for device in available_devices(cfg.use_cuda):
        sessions = {c.name: make_session(c.onnx, device, cfg.intra_op_threads) for c in candidates}
        if device == "cpu":
            for name, session in sessions.items():
                quality[name] = evaluator.quality(session)
                print(f"[validate] {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in quality[name].items()))
        print(
            f"[validate] timing {len(sessions)} candidates side by side on {device} "
            f"({cfg.latency_runs} batch-1 runs, {cfg.throughput_runs} batch-{cfg.throughput_batch} runs each)"
        )
        timings[device] = measure_speeds(
            sessions, inputs, cfg.warmup, cfg.latency_runs, cfg.throughput_batch, cfg.throughput_runs
        )
    reports = []
    for c in candidates:
        cpu = timings["cpu"][c.name]
        reports.append(
            Report(
                c.name,
                str(c.onnx),
                quality[c.name],
                evaluator.primary,
                cpu.latency_p50_ms,
                cpu.latency_p95_ms,
                cpu.throughput_sps,
                Path(c.onnx).stat().st_size,
                c.parity_max_abs,
                cuda=asdict(timings["cuda"][c.name]) if "cuda" in timings else None,
                latency_rounds_ms=cpu.latency_rounds_ms,
            )
        )
    return reports


def _quality_failures(r: Report, base: Report, gates: GateConfig) -> list[str]:
    """Floors on whichever quality metrics the report carries; accuracy is also held to the baseline."""
    q, failed = r.quality, []
    if "accuracy" in q:
        if q["accuracy"] < gates.min_accuracy:
            failed.append(f"accuracy {q['accuracy']:.4f} < min {gates.min_accuracy:.4f}")
        drop = (base.quality["accuracy"] - q["accuracy"]) * 100
        if drop > gates.max_accuracy_drop:
            failed.append(f"accuracy drop {drop:.2f} pts > {gates.max_accuracy_drop:.2f}")
    floors = {
        "cosine_min": ("worst-case cosine", gates.min_cosine_worst),
        "cosine_mean": ("mean cosine", gates.min_cosine_mean),
        "top10_overlap": ("top-10 overlap", gates.min_top10_overlap),
    }
    failed += [
        f"{label} {q[k]:.4f} < min {floor:.4f}" for k, (label, floor) in floors.items() if k in q and not q[k] >= floor
    ]
    return failed


def apply_gates(reports: list[Report], gates: GateConfig) -> list[Report]:
    """Return the reports with `failed_gates` filled in; the baseline is the reference."""
    by_name = {r.name: r for r in reports}
    if BASELINE not in by_name:
        raise GateError("gates need the FP32 baseline candidate as reference, and it is missing")
    base = by_name[BASELINE]
    gated = []
    for r in reports:
        failed = _quality_failures(r, base, gates)
        if r.parity_max_abs is not None and not r.parity_max_abs <= gates.max_parity_error:
            failed.append(f"parity {r.parity_max_abs:.2e} > {gates.max_parity_error:.0e}")
        if gates.max_latency_ratio is not None and r.name != BASELINE:
            # Failed only when the whole 95% interval of the ratio is above the limit: noise alone
            # must not decide whether a candidate near the limit can ship.
            ratio, low, _ = ratio_interval(r.latency_rounds_ms, base.latency_rounds_ms)
            if low > gates.max_latency_ratio:
                failed.append(
                    f"p50 latency {ratio:.2f}x baseline (95% interval from {low:.2f}x) > {gates.max_latency_ratio:.2f}x"
                )
        gated.append(replace(r, failed_gates=failed))
    return gated


class Selection(Protocol):
    """How a pipeline's gates section picks among passing candidates (every family's gates have these)."""

    @property
    def select_by(self) -> str: ...

    @property
    def latency_tie(self) -> float: ...


def latency_ties(reports: list[Report], tie: float) -> list[Report]:
    """The reports not measurably slower than the fastest: the 95% interval of their latency ratio to
    it, over the interleaved timing rounds, reaches down to `tie` (a ratio of 1.05: within 5%)."""
    fastest = min(reports, key=lambda r: r.latency_p50_ms)
    tied = []
    for r in reports:
        ratio, low, _ = ratio_interval(r.latency_rounds_ms, fastest.latency_rounds_ms)
        if r is fastest or low <= tie:
            tied.append(r)
        print(
            f"[select] {r.name}: p50 latency {ratio:.3f}x the fastest ({fastest.name}), 95% interval from "
            f"{low:.3f}x: {'a tie' if r in tied else 'slower'}"
        )
    return tied


def best_passing(reports: list[Report], gates: Selection) -> Report | None:
    """The passing candidate ranked first by `gates.select_by`, or None. Latency: among the candidates
    the fastest is not measurably faster than (`latency_ties`), the best primary quality, then the
    smallest file. Size: the smallest (ties: better quality). Quality: the best (ties: faster)."""
    passing = [r for r in reports if r.passed]
    if not passing:
        return None
    if gates.select_by == "quality":
        return max(passing, key=lambda r: (r.score, -r.latency_p50_ms))
    if gates.select_by == "size_bytes":
        return min(passing, key=lambda r: (r.size_bytes, -r.score))
    return max(latency_ties(passing, gates.latency_tie), key=lambda r: (r.score, -r.size_bytes))


def require_passing(chosen: Report | None, reports: list[Report]) -> Report:
    if chosen is None:
        reasons = "\n".join(f"  - {r.name}: {'; '.join(r.failed_gates)}" for r in reports)
        raise GateError(f"no candidate passed the gates:\n{reasons}")
    return chosen


validate_candidates_task = task(name="validate_candidates")(validate_candidates)
