"""Weight-only quantization of the FP32 generation model with ONNX Runtime's MatMulNBitsQuantizer, and the
per-layer sensitivity that decides which decoder layers a mixed-precision recipe keeps at INT8.

Every quantizer argument is passed explicitly: the class defaults (block 128, asymmetric) are not the
builder CLI's (block 32, symmetric).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import numpy_helper
from prefect import task
from pydantic import Field, model_validator

from tasks.core.settings import Section
from tasks.lm.adapter import LORA_TAG, lora_pass
from tasks.lm.evaluate import ONNX_FILE, make_lm_session, score
from tasks.lm.grid import BLOCK, kquant_pass, minmax_pass

LMAlgorithm = Literal["rtn", "k_quant", "hqq", "minmax"]


class LMRecipe(Section):
    """One weight-only quantization of the FP32 ONNX model through ONNX Runtime's MatMulNBitsQuantizer."""

    bits: Literal[4, 8] = Field(4, description="Weight bits of the decoder MatMuls.")
    algorithm: LMAlgorithm = Field(
        "rtn",
        description="rtn (round to nearest), k_quant (llama.cpp-style scale search), hqq (half-quadratic; 4 bits), "
        "minmax (asymmetric min/max blocks, llama.cpp's Q4_1 rule, on the symmetric int4 kernel, each block's "
        "offset in extra rows of the same call; weights already on a Q4_1 grid stay on it; 4 bits, blocks of 32).",
    )
    block_size: Literal[32, 64, 128] = Field(32, description="Weights per quantization block.")
    symmetric: bool = Field(
        True,
        description="Symmetric blocks (no zero point); hqq always fits a float zero point, k_quant an integer one.",
    )
    accuracy_level: Literal[0, 4] = Field(
        0,
        description="For 4-bit weights, 0: float activations; 4: int8 "
        "activations (faster, known to flip argmax tokens on models with large "
        "activations). 8-bit weights always take int8 activations.",
    )
    lm_head: Literal["fp32", "int8", "int4"] = Field(
        "int8", description="Precision of the output projection (int4 hurts small tied models)."
    )
    int8_layers: int = Field(
        0,
        ge=0,
        description="Decoder layers measured most sensitive on the calibration text kept at INT8 (4-bit recipes).",
    )
    adapter: Literal["merged", "separate"] = Field(
        "merged",
        description="With finetune enabled: quantize the merged weights, or the base model's with the LoRA update "
        "kept beside them at FP32 (separate: the base's grid survives; two small MatMuls per adapted projection).",
    )

    @model_validator(mode="after")
    def _minmax_shape(self) -> LMRecipe:
        if self.algorithm == "minmax" and (self.bits, self.block_size) != (4, 32):
            raise ValueError(
                f"algorithm minmax: 4 bits in blocks of 32 only (got {self.bits} bits, block {self.block_size})"
            )
        return self


LM_HEAD = "/lm_head/MatMul"
_LAYER = re.compile(r"/model/layers\.(\d+)/")


