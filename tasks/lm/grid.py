"""Asymmetric min/max INT4 blocks (llama.cpp's Q4_1 rule) on ONNX Runtime's fast symmetric MatMulNBits kernel.

Per output column n and block b of 32 inputs: d = (max - min) / 15 and q = round((w - min) / d) in 0..15, so
w ~ min + q d. MatMulNBits without zero points dequantizes d (q - 8); the rest, c = min + 8 d, is the same for
the whole block, so x @ W = MatMulNBits(x, q, d) + blocksum(x) @ C with blocksum(x) the sums of x over each
block of 32 inputs (x @ a 0/1 [K, K/32] matrix) and C[b, n] = c (1/32 of the weights, FP32). Weights already
on a Q4_1 grid (a GGUF's dequantized Q4_1 tensors) come back exactly; float zero points (HQQ) would do the same
but take ORT's slow path.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

BLOCK = 32


def minmax_int4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`w` [K, N] (K a multiple of 32) -> (q uint8 [N, K/32, 32] in 0..15, d [N, K/32], c [K/32, N]) with
    w ~ d (q - 8) + c per block."""
    k, n = w.shape
    blocks = w.T.reshape(n, k // BLOCK, BLOCK).astype(np.float64)
    low, high = blocks.min(-1), blocks.max(-1)
    d = (high - low) / 15
    d[d == 0] = 1  # a constant block: q = 0 everywhere and c carries the value
    q = np.clip(np.round((blocks - low[..., None]) / d[..., None]), 0, 15).astype(np.uint8)
    return q, d.astype(np.float32), (low + 8 * d).T.astype(np.float32)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """[N, K/32, 32] values 0..15 -> MatMulNBits' B, uint8 [N, K/32, 16], the even element in the low nibble."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def offsets_name(matmul: str) -> str:
    """The initializer holding the per-block offsets C of the MatMul named `matmul`, once minmax replaced it."""
    return f"{matmul}_offsets"


def minmax_pass(model: onnx.ModelProto, include: set[str], accuracy_level: int) -> onnx.ModelProto:
    """Replace the MatMuls named in `include` (constant weight [K, N]) by MatMulNBits + the block offset term.
    MatMuls reading the same activation share its block sums."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    sums: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    used: set[str] = set()
    for node in graph.node:
        if node.op_type != "MatMul" or node.name not in include:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        used.add(node.input[1])
        k, n = w.shape
        if k % BLOCK:
            raise ValueError(f"{node.name}: {k} inputs is not a multiple of {BLOCK} (minmax needs whole blocks)")
        q, d, c = minmax_int4(w)
        p, x = node.name, node.input[0]
        graph.initializer.extend(
            [
                numpy_helper.from_array(pack_int4(q), f"{p}_Q4"),
                numpy_helper.from_array(d, f"{p}_scales"),
                numpy_helper.from_array(c, offsets_name(p)),
            ]
        )
        if x not in sums:
            # The block sums as a MatMul with a 0/1 matrix (shared by every weight with K inputs): one node,
            # where Reshape + ReduceSum take two (each node costs a dispatch per decoded token).
            ones = f"minmax_blocksum_{k}"
            if ones not in inits:
                e = np.zeros((k, k // BLOCK), np.float32)
                e[np.arange(k), np.arange(k) // BLOCK] = 1
                inits[ones] = numpy_helper.from_array(e, ones)
                graph.initializer.append(inits[ones])
            sums[x] = f"{p}_blocksum"
            nodes.append(helper.make_node("MatMul", [x, ones], [sums[x]], name=sums[x]))
        nodes += [
            helper.make_node(
                "MatMulNBits",
                [x, f"{p}_Q4", f"{p}_scales"],
                [f"{p}_int4"],
                name=f"{p}_Q4",
                domain="com.microsoft",
                K=k,
                N=n,
                bits=4,
                block_size=BLOCK,
                accuracy_level=accuracy_level,  # 0 is the op's default: float activations
            ),
            helper.make_node("MatMul", [sums[x], offsets_name(p)], [f"{p}_offset"], name=f"{p}_offset"),
            helper.make_node("Add", [f"{p}_int4", f"{p}_offset"], [node.output[0]], name=f"{p}_add"),
        ]
    still = {i for node in nodes for i in node.input}
    kept = [i for i in graph.initializer if i.name not in used or i.name in still]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model
