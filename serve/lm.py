"""Causal-LM bundles: every file verified, generation on onnxruntime-genai, many clients at once.

A bundle (the LM contract: manifest "family": "causal_lm", "model_dir", "files") is copied into a private
folder while each file is hashed against the manifest; the model is built from that copy, so what serves is
exactly what was verified, and nothing in the bundle folder can change under it.

Generation runs on one thread per loaded model that owns an onnxruntime-genai `Engine` (its operations must
all come from the thread that created it). The engine decodes up to `MODELFORGE_LM_MAX_BATCH` (at most 4) sequences
in one step. On CPU its batches are static: a sequence cannot join a batch in progress (continuous batching
needs paged attention, which onnxruntime-genai builds only for CUDA and WebGPU), so requests that arrive
together (each within BATCH_GAP_SECONDS of the last, at an idle engine) decode together, and later ones start
the next batch. `MODELFORGE_LM_MAX_WAITING` requests may wait beyond a full batch; one more is refused at once
(`QueueFull`, a 429). A seeded sampling request runs on a `Generator` of its own, because the static engine
takes no per-request seed. Stop strings are matched here, on the decoded text, for the same reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import shutil
import tempfile
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from tasks.guard_bundle import BUNDLE_FORMAT, BundleError, relative_paths

LM_FAMILY = "causal_lm"
# onnxruntime-genai 0.18's static batch scheduler decodes at most 4 sequences together (a constant in its
# source; engine.static_batching.max_batch_size does not raise it): more would only queue inside the engine.
ENGINE_STATIC_BATCH = 4
MAX_BATCH, MAX_WAITING = ENGINE_STATIC_BATCH, 32  # defaults of MODELFORGE_LM_MAX_BATCH / MODELFORGE_LM_MAX_WAITING
RETRY_AFTER_SECONDS = 1
# A request that finds the engine idle waits for others to batch with while they keep coming (each within
# BATCH_GAP_SECONDS of the last), at most BATCH_WINDOW_SECONDS.
BATCH_GAP_SECONDS, BATCH_WINDOW_SECONDS = 0.05, 0.25
FINISH_REASONS = {"EOS": "stop", "STOP_STRING": "stop", "MAX_GENERATED_TOKENS": "length",
                  "MAX_SESSION_TOKENS": "length"}


class QueueFull(Exception):
    """Every batch slot and every waiting place is taken."""


def _model_files(bundle_dir: Path, manifest: dict) -> tuple[Path, dict[str, str], list[str]]:
    """The model folder, the manifest's {relative path: sha256} under it, and every problem with them."""
    problems = []
    if manifest.get("format") != BUNDLE_FORMAT:
        problems.append(f'manifest "format" is {manifest.get("format")!r}, not {BUNDLE_FORMAT!r}')
    model_dir = manifest.get("model_dir")
    files = manifest.get("files")
    if (not isinstance(model_dir, str) or not model_dir or Path(model_dir).is_absolute()
            or ".." in Path(model_dir).parts):
        return bundle_dir, {}, [*problems, f'manifest "model_dir" {model_dir!r} is not a folder name inside the bundle']
    if not isinstance(files, dict) or not files:
        return bundle_dir, {}, [*problems, 'manifest "files" must map every model file to its sha256']
    root = bundle_dir / model_dir
    listed = {}
    for name, digest in files.items():
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or rel.parts[:1] != (model_dir,) or not isinstance(digest, str):
            problems.append(f'manifest "files" entry {name!r} is not a file under {model_dir}/ with a sha256')
        else:
            listed[str(rel.relative_to(model_dir))] = digest
    present = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.is_dir() else set()
    problems += [f"{model_dir}/{name} is missing" for name in sorted(set(listed) - present)]
    problems += [f"{model_dir}/{name} is not in the manifest (unverified files are never loaded)"
                 for name in sorted(present - set(listed))]
    return root, listed, problems


def lm_fingerprint(bundle_dir: Path, manifest: dict) -> str:
    """What changes when the manifest or any model file does, in place or by a new folder."""
    root = Path(bundle_dir) / str(manifest.get("model_dir"))
    stats = sorted((str(p.relative_to(root)), s.st_ino, s.st_size, s.st_mtime_ns)
                   for p in root.rglob("*") if p.is_file() for s in [p.stat()])
    return hashlib.sha256(json.dumps([manifest, stats], sort_keys=True, default=str).encode()).hexdigest()


