"""Adaptive batching behind a bounded queue with per-request deadlines.

Requests for the same model and tensor shapes that are waiting together are coalesced into one
ONNX Runtime call, up to `max_batch` samples. A worker waits up to `max_wait_s` for more only while
more requests are in flight than it has collected, so a lone request never waits for company. A
full queue is a 429 and a request whose deadline passes in the queue a 503, both with Retry-After.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import numpy as np

from serve.body import BadRequest
from serve.metrics import Metrics


@dataclass
class Job:
    model: object  # the LoadedModel the request was checked against; its batch runs on that model
    feeds: dict[str, np.ndarray]  # every array with the batch on axis 0
    deadline: float
    enqueued: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)

    @property
    def size(self) -> int:
        return len(next(iter(self.feeds.values())))

    @property
    def key(self) -> tuple:
        return id(self.model), tuple((k, v.shape[1:], v.dtype.str) for k, v in self.feeds.items())


class Batcher:
    """`run(model, feeds) -> outputs` on `workers` threads; `submit` gives each request its outputs."""

    def __init__(
        self,
        run: Callable[[object, dict], list[np.ndarray]],
        metrics: Metrics,
        workers: int,
        max_queue: int,
        policy: Callable[[], tuple[int, float]],
        in_flight: Callable[[], int],
    ):
        """`policy()`: (most samples per call, longest wait in seconds) for the model serving now."""
        self.run, self.metrics, self.policy, self.in_flight = run, metrics, policy, in_flight
        self.max_queue = max_queue
        self._jobs: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopped = False
        self._recent: deque[tuple[float, int]] = deque(
            maxlen=64
        )  # (seconds, samples) of recent batches: what Retry-After is estimated from
        self._threads = [
            threading.Thread(target=self._work, name=f"inference-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def retry_after(self) -> int:
        """Seconds until the queue has probably drained, from the recent batches' speed (at least 1)."""
        seconds = sum(s for s, _ in self._recent)
        samples = sum(n for _, n in self._recent)
        per_sample = seconds / samples if samples else 0.01
        return max(1, math.ceil(len(self._jobs) * per_sample / len(self._threads)))

    def submit(self, model: object, feeds: dict[str, np.ndarray], timeout_s: float) -> Future:
        job = Job(model, feeds, time.monotonic() + timeout_s)
        with self._cv:
            if len(self._jobs) >= self.max_queue:
                raise BadRequest(
                    429,
                    f"the inference queue is full ({self.max_queue} requests waiting)",
                    {"Retry-After": str(self.retry_after())},
                )
            self._jobs.append(job)
            self.metrics.queue_depth.set(len(self._jobs))
            self._cv.notify()
        return job.future

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(5)

    def _take(self) -> list[Job] | None:
        """The next batch: the oldest job and the waiting ones that fit with it."""
        with self._cv:
            while not self._jobs and not self._stopped:
                self._cv.wait()
            if self._stopped:
                return None
            first = self._jobs.popleft()
            batch, size = [first], first.size
            max_batch, max_wait_s = self.policy()
            wait_until = time.monotonic() + max_wait_s
            while size < max_batch:
                for j in list(self._jobs):
                    if j.key == first.key and size + j.size <= max_batch:
                        self._jobs.remove(j)
                        batch.append(j)
                        size += j.size
                remaining = wait_until - time.monotonic()
                # Wait for company only while more requests are being served than this batch holds.
                if max_batch == 1 or remaining <= 0 or self.in_flight() <= len(batch) or self._stopped:
                    break
                self._cv.wait(remaining)
            self.metrics.queue_depth.set(len(self._jobs))
            return batch

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            now = time.monotonic()
            live = []
            for job in batch:
                self.metrics.queue_time.observe(now - job.enqueued)
                if now > job.deadline:
                    _settle(
                        job.future,
                        error=BadRequest(
                            503,
                            f"the request waited {now - job.enqueued:.2f} s for inference, past its deadline",
                            {"Retry-After": str(self.retry_after())},
                        ),
                    )
                else:
                    live.append(job)
            if live:
                self._run(live)

    def _run(self, batch: list[Job]) -> None:
        feeds = {
            k: np.concatenate([j.feeds[k] for j in batch]) if len(batch) > 1 else batch[0].feeds[k]
            for k in batch[0].feeds
        }
        start = time.perf_counter()
        try:
            outputs = self.run(batch[0].model, feeds)
        except Exception as err:
            if len(batch) > 1:  # one request's problem must not fail the others it was batched with
                for job in batch:
                    self._run([job])
            else:
                _settle(batch[0].future, error=err)
            return
        seconds = time.perf_counter() - start
        size = sum(j.size for j in batch)
        self._recent.append((seconds, size))
        self.metrics.inference_time.observe(seconds)
        self.metrics.batch_size.observe(size)
        offset = 0
        for job in batch:
            _settle(job.future, [o[offset : offset + job.size] for o in outputs])
            offset += job.size


def _settle(future: Future, result: object = None, error: BaseException | None = None) -> None:
    """Hand a job its outcome, unless its caller has gone (a client that disconnected cancels it)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
