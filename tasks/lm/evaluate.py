"""What quality and speed mean for a causal LM, measured on ONNX Runtime.

Quality: perplexity on held-out windows of the corpus, and, against the FP32 model, top-1 next-token
agreement and the mean KL divergence of the next-token distributions. Speed: time to first token and greedy
decode tokens/s through onnxruntime-genai (what serves the model), each model timed in a process of its own
so its peak memory is its own; candidates are interleaved over rounds and the best round counts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tasks.data.corpus import Document, load_corpus, load_tokenizer, render

ONNX_FILE = "model.onnx"


def token_windows(tokenizer, texts: list[Document], window: int, max_windows: int) -> np.ndarray:
    """[n, window] token ids: the documents joined by the end-of-text token, cut into whole windows."""
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(render(tokenizer, text))["input_ids"] + sep
        if len(ids) >= window * max_windows:
            break
    n = min(len(ids) // window, max_windows)
    return np.asarray(ids[: n * window], dtype=np.int64).reshape(n, window)


@dataclass(frozen=True)
class LMSession:
    session: ort.InferenceSession
    kv_heads: int
    head_size: int  # the graph leaves the cache's last axis symbolic


def make_lm_session(model_dir: Path, threads: int, weights: dict[str, np.ndarray] | None = None) -> LMSession:
    """A session on the folder's decoder, with the initializers named in `weights` replaced by those arrays."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    values = {name: ort.OrtValue.ortvalue_from_numpy(w) for name, w in (weights or {}).items()}
    for name, value in values.items():
        options.add_initializer(name, value)
    decoder = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["decoder"]
    session = ort.InferenceSession(str(Path(model_dir) / ONNX_FILE), options, providers=["CPUExecutionProvider"])
    return LMSession(session, decoder["num_key_value_heads"], decoder["head_size"])


def window_feeds(lm: LMSession, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The decoder's inputs for one window of token ids, from an empty KV cache."""
    feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), np.int64)}
    for arg in lm.session.get_inputs():
        if arg.name.startswith("past_key_values"):
            feeds[arg.name] = np.zeros((1, lm.kv_heads, 0, lm.head_size), np.float32)
    return feeds


def window_logits(lm: LMSession, ids: np.ndarray) -> np.ndarray:
    """[T, vocab] logits of one window, from an empty KV cache."""
    return lm.session.run(["logits"], window_feeds(lm, ids))[0][0]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@dataclass(frozen=True)
class Reference:
    """The FP32 model's next-token argmax and log-probs (float16, to bound memory) for one window."""

    argmax: np.ndarray
    logp: np.ndarray


def reference_of(logits: np.ndarray) -> Reference:
    logp = log_softmax(logits.astype(np.float64))[:-1]
    return Reference(logp.argmax(-1), logp.astype(np.float16))


def score(session: LMSession, windows: np.ndarray, reference: list[Reference] | None = None) -> dict:
    """Perplexity of the next tokens in `windows`; with the FP32 `reference` (one per window), top-1 agreement
    and mean KL(FP32 || model)."""
    nll, top1, kl, n, per_window = 0.0, 0.0, 0.0, 0, []
    for i, ids in enumerate(windows):
        logp = log_softmax(window_logits(session, ids).astype(np.float64))[:-1]
        window_nll = -logp[np.arange(len(ids) - 1), ids[1:]].sum()
        nll += window_nll
        per_window.append(float(window_nll / (len(ids) - 1)))
        n += len(ids) - 1
        if reference is not None:
            ref = reference[i].logp.astype(np.float64)
            top1 += (reference[i].argmax == logp.argmax(-1)).sum()
            kl += (np.exp(ref) * (ref - logp)).sum()
    out = {"perplexity": float(np.exp(nll / n)), "window_nll": per_window}
    if reference is not None:
        out |= {"top1": float(top1 / n), "kl": float(kl / n)}
    return out


@dataclass(frozen=True)
class LMEval:
    """Scores and times generation models against the FP32 `baseline` folder on the versioned corpus."""

    data_dir: Path
    baseline: Path  # FP32 ONNX model folder
    window: int
    max_windows: int
    threads: int
    primary: str = "top1"

    @cached_property
    def _tokenizer(self):
        return load_tokenizer(self.baseline)

    @cached_property
    def _corpus(self) -> dict[str, list[Document]]:
        return load_corpus(self.data_dir)

    def windows(self, split: str, limit: int | None = None) -> np.ndarray:
        return token_windows(self._tokenizer, self._corpus[split], self.window, limit or self.max_windows)

    @cached_property
    def _reference(self) -> list[Reference]:
        session = make_lm_session(self.baseline, self.threads)
        return [reference_of(window_logits(session, ids)) for ids in self.windows("validation")]

    def quality(self, model_dir: Path, windows: int | None = None) -> dict[str, float]:
        """Validation perplexity, top-1 and KL vs FP32 (on the first `windows` windows), and test perplexity."""
        session = make_lm_session(model_dir, self.threads)
        reference = self._reference[:windows] if windows else self._reference
        val = score(session, self.windows("validation")[: len(reference)], reference)
        del val["window_nll"]
        return val if windows else val | {"test_perplexity": self.test_perplexity(model_dir, session)}

    def test_perplexity(self, model_dir: Path, session: LMSession | None = None) -> float:
        return self.test_score(model_dir, session)["perplexity"]

    def test_score(self, model_dir: Path, session: LMSession | None = None) -> dict:
        """Test perplexity and each test window's mean negative log-likelihood (for paired comparisons)."""
        return score(session or make_lm_session(model_dir, self.threads), self.windows("test"))

    def prompt(self) -> list[int]:
        """Test-split tokens to prompt with (the same for every model)."""
        return [int(t) for t in self.windows("test", 1)[0]]

    def timings(
        self, model_dirs: dict[str, Path], prompt_lengths: list[int], new_tokens: int, max_length: int, rounds: int
    ) -> dict[str, dict]:
        """Per model: {"prompts": {length: ttft_ms, decode_tok_s, step_p50_ms, step_p95_ms}, "peak_mb",
        "rounds_tok_s"}; the best of `rounds` interleaved rounds, and each round's decode tokens/s at the
        shortest prompt (for a paired speed comparison)."""
        prompt = self.prompt()
        lengths = sorted({min(n, len(prompt), max_length - new_tokens) for n in prompt_lengths})
        request = json.dumps(
            {
                "prompt": prompt,
                "prompt_lengths": lengths,
                "new_tokens": new_tokens,
                "threads": self.threads,
                "max_length": max_length,
            }
        )
        best: dict[str, dict] = {}
        for _ in range(rounds):
            for name, folder in model_dirs.items():
                run = json.loads(probe_process(folder, request))
                round_tok_s = run["prompts"][min(run["prompts"], key=int)]["decode_tok_s"]
                if name not in best:
                    best[name] = run | {"rounds_tok_s": [round_tok_s]}
                    continue
                best[name]["rounds_tok_s"].append(round_tok_s)
                best[name]["peak_mb"] = min(best[name]["peak_mb"], run["peak_mb"])
                for n, t in run["prompts"].items():
                    kept = best[name]["prompts"][n]
                    if t["decode_tok_s"] > kept["decode_tok_s"]:
                        kept |= {k: t[k] for k in ("decode_tok_s", "step_p50_ms", "step_p95_ms")}
                    kept["ttft_ms"] = min(kept["ttft_ms"], t["ttft_ms"])
        return best


def probe_process(folder: Path, request: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.lm.probe", str(folder), request],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    if proc.returncode != 0:
        raise RuntimeError(f"timing {folder} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
