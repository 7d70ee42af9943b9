"""Causal-LM bundles: generation on onnxruntime-genai, many clients at once (`serve.sources` verifies the
bundle's files and builds the runtime here from its verified copy).

Generation runs on one thread per loaded model that owns an onnxruntime-genai `Engine` (its operations must
all come from the thread that created it). The engine decodes up to `--lm-max-batch` (at most 4) sequences
in one step. On CPU its batches are static: a sequence cannot join a batch in progress (continuous batching
needs paged attention, which onnxruntime-genai builds only for CUDA and WebGPU), so requests that arrive
together (each within BATCH_GAP_SECONDS of the last, at an idle engine) decode together, and later ones start
the next batch. `--lm-max-waiting` requests may wait beyond a full batch; one more is refused at once
(`QueueFull`, a 429). A seeded sampling request runs on a `Generator` of its own, because the static engine
takes no per-request seed. Stop strings are matched here, on the decoded text, for the same reason.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnxruntime_genai as og

LM_FAMILY = "causal_lm"
# onnxruntime-genai 0.18's static batch scheduler decodes at most 4 sequences together (a constant in its
# source; engine.static_batching.max_batch_size does not raise it): more would only queue inside the engine.
ENGINE_STATIC_BATCH = 4
RETRY_AFTER_SECONDS = 1
# A request that finds the engine idle waits for others to batch with while they keep coming (each within
# BATCH_GAP_SECONDS of the last), at most BATCH_WINDOW_SECONDS.
BATCH_GAP_SECONDS, BATCH_WINDOW_SECONDS = 0.05, 0.25
FINISH_REASONS = {
    "EOS": "stop",
    "STOP_STRING": "stop",
    "MAX_GENERATED_TOKENS": "length",
    "MAX_SESSION_TOKENS": "length",
}


class QueueFull(Exception):
    """Every batch slot and every waiting place is taken."""


@dataclass(frozen=True)
class Sampling:
    """How one request generates; temperature 0 is greedy."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Chunk:
    """What a generation reports to its client: new text, then once the end (or an error)."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclass(eq=False)
class Generation:
    """One client's request: the scheduler thread fills `chunks`, the client's event loop reads it."""

    prompt_ids: list[int]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    chunks: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.monotonic)
    # scheduler-thread state
    tokens: int = 0
    pending_text: str = ""
    stream: og.TokenizerStream | None = None  # the tokenizer's incremental decoder
    finished: bool = False

    def cancel(self) -> None:
        """The client went away: its sequence leaves the batch at the next step."""
        self.cancelled.set()

    def report(self, chunk: Chunk) -> None:
        try:
            self.loop.call_soon_threadsafe(self.chunks.put_nowait, chunk)
        except RuntimeError:  # the client's event loop is closed: nobody is listening any more
            self.cancelled.set()


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of `text` could still begin a stop string (so are not sent yet)."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), default=0)


class _Scheduler:
    """The thread that owns the engine: admits waiting requests into free batch slots, steps the engine,
    steps seeded generators, and turns tokens into text for each client."""

    def __init__(self, model, tokenizer, tokenizer_lock: threading.Lock, max_batch: int, max_waiting: int, name: str):
        self.model, self.tokenizer, self.tokenizer_lock = model, tokenizer, tokenizer_lock
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.eos = set(tokenizer.eos_token_ids)
        self.inbox: queue.SimpleQueue[Generation | None] = queue.SimpleQueue()
        self.count_lock = threading.Lock()
        self.admitted = 0  # waiting + running; only `submit` adds, only the thread removes
        self.generated_tokens = 0  # since load, all clients together
        self.largest_batch = 0  # sequences the engine has decoded together, at most
        self.closed = False
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"lm-engine-{name}", daemon=True)
        self.thread.start()
        self.ready.wait()
        if self.failure is not None:
            raise self.failure

    def submit(self, generation: Generation) -> None:
        with self.count_lock:
            if self.admitted >= self.max_batch + self.max_waiting:
                raise QueueFull(
                    f"{self.admitted} requests are generating or waiting (limit {self.max_batch} + {self.max_waiting})"
                )
            self.admitted += 1
        self.inbox.put(generation)

    def close(self) -> None:
        """Finish what was admitted, then let the thread (and the engine it owns) go."""
        self.closed = True
        self.inbox.put(None)

    def _run(self) -> None:
        import onnxruntime_genai as og

        try:
            self.engine = og.Engine(self.model)  # created here: this thread owns it
            self.events = self.engine.create_event_buffer(4 * self.max_batch)
        except BaseException as err:  # handed to the loading thread
            self.failure = err
            self.ready.set()
            return
        self.ready.set()
        self.waiting: deque[Generation] = deque()
        self.running: dict[og.Request, tuple[Generation, int]] = {}  # engine request -> (generation, turn id)
        self.seeded: dict[og.Generator, Generation] = {}  # generator -> generation
        while True:
            idle = not (self.waiting or self.running or self.seeded)
            if idle and self.closed and self.inbox.empty():
                break
            try:
                while True:
                    item = self.inbox.get(block=idle, timeout=1.0 if idle else None)
                    idle = False
                    if item is not None:
                        self.waiting.append(item)
            except queue.Empty:
                pass
            self._drop_cancelled()
            if self.waiting and not self.running and self.max_batch > 1:
                self._gather()
            self._admit(og)
            if self.running:
                self._step_engine(og)
            if self.seeded:
                self._step_generators()

    def _finish(self, generation: Generation, reason: str | None, error: str | None = None) -> None:
        if generation.finished:
            return
        generation.finished = True
        generation.report(Chunk(generation.pending_text if error is None else "", reason, generation.tokens, error))
        with self.count_lock:
            self.admitted -= 1

    def _drop_cancelled(self) -> None:
        for generation in [g for g in self.waiting if g.cancelled.is_set()]:
            self.waiting.remove(generation)
            self._finish(generation, "cancelled")
        for request, (generation, turn) in self.running.items():
            if generation.cancelled.is_set() and not generation.finished:
                request.cancel_turn(turn)  # its TURN_FINISHED event releases the batch slot
                self._finish(generation, "cancelled")
        for generator, generation in list(self.seeded.items()):
            if generation.cancelled.is_set():
                del self.seeded[generator]
                self._finish(generation, "cancelled")

    def _gather(self) -> None:
        """Before a new batch starts, wait for more requests while they keep arriving: clients that come
        together then decode together."""
        limit = self.waiting[0].queued_at + BATCH_WINDOW_SECONDS
        while (
            len(self.waiting) < self.max_batch
            and (left := min(limit, self.waiting[-1].queued_at + BATCH_GAP_SECONDS) - time.monotonic()) > 0
        ):
            try:
                item = self.inbox.get(timeout=left)
            except queue.Empty:
                return
            if item is not None:
                self.waiting.append(item)

    def _admit(self, og) -> None:
        """Seeded requests take any free slot. On CPU the engine batches statically (a sequence cannot join a
        batch in progress: continuous batching needs paged attention, CUDA/WebGPU only), so engine requests
        start together as a new batch once the previous one has finished."""
        new_batch = not self.running
        for generation in list(self.waiting):
            if len(self.running) + len(self.seeded) >= self.max_batch:
                return
            s = generation.sampling
            seeded = s.seed is not None and s.temperature > 0
            if not (seeded or new_batch):
                continue
            self.waiting.remove(generation)
            try:
                if seeded:
                    params = og.GeneratorParams(self.model)
                    params.set_search_options(
                        do_sample=True,
                        temperature=s.temperature,
                        top_p=s.top_p,
                        top_k=0,
                        random_seed=s.seed,
                        max_length=len(generation.prompt_ids) + s.max_tokens,
                    )
                    generator = og.Generator(self.model, params)
                    generator.append_tokens(generation.prompt_ids)
                    self.seeded[generator] = generation
                else:
                    request = self.engine.create_request()
                    options = og.TurnOptions(request)
                    options.set_max_generated_tokens(s.max_tokens)
                    options.set_do_sample(s.temperature > 0)
                    if s.temperature > 0:
                        options.set_temperature(s.temperature)
                        options.set_top_p(s.top_p)
                    options.set_top_k(0)  # OpenAI's sampling has no top-k
                    self.running[request] = (generation, request.begin_turn(generation.prompt_ids, options))
                    self.largest_batch = max(self.largest_batch, len(self.running))
            except Exception as err:  # a request the runtime refuses fails alone
                self._finish(generation, None, f"{type(err).__name__}: {err}")

    def _on_token(self, generation: Generation, token: int) -> bool:
        """Add one generated token; True when a stop string ended the generation."""
        generation.tokens += 1
        self.generated_tokens += 1
        if token in self.eos:
            return False
        with self.tokenizer_lock:
            if generation.stream is None:
                generation.stream = self.tokenizer.create_stream()
            generation.pending_text += generation.stream.decode(token)
        stops = generation.sampling.stop
        hits = [i for i in (generation.pending_text.find(s) for s in stops) if i >= 0]
        if hits:
            generation.pending_text = generation.pending_text[: min(hits)]
            self._finish(generation, "stop")
            return True
        keep = _held_back(generation.pending_text, stops)
        ready = generation.pending_text[: len(generation.pending_text) - keep]
        if ready:
            generation.pending_text = generation.pending_text[len(ready) :]
            generation.report(Chunk(ready))
        return False

    def _step_engine(self, og) -> None:
        for event in self.engine.run(self.events):
            request = event.request
            generation, turn = self.running[request]
            if (
                event.flags & og.EngineEventFlags.TOKEN
                and not generation.finished
                and self._on_token(generation, int(event.token))
            ):
                request.cancel_turn(turn)
            if event.flags & og.EngineEventFlags.TURN_FINISHED:
                del self.running[request]
                request.close()
                if not generation.finished:
                    generation.tokens = int(event.usage.generated_tokens)
                if event.flags & og.EngineEventFlags.FAILED:
                    self._finish(generation, None, f"generation failed ({event.error_code.name})")
                else:
                    self._finish(generation, FINISH_REASONS.get(event.finish_reason.name, "cancelled"))

    def _step_generators(self) -> None:
        for generator, generation in list(self.seeded.items()):
            try:
                generator.generate_next_token()
                token = int(generator.get_next_tokens()[0])
            except Exception as err:
                del self.seeded[generator]
                self._finish(generation, None, f"{type(err).__name__}: {err}")
                continue
            stopped = self._on_token(generation, token)
            if stopped or generator.is_done():
                del self.seeded[generator]
                self._finish(generation, "stop" if token in self.eos else "length")


class LMRuntime:
    """A verified, loaded causal-LM bundle: tokenizer, chat template, context size and the scheduler."""

    def __init__(self, model, tokenizer, manifest: dict, defaults: dict, max_batch: int, max_waiting: int):
        self.manifest = manifest
        self.loaded_at = time.time()
        self.model_id = str(manifest.get("model_name") or "causal-lm")
        self.max_length = int(manifest["max_length"])
        self.defaults = defaults  # temperature / top_p from the model's generation_config.json
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self._tokenizer = tokenizer
        self._tokenizer_lock = threading.Lock()
        self._scheduler = _Scheduler(model, tokenizer, self._tokenizer_lock, max_batch, max_waiting, self.model_id)
        # When a reload replaces this runtime, the engine thread finishes what it admitted and ends.
        self.close = weakref.finalize(self, self._scheduler.close)  # also called once the server stops

    def encode(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            return [int(t) for t in self._tokenizer.encode(text)]

    def chat_prompt(self, messages: list[dict]) -> str:
        """The tokenizer's chat template applied to `messages`, ready for the assistant's turn."""
        with self._tokenizer_lock:
            return self._tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)

    def generate(self, prompt_ids: list[int], sampling: Sampling) -> Generation:
        """Queue a generation (from the client's event loop); `QueueFull` when there is no room."""
        generation = Generation(prompt_ids, sampling, asyncio.get_running_loop())
        self._scheduler.submit(generation)
        return generation

    @property
    def stats(self) -> dict:
        scheduler = self._scheduler
        return {
            "admitted": scheduler.admitted,
            "generated_tokens": scheduler.generated_tokens,
            "largest_batch": scheduler.largest_batch,
            "max_batch": self.max_batch,
            "max_waiting": self.max_waiting,
        }


def _generation_defaults(model_dir: Path) -> dict:
    """The sampling a model's authors recommend (generation_config.json); OpenAI's defaults otherwise."""
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if config.get("do_sample") is False:
        return {"temperature": 0.0, "top_p": 1.0}
    return {"temperature": float(config.get("temperature", 1.0)), "top_p": float(config.get("top_p", 1.0))}


def open_lm(model_dir: Path, manifest: dict, max_batch: int, max_waiting: int) -> LMRuntime:
    """The runtime of the verified onnxruntime-genai model folder `model_dir` (which may go once this returns:
    model and tokenizer are in memory)."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    config.overlay(json.dumps({"engine": {"static_batching": {"max_batch_size": max_batch}}}))
    model = og.Model(config)
    return LMRuntime(model, og.Tokenizer(model), manifest, _generation_defaults(model_dir), max_batch, max_waiting)
