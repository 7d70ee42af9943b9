"""Time one generation model in a process of its own (so its peak memory is its own):
`python -m tasks.lm.probe MODEL_DIR REQUEST_JSON` prints one JSON line.

Request: {"prompt": [token ids], "prompt_lengths": [...], "new_tokens": N, "threads": T, "max_length": L}.
For each prompt length: time to first token (prefill + first token) and greedy decode tokens/s over
`new_tokens`; then one generation with the KV cache at `max_length`, so the peak resident memory (VmHWM)
is the model's at its configured context.
"""

from __future__ import annotations

import json
import sys
import time


def _generate(og, model, prompt: list[int], max_length: int, new_tokens: int) -> tuple[float, list[float]]:
    params = og.GeneratorParams(model)
    # min_length: an early end-of-text must not shorten the timed run.
    params.set_search_options(
        max_length=max_length, min_length=min(max_length, len(prompt) + new_tokens), do_sample=False
    )
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(prompt)
    generator.generate_next_token()
    ttft = time.perf_counter() - start
    steps = []
    for _ in range(new_tokens - 1):
        t = time.perf_counter()
        generator.generate_next_token()
        steps.append(time.perf_counter() - t)
    return ttft, steps


def probe(model_dir: str, request: dict) -> dict:
    import onnxruntime_genai as og

    config = og.Config(model_dir)
    config.overlay(
        json.dumps(
            {
                "model": {
                    "decoder": {
                        "session_options": {"intra_op_num_threads": request["threads"], "inter_op_num_threads": 1}
                    }
                }
            }
        )
    )
    model = og.Model(config)
    prompt, new = request["prompt"], request["new_tokens"]
    _generate(og, model, prompt[:8], 8 + new, new)  # warm-up
    out = {}
    for n in request["prompt_lengths"]:
        ttft, steps = _generate(og, model, prompt[:n], n + new, new)
        steps.sort()
        out[str(n)] = {
            "ttft_ms": ttft * 1e3,
            "decode_tok_s": len(steps) / sum(steps),
            "step_p50_ms": steps[len(steps) // 2] * 1e3,
            "step_p95_ms": steps[int(len(steps) * 0.95)] * 1e3,
        }
    _generate(og, model, prompt[:8], request["max_length"], 4)
    with open("/proc/self/status") as f:
        peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return {"prompts": out, "peak_mb": peak_kb / 1024}


if __name__ == "__main__":
    print(json.dumps(probe(sys.argv[1], json.loads(sys.argv[2]))))
