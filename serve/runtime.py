"""The served model: loading and reloading it, readiness, the thread budget, and the
batch-size/latency curve that decides whether batching pays on this CPU."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from serve.lm import LMRuntime
from serve.metrics import Metrics
from serve.sources import LoadedModel, LoadOptions
from tasks.onnx.runtime import feeds

BATCHING_GAIN = 1.2  # batching must raise throughput by this factor to be worth its waits


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def sample_feeds(model: LoadedModel, batch: int) -> dict[str, np.ndarray] | None:
    """A batch of `batch` neutral samples in the model's graph inputs (None for families without one)."""
    if model.family == "classifier":
        assert model.sample_shape is not None  # every classifier bundle has one
        assert not isinstance(model.session, LMRuntime)  # a classifier runs on ONNX Runtime
        return feeds(model.session, np.zeros((batch, *model.sample_shape), dtype=np.float32))
    if model.family == "encoder":
        from tasks.encoder.minilm import tokenize

        return tokenize(
            model.tokenizer, ["a sentence of average length for measuring"] * batch, model.manifest["max_length"]
        )
    return None


@dataclass(frozen=True)
class CurvePoint:
    batch: int
    p50_ms: float
    p99_ms: float
    samples_per_s: float


def measure_curve(model: LoadedModel, max_batch: int, budget_s: float = 3.0) -> list[CurvePoint]:
    """Latency of one ORT call at batch 1, 2, 4, ... `max_batch` on this CPU, within about `budget_s`."""
    session = model.session
    assert not isinstance(session, LMRuntime)  # only ONNX Runtime families batch (causal LMs decode)
    points: list[CurvePoint] = []
    deadline = time.perf_counter() + budget_s
    batch = 1
    while batch <= max_batch and time.perf_counter() < deadline:
        x = sample_feeds(model, batch)
        session.run(None, x)  # warm-up: first calls allocate
        times: list[float] = []
        share = deadline - time.perf_counter()
        while len(times) < 50 and (len(times) < 5 or sum(times) < share / 4):
            start = time.perf_counter()
            session.run(None, x)
            times.append(time.perf_counter() - start)
        p50 = statistics.median(times)
        p99 = float(np.percentile(times, 99))
        points.append(CurvePoint(batch, round(p50 * 1e3, 3), round(p99 * 1e3, 3), round(batch / p50, 1)))
        batch *= 2
    return points


@dataclass(frozen=True)
class BatchPlan:
    enabled: bool
    max_batch: int
    max_wait_ms: float
    reason: str
    curve: tuple[CurvePoint, ...] = ()

    def to_dict(self) -> dict:
        return {**asdict(self), "curve": [asdict(p) for p in self.curve]}


def plan_batching(curve: list[CurvePoint], max_wait_ms: float, p99_target_ms: float) -> BatchPlan:
    """Batching on at the batch size with the most samples/s whose p99 plus the wait stays within
    the target, if that beats batch 1 by `BATCHING_GAIN`; else off, saying why."""
    single = curve[0]
    within = [p for p in curve if p.p99_ms + max_wait_ms <= p99_target_ms]
    if not within:
        return BatchPlan(
            False,
            1,
            0.0,
            f"batch 1 already takes {single.p99_ms} ms at p99, beyond the {p99_target_ms:g} ms target: batching off",
            tuple(curve),
        )
    best = max(within, key=lambda p: p.samples_per_s)
    gain = best.samples_per_s / single.samples_per_s
    if best.batch == 1 or gain < BATCHING_GAIN:
        top = max(curve[1:], key=lambda p: p.samples_per_s, default=single)
        return BatchPlan(
            False,
            1,
            0.0,
            f"on this CPU batch {top.batch} gives {top.samples_per_s / single.samples_per_s:.2f}x "
            f"the samples/s of batch 1 (within the {p99_target_ms:g} ms p99 target: {gain:.2f}x), "
            f"under the {BATCHING_GAIN}x that batching must earn: batching off",
            tuple(curve),
        )
    return BatchPlan(
        True,
        best.batch,
        max_wait_ms,
        f"batch {best.batch} gives {gain:.2f}x the samples/s of batch 1 "
        f"at p99 {best.p99_ms} ms + {max_wait_ms:g} ms wait, within the {p99_target_ms:g} ms target: "
        "batching on",
        tuple(curve),
    )


class ModelHolder:
    """The model being served and whether it is ready. A reload builds the new session completely
    before one reference swap; requests in flight finish on the model they started with."""

    def __init__(self, source, options: LoadOptions, metrics: Metrics, prepare: Callable[[LoadedModel], BatchPlan]):
        """`prepare(model)`: how to batch for the model, decided before it serves."""
        self.source, self.options, self.metrics, self.prepare = source, options, metrics, prepare
        self._lock = threading.Lock()  # one reload at a time; requests never take it
        self.model: LoadedModel | None = None
        self.plan = BatchPlan(False, 1, 0.0, "no model yet")
        self.fingerprint: str | None = None
        self.reloads = 0
        self.failed: tuple[str, str] | None = None  # (fingerprint, error) of a model that would not load
        self.verifying = False
        self.draining = False

    def not_ready(self) -> str | None:
        """Why the server should get no traffic now (None when it should)."""
        if self.draining:
            return "draining: shutting down"
        if self.model is None:
            return "loading the model"
        if self.verifying:
            return "verifying a new model"
        return None

    def _publish(self, model: LoadedModel, fingerprint: str) -> None:
        plan = self.prepare(model)
        self.model, self.plan, self.fingerprint, self.failed = model, plan, fingerprint, None  # reference swaps
        version = (model.manifest.get("registered_model") or {}).get("version", model.manifest.get("version"))
        self.metrics.model.info(
            {
                "sha256": model.sha256 or "",
                "candidate": str(model.manifest.get("candidate")),
                "version": "" if version is None else str(version),
                "family": model.family,
            }
        )

    def load(self) -> LoadedModel:
        """The first load; raises when there is nothing to serve or it fails its sha256 check."""
        fingerprint = self.source.fingerprint()
        if fingerprint is None:
            raise FileNotFoundError(f"nothing to serve at {self.source}")
        model = self.source.load(self.options)
        self._publish(model, fingerprint)
        return model

    def reload_if_changed(self) -> bool:
        """Load a changed model; a broken one is reported once and the current model stays in service."""
        with self._lock:
            current = self.source.fingerprint()
            if (
                self.model is None
                or current is None
                or current == self.fingerprint
                or (self.failed and self.failed[0] == current)
            ):
                return False
            self.verifying = True
            try:
                fresh = self.source.load(self.options)  # fully built before anyone can see it
                if fresh.family != self.model.family:
                    raise ValueError(
                        f"a {fresh.family} bundle cannot replace the {self.model.family} bundle being "
                        "served (its endpoints differ): start a server for it"
                    )
                self._publish(fresh, current)
            except Exception as err:
                self.failed = (current, f"{type(err).__name__}: {err}")
                self.metrics.reload_failures.inc()
                print(f"[serve] reload of {current} failed, still serving the previous model: {self.failed[1]}")
                return False
            finally:
                self.verifying = False
            self.reloads += 1
            self.metrics.reloads.inc()
            print(f"[serve] reloaded model ({current})")
            return True
