"""The user's causal LM: a local Hugging Face folder (safetensors only) or a GGUF file, checked up front and
turned into the plain FP32 Hugging Face folder the ONNX builder reads."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from pydantic import Field

from tasks.core.settings import ConfigError, Section


class LMModelConfig(Section):
    model: Path = Field(
        ...,
        description="A local Hugging Face causal-LM folder (config.json, *.safetensors, tokenizer "
        "files; pickled weights are refused) or a .gguf file.",
    )
    max_length: int = Field(2048, ge=16, description="Context (prompt + generated tokens) the KV cache is sized for.")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Decoder architectures the onnxruntime-genai builder exports with GQA and a KV cache (the ones tested here
# are Llama-class; the builder's own list is longer).
ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "GraniteForCausalLM",
)


def model_problems(path: Path) -> list[str]:
    """Every reason `path` cannot be used, or none."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".gguf":
            return [f"lm.model {path}: a file must be a .gguf checkpoint (or give a Hugging Face folder)"]
        with open(path, "rb") as f:
            return [] if f.read(4) == b"GGUF" else [f"lm.model {path}: not a GGUF file (no GGUF magic)"]
    if not path.is_dir():
        return [f"lm.model {path}: no such folder or .gguf file"]
    problems = []
    if pickles := sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES):
        problems.append(
            f"lm.model {path}: pickled weights are refused (loading them runs code): {', '.join(pickles)}; "
            "save the model with safetensors (model.save_pretrained(dir, safe_serialization=True))"
        )
    if not any(path.glob("*.safetensors")):
        problems.append(f"lm.model {path}: no *.safetensors weights")
    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or ["?"]
        if architectures[0] not in ARCHITECTURES:
            problems.append(
                f"lm.model {path}: architecture {architectures[0]} is not a supported causal LM "
                f"({', '.join(ARCHITECTURES)})"
            )
    except (OSError, ValueError) as err:
        problems.append(f"lm.model {path}: no readable config.json ({type(err).__name__})")
    if not (path / "tokenizer.json").is_file():
        problems.append(f"lm.model {path}: no tokenizer.json")
    return problems


def check_model(path: Path) -> None:
    if problems := model_problems(path):
        raise ConfigError(f"unusable model ({len(problems)} problem(s)):\n" + "\n".join(f"  - {p}" for p in problems))


def gguf_to_folder(gguf: Path, out: Path) -> Path:
    """The GGUF checkpoint dequantized to FP32 and saved as a plain Hugging Face folder with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf, out = Path(gguf), Path(out)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The GGUF loader marks the config as quantized; the dequantized weights are plain FP32.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config).eval()
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    return out


def prepare_model(path: Path, work: Path) -> Path:
    """Check the model, then return the Hugging Face folder to export: the user's own, or the GGUF converted
    once under `work` (keyed by the file's size and mtime)."""
    path = Path(path)
    check_model(path)
    if path.is_dir():
        return path
    stat = path.stat()
    out = Path(work) / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if not (out / "config.json").is_file():
        print(f"[lm] converting {path.name} (GGUF) to an FP32 Hugging Face folder in {out}")
        gguf_to_folder(path, out)
    return out


prepare_model_task = task(name="prepare_model")(prepare_model)