def _verified_copy(bundle_dir: Path, manifest: dict, dest: Path) -> None:
    """Copy the model folder into `dest`, hashing the very bytes written; `BundleError` lists every problem."""
    root, listed, problems = _model_files(bundle_dir, manifest)
    for name, expected in sorted(listed.items()):
        source, target = root / name, dest / name
        if not source.is_file():
            continue  # reported as missing
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with open(source, "rb") as src, open(target, "wb") as out:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != expected:
            problems.append(f"{root.name}/{name}: sha256 {digest.hexdigest()[:12]}... does not match the manifest's "
                            f"{expected[:12]}...")
    if problems:
        raise BundleError(f"{bundle_dir}: refusing to serve this causal-LM bundle: " + "; ".join(problems))


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
    stream: object = None  # the tokenizer's incremental decoder
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
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


class _Scheduler:
    """The thread that owns the engine: admits waiting requests into free batch slots, steps the engine,
    steps seeded generators, and turns tokens into text for each client."""

    def __init__(self, model, tokenizer, tokenizer_lock: threading.Lock, max_batch: int, max_waiting: int,
                 name: str):
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
                raise QueueFull(f"{self.admitted} requests are generating or waiting (limit "
                                f"{self.max_batch} + {self.max_waiting})")
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
        except BaseException as err:  # noqa: BLE001 - handed to the loading thread
            self.failure = err
            self.ready.set()
            return
        self.ready.set()
        self.waiting: deque[Generation] = deque()
        self.running: dict[object, tuple[Generation, int]] = {}  # engine request -> (generation, turn id)
        self.seeded: dict[object, Generation] = {}  # generator -> generation
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
        while len(self.waiting) < self.max_batch and (
                left := min(limit, self.waiting[-1].queued_at + BATCH_GAP_SECONDS) - time.monotonic()) > 0:
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
                    params.set_search_options(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0,
                                              random_seed=s.seed,
                                              max_length=len(generation.prompt_ids) + s.max_tokens)
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
            generation.pending_text = generation.pending_text[:min(hits)]
            self._finish(generation, "stop")
            return True
        keep = _held_back(generation.pending_text, stops)
        ready = generation.pending_text[:len(generation.pending_text) - keep]
        if ready:
            generation.pending_text = generation.pending_text[len(ready):]
            generation.report(Chunk(ready))
        return False

    def _step_engine(self, og) -> None:
        for event in self.engine.run(self.events):
            request = event.request
            generation, turn = self.running[request]
            if event.flags & og.EngineEventFlags.TOKEN and not generation.finished:
                if self._on_token(generation, int(event.token)):
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
        weakref.finalize(self, self._scheduler.close)

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
        return {"admitted": scheduler.admitted, "generated_tokens": scheduler.generated_tokens,
                "largest_batch": scheduler.largest_batch, "max_batch": self.max_batch, "max_waiting": self.max_waiting}


def _generation_defaults(model_dir: Path) -> dict:
    """The sampling a model's authors recommend (generation_config.json); OpenAI's defaults otherwise."""
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    if config.get("do_sample") is False:
        return {"temperature": 0.0, "top_p": 1.0}
    return {"temperature": float(config.get("temperature", 1.0)), "top_p": float(config.get("top_p", 1.0))}


def _limit(name: str, default: int, low: int, high: int | None = None) -> int:
    raw = os.environ.get(name, str(default))
    if not raw.isdigit() or int(raw) < low or (high is not None and int(raw) > high):
        raise ValueError(f"{name}={raw!r}: expected an integer from {low}" + (f" to {high}" if high else " up"))
    return int(raw)


def load_lm_bundle(bundle_dir: Path, manifest: dict) -> LMRuntime:
    """Verify every model file against the manifest while copying it, then build the model from the copy."""
    import onnxruntime_genai as og

    bundle_dir = Path(bundle_dir)
    max_batch = _limit("MODELFORGE_LM_MAX_BATCH", MAX_BATCH, 1, ENGINE_STATIC_BATCH)
    max_waiting = _limit("MODELFORGE_LM_MAX_WAITING", MAX_WAITING, 0)
    if not isinstance(manifest.get("max_length"), int):
        raise BundleError(f'{bundle_dir}: manifest "max_length" (the context the model was built for) is missing')
    private = Path(tempfile.mkdtemp(prefix="modelforge-lm-"))
    try:
        _verified_copy(bundle_dir, manifest, private)
        config = og.Config(str(private))
        config.overlay(json.dumps({"engine": {"static_batching": {"max_batch_size": max_batch}}}))
        model = og.Model(config)
        tokenizer = og.Tokenizer(model)
        defaults = _generation_defaults(private)
    finally:
        shutil.rmtree(private, ignore_errors=True)  # the model and tokenizer are in memory now
    return LMRuntime(model, tokenizer, relative_paths(manifest, bundle_dir), defaults, max_batch, max_waiting)
