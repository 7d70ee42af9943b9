"""The FP32 generation model: the onnxruntime-genai model builder, used as a library, writes an ONNX decoder
with fused GroupQueryAttention, SimplifiedLayerNormalization and a KV cache, plus genai_config.json and the
tokenizer files. Its KV cache is sized to the configured context (the builder sizes it to the model's full
context otherwise), and its logits are checked against PyTorch before anything is quantized."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import task

from tasks.compress.base import Candidate
from tasks.lm.evaluate import ONNX_FILE, make_lm_session, window_logits

# Beside the tokenizer the builder writes: what a server needs for chat and default generation settings.
EXTRA_FILES = ("generation_config.json", "special_tokens_map.json")


@dataclass(frozen=True)
class Parity:
    max_abs: float
    top1: float


def build_genai(hf_dir: Path, out: Path, precision: str = "fp32", options: dict | None = None) -> Path:
    """The builder's model for `precision` (fp32, int8, int4) with `options` (its extra_options)."""
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    out = Path(out)
    cache = out.parent / f".{out.name}-cache"
    extra = [f"{k}={v}" for k, v in {"filename": ONNX_FILE, **(options or {})}.items()]
    # It prints every tensor it writes, and a progress bar per tensor on stderr (one line of ~60 KB per model
    # in a run's log): kept here, and shown only if the build fails.
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            parsed = parse_extra_options(None, str(hf_dir), str(out), precision, "cpu", str(cache), extra)
            create_model(None, str(hf_dir), str(out), precision, "cpu", str(cache), **parsed)
    except BaseException:
        print(said.getvalue()[-4000:], file=sys.stderr)
        raise
    shutil.rmtree(cache, ignore_errors=True)
    return out


def finish_folder(hf_dir: Path, out: Path, max_length: int) -> None:
    """Size the KV cache to `max_length`, copy the generation config, and keep the chat template in
    tokenizer_config.json (where servers and the bundle contract look for it)."""
    path = out / "genai_config.json"
    genai = json.loads(path.read_text())
    genai["search"]["max_length"] = max_length
    path.write_text(json.dumps(genai, indent=4))
    for name in EXTRA_FILES:
        if (Path(hf_dir) / name).is_file():
            shutil.copyfile(Path(hf_dir) / name, out / name)
    tok_path, template = out / "tokenizer_config.json", out / "chat_template.jinja"
    tok = json.loads(tok_path.read_text())
    if "chat_template" not in tok and template.is_file():
        tok_path.write_text(json.dumps({**tok, "chat_template": template.read_text()}, indent=2))


def kv_cache_bytes(model_dir: Path) -> int:
    """Bytes of the FP32 KV cache at the configured context: keys and values of every layer, batch 1."""
    genai = json.loads((Path(model_dir) / "genai_config.json").read_text())
    d = genai["model"]["decoder"]
    return 2 * d["num_hidden_layers"] * d["num_key_value_heads"] * d["head_size"] * genai["search"]["max_length"] * 4


def parity(hf_dir: Path, model_dir: Path, windows: np.ndarray, threads: int) -> Parity:
    """Max |ORT - PyTorch| over the logits of `windows`, and their top-1 agreement."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    session = make_lm_session(model_dir, threads)
    worst, agree, n = 0.0, 0, 0
    for ids in windows:
        with torch.no_grad():
            ref = model(torch.from_numpy(ids[None])).logits[0].numpy()
        got = window_logits(session, ids)
        worst = max(worst, float(np.abs(ref - got).max()))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        n += len(ids)
    return Parity(worst, agree / n)


def export_lm(hf_dir: Path, out: Path, max_length: int, windows: np.ndarray, threads: int) -> Candidate:
    """The FP32 baseline candidate: built, KV cache sized, checked against PyTorch on `windows`."""
    out = Path(out)
    build_genai(hf_dir, out)
    finish_folder(hf_dir, out, max_length)
    check = parity(hf_dir, out, windows, threads)
    kv = kv_cache_bytes(out)
    print(
        f"[lm] FP32 ONNX for generation in {out}: parity max |ORT - PyTorch| {check.max_abs:.2e}, top-1 "
        f"{check.top1:.4f}; KV cache at max_length {max_length}: {kv / 2**20:.1f} MiB"
    )
    return Candidate(
        "baseline",
        out / ONNX_FILE,
        out,
        check.max_abs,
        {"precision": "fp32", "parity_top1": check.top1, "kv_cache_bytes": kv, "max_length": max_length},
    )


export_lm_task = task(name="export_lm")(export_lm)
