"""MiniLM benchmark: the pipeline's FP32 / optimised / INT8 encoders and a distilled 3-layer student,
beside INT8 encoders built the way the peers build theirs, side by side on ORT CPU.

    .venv/bin/python bench/minilm.py [--sentences 600] [--queries 100] [--train-sentences 5200] [--epochs 8]
                                     [--no-student]

The pipeline's rows go through its own code path (tasks.encoder.minilm: TorchScript export of eager
attention, attention-only fusion, dynamic INT8, sessions with the fusions the model opts out of).
The peers' own packages cannot be installed beside this project's pins (optimum-onnx needs
transformers < 4.58; sentence-transformers 6.2's `[onnx]` extra does not resolve), so their
recipes are rebuilt from the same FP32 export, each loaded in a default ORT session:

- `peer_st_int8`, sentence-transformers' `export_dynamic_quantized_onnx_model`: plain
  `quantize_dynamic`, per-channel INT8 on every MatMul with constant weights, nothing fused offline;
- `peer_optimum_o3_int8`, Optimum's O3 + INT8: every transformer fusion of ORT's optimiser plus the
  GELU approximation, then the same per-channel dynamic INT8.

It reports size, p50 latency at batch 1 / sequence 128, throughput at batch 32 / sequence 128 (all
variants timed interleaved in one run), and fidelity to the FP32 model on held-out sentences: mean
and worst-case cosine, top-10 retrieval overlap. It ends with one line a script can read, the
pipeline's INT8 against the faster peer on each measure:

    RESULT int8_vs_reference_b32=<ratio> int8_vs_reference_b1=<ratio> int8_worst_cos=<value>

Not a test: it takes minutes (the student ~20 more); its figures are what it reports.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import onnx

from tasks.data.docstrings import offline_corpus
from tasks.encoder.minilm import (
    HIDDEN_SIZE,
    NUM_HEADS,
    distill_encoder,
    encode_onnx,
    export_encoder,
    fidelity,
    load_minilm,
    optimize_encoder,
    quantize_encoder,
    tokenize,
)
from tasks.onnx.runtime import make_session, measure_speeds

PEERS = ("peer_st_int8", "peer_optimum_o3_int8")


def peer_int8(fp32: Path, out: Path, optimum_o3: bool) -> Path:
    """A peer's INT8 encoder from the FP32 export (see the module docstring)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    source = fp32
    if optimum_o3:
        options = FusionOptions("bert")
        options.enable_gelu_approximation = True
        source = out.with_suffix(".fused.onnx")
        optimize_model(
            str(fp32), model_type="bert", num_heads=NUM_HEADS, hidden_size=HIDDEN_SIZE, optimization_options=options
        ).save_model_to_file(str(source))
    quantize_dynamic(
        str(source),
        str(out),
        weight_type=QuantType.QInt8,
        per_channel=True,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=600, help="held-out sentences for fidelity")
    parser.add_argument("--queries", type=int, default=100, help="of which retrieval queries")
    parser.add_argument("--train-sentences", type=int, default=5200, help="distillation corpus (disjoint)")
    parser.add_argument("--epochs", type=int, default=8, help="distillation epochs")
    parser.add_argument("--lr", type=float, default=3e-4, help="distillation learning rate")
    parser.add_argument("--keep", default="0,2,5", help="teacher layers the student starts from")
    parser.add_argument(
        "--student",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="distil and time the 3-layer student (about 20 min on 2 cores)",
    )
    parser.add_argument("--latency-runs", type=int, default=200)
    parser.add_argument("--throughput-runs", type=int, default=30)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-minilm-"))
    model, tok = load_minilm()
    corpus = offline_corpus(args.sentences + args.train_sentences)
    sentences, train = corpus[: args.sentences], corpus[args.sentences :]
    exported = export_encoder(model, tok, work / "fp32.onnx", sentences[:32])
    print(f"[bench] FP32 export: worst cosine vs PyTorch {exported.min_cosine:.7f}")
    fused = optimize_encoder(exported.path, work / "optimized.onnx")
    print(f"[bench] pipeline optimiser fused: {fused}")
    variants = {
        "fp32": exported.path,
        "optimized": work / "optimized.onnx",
        "int8": quantize_encoder(work / "optimized.onnx", work / "int8.onnx"),
        **{name: peer_int8(exported.path, work / f"{name}.onnx", "optimum" in name) for name in PEERS},
    }
    if args.student:
        keep = tuple(int(k) for k in args.keep.split(","))
        student, _ = distill_encoder(model, tok, train, keep=keep, epochs=args.epochs, lr=args.lr)
        student_onnx = export_encoder(student, tok, work / "student.onnx", sentences[:32]).path
        optimize_encoder(student_onnx, work / "student_opt.onnx")
        variants |= {
            "student_3l": student_onnx,
            "student_3l_int8": quantize_encoder(work / "student_opt.onnx", work / "student_int8.onnx"),
        }

    reference = encode_onnx(exported.path, tok, sentences)
    quality = {k: fidelity(reference, encode_onnx(p, tok, sentences), args.queries) for k, p in variants.items()}
    feeds = tokenize(tok, sentences[:32], max_length=128, pad_to_max=True)
    speed = measure_speeds(
        {k: make_session(p) for k, p in variants.items()},
        feeds,
        warmup=10,
        latency_runs=args.latency_runs,
        batch=32,
        batch_runs=args.throughput_runs,
    )
    base = speed["fp32"]
    print(
        f"\n{'variant':<22}{'size MB':>9}{'size x':>8}{'p50 ms b1':>11}{'p50 x':>7}{'sent/s b32':>12}{'thr x':>7}"
        f"{'cos mean':>10}{'cos worst':>11}{'top10':>7}"
    )
    for k, p in variants.items():
        s, q = speed[k], quality[k]
        print(
            f"{k:<22}{p.stat().st_size / 1e6:>9.1f}{variants['fp32'].stat().st_size / p.stat().st_size:>8.2f}"
            f"{s.latency_p50_ms:>11.2f}{base.latency_p50_ms / s.latency_p50_ms:>7.2f}{s.throughput_sps:>12.1f}"
            f"{s.throughput_sps / base.throughput_sps:>7.2f}{q['cosine_mean']:>10.5f}{q['cosine_min']:>11.5f}"
            f"{q['top10_overlap']:>7.3f}"
        )

    ours = speed["int8"]
    print("\npipeline int8 vs each peer (>1: the pipeline is faster)")
    for peer in PEERS:
        print(
            f"  {peer:<22} batch 32 throughput {ours.throughput_sps / speed[peer].throughput_sps:.2f}x   "
            f"batch 1 p50 {speed[peer].latency_p50_ms / ours.latency_p50_ms:.2f}x"
        )
    b32 = min(ours.throughput_sps / speed[p].throughput_sps for p in PEERS)
    b1 = min(speed[p].latency_p50_ms / ours.latency_p50_ms for p in PEERS)
    print(
        f"RESULT int8_vs_reference_b32={b32:.3f} int8_vs_reference_b1={b1:.3f} "
        f"int8_worst_cos={quality['int8']['cosine_min']:.4f}"
    )


if __name__ == "__main__":
    main()
