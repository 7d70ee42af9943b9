"""MiniLM benchmark: FP32 vs ORT-optimised vs dynamic INT8 vs a distilled 3-layer student, side by side on ORT CPU.

    .venv/bin/python bench/minilm.py [--sentences 600] [--queries 100] [--train-sentences 5200] [--epochs 8]

Exports the packaged all-MiniLM-L6-v2 (encoder + mean pooling + normalisation), builds the
optimised and INT8 variants and a 3-layer student (teacher layers 0, 2, 5, distilled on offline
sentences disjoint from the held-out ones), and reports size, p50 latency at batch 1 / sequence 128, throughput
at batch 32 / sequence 128 (timed interleaved in one run), and fidelity to the FP32 model on
held-out sentences: mean and worst-case cosine, top-10 retrieval overlap.
Not a test: it takes minutes; its figures are what it reports.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)

from tasks.embed_minilm import (distill_encoder, encode_onnx, export_encoder, fidelity, load_minilm,  # noqa: E402
                                offline_corpus, optimize_encoder, quantize_encoder, tokenize)
from tasks.run_onnx import make_session, measure_speeds  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=600, help="held-out sentences for fidelity")
    parser.add_argument("--queries", type=int, default=100, help="of which retrieval queries")
    parser.add_argument("--train-sentences", type=int, default=5200, help="distillation corpus (disjoint)")
    parser.add_argument("--epochs", type=int, default=8, help="distillation epochs")
    parser.add_argument("--lr", type=float, default=3e-4, help="distillation learning rate")
    parser.add_argument("--keep", default="0,2,5", help="teacher layers the student starts from")
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
    print(f"[bench] ORT optimiser fused: {fused}")
    keep = tuple(int(k) for k in args.keep.split(","))
    student, _ = distill_encoder(model, tok, train, keep=keep, epochs=args.epochs, lr=args.lr)
    student_onnx = export_encoder(student, tok, work / "student.onnx", sentences[:32]).path
    variants = {"fp32": exported.path, "optimized": work / "optimized.onnx",
                "int8_dynamic": quantize_encoder(work / "optimized.onnx", work / "int8.onnx"),
                "student_3l": student_onnx, "student_3l_int8": quantize_encoder(student_onnx, work / "student_int8.onnx")}

    reference = encode_onnx(exported.path, tok, sentences)
    quality = {k: fidelity(reference, encode_onnx(p, tok, sentences), args.queries) for k, p in variants.items()}
    feeds = tokenize(tok, sentences[:32], max_length=128, pad_to_max=True)
    speed = measure_speeds({k: make_session(p) for k, p in variants.items()}, feeds, warmup=10,
                           latency_runs=args.latency_runs, batch=32, batch_runs=args.throughput_runs)
    base = speed["fp32"]
    print(f"\n{'variant':<14}{'size MB':>9}{'size x':>8}{'p50 ms b1':>11}{'p50 x':>7}{'sent/s b32':>12}{'thr x':>7}"
          f"{'cos mean':>10}{'cos worst':>11}{'top10':>7}")
    for k, p in variants.items():
        s, q = speed[k], quality[k]
        print(f"{k:<14}{p.stat().st_size / 1e6:>9.1f}{variants['fp32'].stat().st_size / p.stat().st_size:>8.2f}"
              f"{s.latency_p50_ms:>11.2f}{base.latency_p50_ms / s.latency_p50_ms:>7.2f}{s.throughput_sps:>12.1f}"
              f"{s.throughput_sps / base.throughput_sps:>7.2f}{q['cosine_mean']:>10.5f}{q['cosine_min']:>11.5f}"
              f"{q['top10_overlap']:>7.3f}")


if __name__ == "__main__":
    main()
