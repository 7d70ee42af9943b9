"""A LoRA adapter kept beside the quantized base weights instead of merged into them.

Merged, a fine-tune's small update W + s B A moves every weight off the grid the base weights sat on (a GGUF's
Q4_1 blocks), and INT4 rounds most of the update away (SmolLM2 fine-tuned on the reference manual: RTN kept none
of the perplexity gain, minmax 10%, HQQ 19%). Kept apart, the base weights quantize as well as the base model
does (exactly, with `minmax` on a Q4_1 grid) and the update runs at FP32 beside them: y = x W_q + s (x A^T) B^T
(kept 99% of the gain). It costs two small MatMuls and an Add per adapted projection (a rank-r detour), one for
the builder's packed q/k/v projection; measured ~12% of minmax's decode speed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class Adapted:
    """A fine-tuned model in its two halves: the base model's FP32 generation folder and the peft LoRA folder."""

    base_fp32: Path
    adapter: Path


_KEY = re.compile(r"\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
# peft's module name -> the onnxruntime-genai builder's MatMul (q, k and v may be packed into one, in that order).
_NODES = {
    "q_proj": "attn/q_proj",
    "k_proj": "attn/k_proj",
    "v_proj": "attn/v_proj",
    "o_proj": "attn/o_proj",
    "gate_proj": "mlp/gate_proj",
    "up_proj": "mlp/up_proj",
    "down_proj": "mlp/down_proj",
}
LORA_TAG = "/lora"  # in the name of every node this pass adds (quantization leaves them at FP32)


def read_adapter(adapter_dir: Path) -> tuple[dict[tuple[int, str], tuple[np.ndarray, np.ndarray]], float]:
    """(layer, module) -> (A [r, in], B [out, r]) of a peft LoRA folder, and the update's scale."""
    from safetensors.numpy import load_file

    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    unsupported = [k for k in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern") if cfg.get(k)]
    if unsupported:
        raise ValueError(f"{adapter_dir}: LoRA settings this pass does not apply: {unsupported}")
    scale = cfg["lora_alpha"] / (np.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    parts: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in load_file(str(adapter_dir / ADAPTER_WEIGHTS)).items():
        if not (m := _KEY.search(key)) or m[2] not in _NODES:
            raise ValueError(f"{adapter_dir}: adapter weight {key!r} is not on a decoder projection this pass knows")
        parts.setdefault((int(m[1]), m[2]), {})[m[3]] = value.astype(np.float32)
    if not parts:
        raise ValueError(f"{adapter_dir}: no LoRA weights in {ADAPTER_WEIGHTS} (saved after merge_and_unload?)")
    return {k: (v["A"], v["B"]) for k, v in parts.items()}, float(scale)


def _site(nodes: dict[str, onnx.NodeProto], layer: int, module: str, sizes: dict[str, int]) -> tuple[str, int]:
    """The MatMul that computes `module` of `layer` and the module's first output column in it."""
    own = f"/model/layers.{layer}/{_NODES[module]}/MatMul"
    if own in nodes:
        return own, 0
    packed = f"/model/layers.{layer}/attn/qkv_proj/MatMul"
    if module in ("q_proj", "k_proj", "v_proj") and packed in nodes:
        return packed, {"q_proj": 0, "k_proj": sizes["q"], "v_proj": sizes["q"] + sizes["kv"]}[module]
    raise ValueError(f"no MatMul for layer {layer}'s {module} in the model ({own} nor a packed qkv_proj)")


def lora_pass(model: onnx.ModelProto, model_dir: Path, adapter_dir: Path) -> onnx.ModelProto:
    """Add `adapter_dir`'s update beside each adapted MatMul of the FP32 generation model in `model_dir`."""
    adapters, scale = read_adapter(adapter_dir)
    decoder = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["decoder"]
    sizes = {
        "q": decoder["num_attention_heads"] * decoder["head_size"],
        "kv": decoder["num_key_value_heads"] * decoder["head_size"],
    }
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    inits = {i.name: i for i in graph.initializer}
    sites: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for (layer, module), (a, b) in sorted(adapters.items()):
        name, offset = _site(nodes, layer, module, sizes)
        sites.setdefault(name, []).append((offset, a, b))
    added: dict[str, list[onnx.NodeProto]] = {}
    for name, parts in sites.items():
        node = nodes[name]
        k, n = inits[node.input[1]].dims
        # One detour per MatMul: the ranks stacked, each B in its own output columns (zeros elsewhere).
        down = np.concatenate([a for _, a, _ in parts]).T  # [in, sum r]
        up = np.zeros((down.shape[1], n), np.float32)
        row = 0
        for offset, a, b in parts:
            up[row : row + len(a), offset : offset + len(b)] = scale * b.T
            row += len(a)
        if down.shape[0] != k:
            raise ValueError(f"{name}: the adapter's A takes {down.shape[0]} inputs, the weight {k}")
        p, out = f"{name}{LORA_TAG}", node.output[0]
        graph.initializer.extend([numpy_helper.from_array(down, f"{p}/A"), numpy_helper.from_array(up, f"{p}/B")])
        node.output[0] = f"{p}/base"
        added[name] = [
            helper.make_node("MatMul", [node.input[0], f"{p}/A"], [f"{p}/xa"], name=f"{p}/MatMul_A"),
            helper.make_node("MatMul", [f"{p}/xa", f"{p}/B"], [f"{p}/delta"], name=f"{p}/MatMul_B"),
            helper.make_node("Add", [f"{p}/base", f"{p}/delta"], [out], name=f"{p}/Add"),
        ]
    ordered = [x for node in graph.node for x in (node, *added.get(node.name, []))]
    del graph.node[:]
    graph.node.extend(ordered)
    return model
