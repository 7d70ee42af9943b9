"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "modelforge_requests", "HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "modelforge_request_duration_seconds",
            "Whole request time, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "modelforge_queue_duration_seconds",
            "Time a request waited for an inference worker",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_time = Histogram(
            "modelforge_inference_duration_seconds",
            "Time of one ONNX Runtime call (one batch)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "modelforge_batch_size", "Samples per ONNX Runtime call", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("modelforge_queue_depth", "Requests waiting for an inference worker", registry=r)
        self.in_flight = Gauge("modelforge_requests_in_flight", "HTTP requests being served", registry=r)
        self.model = Info("modelforge_model", "The model being served", registry=r)
        self.reloads = Counter("modelforge_reloads", "Models reloaded after the source changed", registry=r)
        self.reload_failures = Counter(
            "modelforge_reload_failures", "Reloads refused (the previous model kept serving)", registry=r
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