def _matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMuls with a constant weight (the ones MatMulNBits replaces)."""
    inits = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def node_bits(model: onnx.ModelProto, recipe: LMRecipe, sensitive: list[int]) -> dict[str, int | None]:
    """MatMul name -> weight bits (None: left in FP32)."""
    keep8 = set(sensitive[: recipe.int8_layers]) if recipe.bits == 4 else set()
    head = {"fp32": None, "int8": 8, "int4": 4}[recipe.lm_head]
    out: dict[str, int | None] = {}
    for node in _matmuls(model):
        layer = _LAYER.search(node.name)
        if LORA_TAG in node.name:  # a separate adapter's detour stays FP32
            out[node.name] = None
        else:
            out[node.name] = head if node.name == LM_HEAD else 8 if layer and int(layer[1]) in keep8 else recipe.bits
    return out


def activation_level(recipe: LMRecipe, bits: int) -> int:
    """MatMulNBits' accuracy_level for `bits`-bit weights. 8-bit weights always take int8 activations: ORT has no
    fast kernel for them with float activations (measured on SmolLM2: 1 decode token/s against 30+ for FP32)."""
    return 4 if bits == 8 else recipe.accuracy_level


def _quantize_pass(model: onnx.ModelProto, recipe: LMRecipe, bits: int, include: set[str], algorithm: str):
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    exclude = [n.name for n in _matmuls(model) if n.name not in include]
    accuracy = activation_level(recipe, bits) or None
    if algorithm == "hqq":
        config = HQQWeightOnlyQuantConfig(block_size=recipe.block_size, bits=bits)
    else:
        # Round to nearest through ORT's own packer: the neural-compressor RTN path mis-packs asymmetric zero
        # points when a column has an odd number of blocks (576 rows in blocks of 64 or 128, as in SmolLM2).
        config = DefaultWeightOnlyQuantConfig(
            block_size=recipe.block_size, is_symmetric=recipe.symmetric, accuracy_level=accuracy, bits=bits
        )
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=recipe.block_size,
        is_symmetric=recipe.symmetric,
        accuracy_level=accuracy,
        nodes_to_exclude=exclude,
        algo_config=config,
    )
    quantizer.process()
    return quantizer.model.model


def quantize_lm(
    fp32_dir: Path, recipe: LMRecipe, out: Path, sensitive: list[int], adapter_dir: Path | None = None
) -> Path:
    """`out`: the FP32 folder's genai config and tokenizer files beside the quantized model.onnx (+ data);
    with `adapter_dir` (a peft LoRA folder), its update added beside the weights of `fp32_dir` at FP32."""
    fp32_dir, out = Path(fp32_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for path in fp32_dir.iterdir():
        if not path.name.startswith(ONNX_FILE):
            shutil.copyfile(path, out / path.name)
    model = onnx.load(str(fp32_dir / ONNX_FILE))
    [head] = [n for n in model.graph.node if n.name == LM_HEAD]
    if adapter_dir is not None:
        model = lora_pass(model, fp32_dir, adapter_dir)
    plan = node_bits(model, recipe, sensitive)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    # HQQ and minmax write 4 bits only: the INT8 nodes go first through RTN, then they take the rest.
    for bits in sorted({b for b in plan.values() if b is not None}, reverse=True):
        algorithm = recipe.algorithm if bits == 4 or recipe.algorithm not in ("hqq", "minmax") else "rtn"
        include = {n for n, b in plan.items() if b == bits}
        if algorithm == "minmax":
            # minmax reads whole blocks of 32 inputs; a MatMul with other sizes (none in Llama, Qwen or SmolLM
            # shapes) takes symmetric RTN in blocks of 32 instead
            rows = {i.name: i.dims[0] for i in model.graph.initializer}
            whole = {n.name for n in _matmuls(model) if n.name in include and rows[n.input[1]] % BLOCK == 0}
            model = minmax_pass(model, whole, recipe.accuracy_level)
            if include - whole:
                rtn = recipe.model_copy(update={"symmetric": True})
                model = _quantize_pass(model, rtn, bits, include - whole, "rtn")
        elif algorithm == "k_quant":
            model = kquant_pass(model, include, bits, recipe.block_size, activation_level(recipe, bits))
        else:
            model = _quantize_pass(model, recipe, bits, include, algorithm)
    model = tie_embedding_pass(model, head)
    onnx.save(
        model,
        str(out / ONNX_FILE),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=ONNX_FILE + ".data",
        size_threshold=1024,
    )
    return out


def tie_embedding_pass(model: onnx.ModelProto, head: onnx.NodeProto) -> onnx.ModelProto:
    """The token embedding read from the quantized lm_head's blocks (GatherBlockQuantized, as the model builder
    does for its INT4 models) when the checkpoint ties the two: the builder's FP32 graph gathers from a
    Transpose of the lm_head weight, a copy that stayed FP32 beside the quantized head (113 of SmolLM2's
    220 MB at INT4). `head` is the FP32 graph's lm_head MatMul. An untied table, an FP32 lm_head, a minmax
    one (its rows carry the block offsets, read through the block sums appended to its input) or one with
    float zero points (HQQ's: GatherBlockQuantized takes integer ones only) stay as they are."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    quantized = [n for n in graph.node if n.op_type == "MatMulNBits" and n.input[0] == head.input[0]]
    tied = [
        n
        for n in graph.node
        if n.op_type == "Gather"
        and n.input[0] in producer
        and producer[n.input[0]].op_type == "Transpose"
        and producer[n.input[0]].input[0] == head.input[1]
    ]
    if len(quantized) != 1 or len(tied) != 1:
        return model
    (q,), (gather,) = quantized, tied
    if len(q.input) > 3 and q.input[3] and inits[q.input[3]].data_type != onnx.TensorProto.UINT8:
        return model
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in q.attribute}
    bits, block, k, n = attrs["bits"], attrs["block_size"], attrs["K"], attrs["N"]
    if k % block:  # the head's rows are padded to whole blocks: the gathered rows would need a Slice
        return model
    shape = f"{head.name}_as_table_shape"
    graph.initializer.append(numpy_helper.from_array(np.array([n, k * bits // 8], np.int64), shape))
    table = f"{head.name}_as_table"
    lookup = [
        onnx.helper.make_node("Reshape", [q.input[1], shape], [table], name=f"{gather.name}_table"),
        onnx.helper.make_node(
            "GatherBlockQuantized",
            [table, gather.input[1], *q.input[2:4]],  # scales, and the zero points when the head has them
            list(gather.output),
            name=f"{gather.name}BlockQuantized",
            domain="com.microsoft",
            bits=bits,
            block_size=block,
            gather_axis=0,
            quantize_axis=1,
        ),
    ]
    transpose = producer[gather.input[0]]
    nodes = []
    for m in graph.node:  # nodes are told apart by their outputs (protobuf hands out fresh wrappers)
        if m.output == gather.output:
            nodes += lookup
        elif m.output != transpose.output:
            nodes.append(m)
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(head.input[1] in m.input for m in graph.node):
        graph.initializer.remove(inits[head.input[1]])
    return model


def _fake_int4(w: np.ndarray, block: int = 32) -> np.ndarray:
    """`w` [in, out] rounded to symmetric INT4 per block of `block` input rows, back in float."""
    rows = -(-w.shape[0] // block) * block
    padded = np.zeros((rows, w.shape[1]), w.dtype)
    padded[: w.shape[0]] = w
    b = padded.reshape(-1, block, w.shape[1])
    scale = np.abs(b).max(1, keepdims=True) / 7
    scale[scale == 0] = 1
    return (np.clip(np.round(b / scale), -8, 7) * scale).reshape(rows, -1)[: w.shape[0]]


def layer_sensitivity(fp32_dir: Path, windows: np.ndarray, threads: int) -> list[dict]:
    """For each decoder layer, the calibration perplexity with that layer's MatMuls alone at INT4 (RTN, block
    32, symmetric), most harmful first."""
    path = Path(fp32_dir) / ONNX_FILE
    model = onnx.load(str(path), load_external_data=False)
    base = score(make_lm_session(fp32_dir, threads), windows)["perplexity"]
    layers: dict[int, list[str]] = {}
    for node in _matmuls(model):
        if m := _LAYER.search(node.name):
            layers.setdefault(int(m[1]), []).append(node.input[1])
    onnx.load_external_data_for_model(model, str(path.parent))
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for layer, names in sorted(layers.items()):
        # The session reads the model from disk; only this layer's weights are handed over, rounded.
        weights = {w: _fake_int4(numpy_helper.to_array(inits[w])) for w in names}
        ppl = score(make_lm_session(fp32_dir, threads, weights), windows)["perplexity"]
        out.append({"layer": layer, "perplexity": ppl, "increase_pct": (ppl / base - 1) * 100})
    return sorted(out, key=lambda r: -r["perplexity"])


layer_sensitivity_task = task(name="layer_sensitivity")(layer_sensitivity)
