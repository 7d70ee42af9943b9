"""MatMulNBits weights written here rather than by ONNX Runtime's quantizer.

minmax: asymmetric min/max INT4 blocks (llama.cpp's Q4_1 rule) on ORT's fast symmetric MatMulNBits kernel.

Per output column n and block b of 32 inputs: d = (max - min) / 15 and q = round((w - min) / d) in 0..15, so
w ~ min + q d = d (q - 8) + c, with c = min + 8 d the same for the whole block. Hence x @ W = x @ [d (q - 8)] +
blocksum(x) @ C, blocksum(x) the sums of x over each block of 32 inputs and C[b, n] = c. Both terms go through
one MatMulNBits call: its input is x with its block sums appended (once per stage), and the weight's appended
rows hold C in symmetric int4 stages, each rounding what the previous one left. Weights already on a Q4_1 grid
(a GGUF's dequantized Q4_1 tensors) come back to within 1/196 of a column's largest offset in 32 blocks. Float
zero points (HQQ) would be exact but take ORT's slow path; the offset as a MatMul + Add of its own cost 14 more
nodes per decoder layer where this takes 8, each a dispatch per decoded token (SmolLM2 in bench/llm.py: 121
against 152 decode tokens/s).

k_quant: llama.cpp's weighted search for each block's scale and minimum (ORT's own implementation), with an
integer zero point per block. ORT 1.32's packer writes the 4-bit zero points of all columns as one run of nibbles,
which fails when a column has an odd number of blocks (SmolLM2's 576 inputs in blocks of 64 or 128: a ValueError
in every such trial of the search); here each column's zero points are packed on their own, as MatMulNBits reads
them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

BLOCK = 32
STAGES = 2  # one stage leaves 1/14 of the offsets (SmolLM2: +7.6% perplexity); a third changes nothing measurable


def minmax_int4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`w` [K, N] (K a multiple of 32) -> (q uint8 [N, K/32, 32] in 0..15, d [N, K/32], c [K/32, N]) with
    w ~ d (q - 8) + c per block."""
    k, n = w.shape
    blocks = w.T.reshape(n, k // BLOCK, BLOCK).astype(np.float64)
    low, high = blocks.min(-1), blocks.max(-1)
    d = (high - low) / 15
    d[d == 0] = 1  # a constant block: q = 0 everywhere and c carries the value
    q = np.clip(np.round((blocks - low[..., None]) / d[..., None]), 0, 15).astype(np.uint8)
    return q, d.astype(np.float32), (low + 8 * d).T


def offset_stages(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offsets `c` [K/32, N] -> (q uint8 [N, STAGES * P/32, 32], scales [N, STAGES * P/32]): the appended rows of
    the weight, P = K/32 padded to whole blocks; stage s reads the block sums again and rounds what stages < s
    left, so their sum over stages is c."""
    rows, n = c.shape
    padded = -(-rows // BLOCK) * BLOCK
    rest = np.zeros((n, padded // BLOCK, BLOCK))
    rest.reshape(n, padded)[:, :rows] = c.T
    qs, scales = [], []
    for _ in range(STAGES):
        scale = np.abs(rest).max(-1) / 7
        scale[scale == 0] = 1
        level = np.clip(np.round(rest / scale[..., None]), -8, 7)
        rest = rest - level * scale[..., None]
        qs.append((level + 8).astype(np.uint8))
        scales.append(scale.astype(np.float32))
    return np.concatenate(qs, 1), np.concatenate(scales, 1)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """[N, blocks, 32] values 0..15 -> MatMulNBits' B, uint8 [N, blocks, 16], the even element in the low nibble."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def replace_matmuls(
    model: onnx.ModelProto, include: set[str], rewrite: Callable[[onnx.NodeProto, np.ndarray], list[onnx.NodeProto]]
) -> onnx.ModelProto:
    """Each MatMul named in `include` (constant weight [K, N]) replaced by the nodes `rewrite(node, weight)` returns
    (it adds their initializers to the graph); weights no node reads any more are dropped."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    used: set[str] = set()
    for node in graph.node:
        if node.op_type == "MatMul" and node.name in include:
            used.add(node.input[1])
            nodes += rewrite(node, numpy_helper.to_array(inits[node.input[1]]))
        else:
            nodes.append(node)
    still = {i for node in nodes for i in node.input}
    kept = [i for i in graph.initializer if i.name not in used or i.name in still]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def matmul_nbits(node: onnx.NodeProto, inputs: list[str], k: int, n: int, bits: int, block: int, level: int):
    """The MatMulNBits node that stands for MatMul `node`: `inputs` are its activation, B, scales (and zero points)."""
    return helper.make_node(
        "MatMulNBits",
        inputs,
        list(node.output),
        name=f"{node.name}_Q{bits}",
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=level,  # 0 is the op's default: float activations
    )


def minmax_pass(model: onnx.ModelProto, include: set[str], accuracy_level: int) -> onnx.ModelProto:
    """Replace the MatMuls named in `include` (constant weight [K, N]) by one MatMulNBits each over their input
    with its block sums appended; MatMuls reading the same activation share the appended input."""
    graph = model.graph
    appended: dict[str, str] = {}
    ones_added = {i.name for i in graph.initializer}  # a blocksum matrix already there is shared

    def rewrite(node: onnx.NodeProto, w: np.ndarray) -> list[onnx.NodeProto]:
        k, n = w.shape
        if k % BLOCK:
            raise ValueError(f"{node.name}: {k} inputs is not a multiple of {BLOCK} (minmax needs whole blocks)")
        q, d, c = minmax_int4(w)
        cq, cd = offset_stages(c)
        p, x = node.name, node.input[0]
        graph.initializer.extend(
            [
                numpy_helper.from_array(pack_int4(np.concatenate([q, cq], 1)), f"{p}_Q4"),
                numpy_helper.from_array(np.concatenate([d, cd], 1), f"{p}_scales"),
            ]
        )
        nodes = []
        if x not in appended:
            # The block sums as a MatMul with a 0/1 matrix (its zero columns pad them to whole blocks): one node,
            # where Reshape + ReduceSum + Pad take three.
            ones = f"minmax_blocksum_{k}"
            if ones not in ones_added:
                e = np.zeros((k, cq.shape[1] // STAGES * BLOCK), np.float32)
                e[np.arange(k), np.arange(k) // BLOCK] = 1
                graph.initializer.append(numpy_helper.from_array(e, ones))
                ones_added.add(ones)
            sums, appended[x] = f"{p}_blocksum", f"{p}_with_blocksums"
            nodes += [
                helper.make_node("MatMul", [x, ones], [sums], name=sums),
                helper.make_node("Concat", [x] + [sums] * STAGES, [appended[x]], name=appended[x], axis=-1),
            ]
        inputs = [appended[x], f"{p}_Q4", f"{p}_scales"]
        return [*nodes, matmul_nbits(node, inputs, k + cq.shape[1] * BLOCK, n, 4, BLOCK, accuracy_level)]

    return replace_matmuls(model, include, rewrite)


def kquant_pass(model: onnx.ModelProto, include: set[str], bits: int, block: int, accuracy_level: int):
    """Replace the MatMuls named in `include` by MatMulNBits with k-quant blocks of `block` inputs: an integer
    zero point per block (uint8 [N, blocks] for 8 bits; two per byte for 4, each column's own bytes)."""
    from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor_k_quant_cpu

    graph = model.graph

    def rewrite(node: onnx.NodeProto, w: np.ndarray) -> list[onnx.NodeProto]:
        k, n = w.shape
        blocks = -(-k // block)
        padded = np.zeros((blocks * block, n), np.float32)  # zero rows: whole blocks, as MatMulNBits reads them
        padded[:k] = w
        q, scale, zero = quant_tensor_k_quant_cpu(padded.T, bits, block)
        q, zero = q.astype(np.uint8).reshape(n, blocks, block), zero.reshape(n, blocks)
        if bits == 4:
            q = pack_int4(q)
            zero = np.concatenate([zero, np.full((n, blocks % 2), 8, np.uint8)], 1)  # 8: the kernel's default
            zero = zero[:, 0::2] | (zero[:, 1::2] << 4)
        p = node.name
        graph.initializer.extend(
            [
                numpy_helper.from_array(q, f"{p}_Q{bits}"),
                numpy_helper.from_array(scale.reshape(n, blocks).astype(np.float32), f"{p}_scales"),
                numpy_helper.from_array(zero.astype(np.uint8), f"{p}_zero_points"),
            ]
        )
        inputs = [node.input[0], f"{p}_Q{bits}", f"{p}_scales", f"{p}_zero_points"]
        return [matmul_nbits(node, inputs, k, n, bits, block, accuracy_level)]

    return replace_matmuls(model, include, rewrite)
