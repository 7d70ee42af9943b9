"""What a weight-only INT4 offset costs in ONNX Runtime's MatMulNBits kernels, at SmolLM2's decode shapes.

    .venv/bin/python bench/lm_kernels.py [--layers 8] [--rounds 7] [--threads 2]

The one target of the LLM benchmark still unmet (decode >= 0.9x the builder's default int4) turns on this: a
GGUF's Q4_1 weights are w = d q + m per block of 32, and the offset m must reach the kernel exactly (rounded
to a whole step it costs +20% perplexity on SmolLM2). A stack of decoder layers' projections at SmolLM2's
shapes (qkv 576->960, o 576->576, gate and up 576->1536, down 1536->576; batch 1, as in decoding), random
weights, goes through the pipeline's own rewrites, each timed on ORT CPU in interleaved rounds (median):

- symmetric: round to nearest, no zero point (the builder's int4 kernel path);
- uint8 zero points: an integer offset per block (k_quant's form);
- float zero points: the exact offset (HQQ's form);
- minmax: the exact offset on the symmetric kernel, the block sums appended to each input (what ships).

It also asks ORT whether its fused decoder ops (MatMulNBitsMlp, MatMulNBitsQkv, SwiGLU) have a CPU kernel.
Ends with `RESULT lm_kernel_float_zp_vs_symmetric=<> lm_kernel_uint8_zp_vs_symmetric=<>
lm_kernel_minmax_vs_symmetric=<> lm_fused_cpu_kernels=<n of 3>` (time ratios; 1.00 would make the offset
free). When a new ORT release brings float zero points near 1.00, `minmax` should use them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.lm.grid import BLOCK, kquant_pass, minmax_pass  # noqa: E402
from tasks.lm.quantize import LMRecipe, _quantize_pass  # noqa: E402
from tasks.onnx.runtime import make_session, measure_speeds  # noqa: E402

HIDDEN, QKV, INTER = 576, 960, 1536


def fp32_stack(layers: int, seed: int = 0) -> onnx.ModelProto:
    """x -> per layer: qkv, its first 576 outputs (the attention's width) -> o -> gate * up -> down."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def matmul(name: str, x: str, k: int, n: int) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) * 0.02).astype(np.float32), f"{name}.w"))
        nodes.append(helper.make_node("MatMul", [x, f"{name}.w"], [f"{name}/out"], name=name))
        return f"{name}/out"

    inits += [
        numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("zero", 0), ("hidden", HIDDEN), ("last", -1))
    ]
    x = "x"
    for i in range(layers):
        p = f"/model/layers.{i}"
        qkv = matmul(f"{p}/attn/qkv_proj/MatMul", x, HIDDEN, QKV)
        nodes.append(helper.make_node("Slice", [qkv, "zero", "hidden", "last"], [f"{p}/attn/out"]))
        o = matmul(f"{p}/attn/o_proj/MatMul", f"{p}/attn/out", HIDDEN, HIDDEN)
        gate = matmul(f"{p}/mlp/gate_proj/MatMul", o, HIDDEN, INTER)
        up = matmul(f"{p}/mlp/up_proj/MatMul", o, HIDDEN, INTER)
        nodes.append(helper.make_node("Mul", [gate, up], [f"{p}/mlp/Mul/out"]))
        x = matmul(f"{p}/mlp/down_proj/MatMul", f"{p}/mlp/Mul/out", INTER, HIDDEN)
    graph = helper.make_graph(
        nodes,
        "decoder_projections",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, HIDDEN])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, HIDDEN])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def variants(layers: int) -> dict[str, onnx.ModelProto]:
    include = {n.name for n in fp32_stack(layers).graph.node if n.op_type == "MatMul"}
    rtn = LMRecipe(accuracy_level=4)
    return {
        "symmetric": _quantize_pass(fp32_stack(layers), rtn, 4, include, "rtn"),
        "uint8_zp": kquant_pass(fp32_stack(layers), include, 4, BLOCK, 4),
        "float_zp": _quantize_pass(fp32_stack(layers), rtn.model_copy(update={"algorithm": "hqq"}), 4, include, "hqq"),
        "minmax": minmax_pass(fp32_stack(layers), include, 4),
    }


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    return make_session(model.SerializeToString(), intra_op_threads=threads)


def fused_cpu_kernels() -> dict[str, bool]:
    """Whether ORT builds a CPU session for each fused decoder op (shapes as in SmolLM2's MLP)."""
    k, n = HIDDEN, INTER
    q = numpy_helper.from_array(np.zeros((n, k // BLOCK, BLOCK // 2), np.uint8), "q")
    s = numpy_helper.from_array(np.ones((n, k // BLOCK), np.float32), "s")
    nbits = {"domain": "com.microsoft", "K": k, "bits": 4, "block_size": BLOCK, "accuracy_level": 4}
    ops = {
        "MatMulNBitsMlp": helper.make_node(
            "MatMulNBitsMlp", ["x", "", "", "q", "s", "", "q", "s"], ["y"], N=n, activation="silu", **nbits
        ),
        "MatMulNBitsQkv": helper.make_node(
            "MatMulNBitsQkv",
            ["x", "", "g", "q", "s", "", "q", "s", "", "q", "s"],
            ["y", "k", "v"],
            Nq=n,
            Nkv=n,
            **nbits,
        ),
        "SwiGLU": helper.make_node("SwiGLU", ["x", "x"], ["y"], domain="com.microsoft", activation_alpha=1.0),
    }
    found = {}
    for name, node in ops.items():
        graph = helper.make_graph(
            [node],
            name,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [q, s, numpy_helper.from_array(np.ones(k, np.float32), "g")],
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
        )
        try:
            session(model, 1)
            found[name] = True
        except Exception as error:  # ORT raises NOT_IMPLEMENTED (a plain RuntimeError subclass) for a missing kernel
            if "NOT_IMPLEMENTED" not in str(error):
                raise
            found[name] = False
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}; {args.layers} layers of SmolLM2's projections, batch 1", flush=True)
    sessions = {name: session(model, args.threads) for name, model in variants(args.layers).items()}
    x = np.random.default_rng(1).standard_normal((1, HIDDEN)).astype(np.float32)
    print(f"timing {len(sessions)} variants in {args.rounds} interleaved rounds ...", flush=True)
    timings = measure_speeds(sessions, x, 3, 20 * args.rounds, 1, args.rounds, rounds=args.rounds)
    median = {name: t.latency_p50_ms * 1000 / args.layers for name, t in timings.items()}
    base = median["symmetric"]
    print("\n| kernel path | us per decoder layer (5 projections) | vs symmetric |\n|---|---|---|")
    for name, us in median.items():
        print(f"| {name} | {us:.0f} | {us / base:.2f}x |")
    fused = fused_cpu_kernels()
    print(
        "fused decoder ops with a CPU kernel: " + ", ".join(f"{n} {'yes' if ok else 'no'}" for n, ok in fused.items())
    )
    print(
        f"RESULT lm_kernel_float_zp_vs_symmetric={median['float_zp'] / base:.2f} "
        f"lm_kernel_uint8_zp_vs_symmetric={median['uint8_zp'] / base:.2f} "
        f"lm_kernel_minmax_vs_symmetric={median['minmax'] / base:.2f} lm_fused_cpu_kernels={sum(fused.values())}"
    )


if __name__ == "__main__":
    main()
