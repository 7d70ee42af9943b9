"""Compression benchmark: FP32 vs every method and chain, measured side by side on ONNX Runtime CPU.

    .venv/bin/python bench/compress.py [--conv 32,64] [--hidden 128] [--epochs 60]

Trains a digits CNN for real, builds each compressed variant through the pipeline's own
`compress_candidate`, then times all of them interleaved in one `validate_candidates` call, so the
ratios compare like with like; once per `--threads` setting (all cores, and one thread per session
as when serving one replica per core: FP32 and INT8 kernels scale differently across cores). Prints the table
and checks the targets from issue #4:
  INT8: >= 3.5x smaller and >= 1.5x batch-64 throughput vs FP32 at <= 1 point accuracy drop
  structured pruning (50% channels): >= 1.5x throughput at <= 1 point drop after fine-tuning
and the comparisons of issue #16: binarized weights (packed size vs what ORT stores and runs),
structured pruning with and without sparsity training at the same amount (before and after the
pruning's own fine-tuning), and post-training vs quantization-aware INT8 at equal speed.
Not a test: figures depend on the machine; nothing here asserts on wall time.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)

import torch

from tasks.compress.binarize import Binarize
from tasks.compress.convert_fp16 import ConvertFp16
from tasks.compress.distill import Distill
from tasks.compress.magnitude_prune import MagnitudePrune
from tasks.compress.quantize_aware import QuantizeAware
from tasks.compress.quantize_dynamic import QuantizeDynamic
from tasks.compress.quantize_static import QuantizeStatic
from tasks.compress.recipe import compress_candidate
from tasks.compress.sparsity_train import SparsityTrain
from tasks.compress.structured_prune import StructuredPrune
from tasks.data import load_splits
from tasks.data.digits import (
    DataConfig,
    materialize_digits,
)
from tasks.models import Arch, build_model, save_checkpoint
from tasks.release.evaluate import ClassifierEval
from tasks.release.validate import (
    ValidateConfig,
    validate_candidates,
)
from tasks.train.loop import TrainParams, accuracy, fit
from tasks.train.stage import TrainConfig

STATIC = QuantizeStatic(method="quantize_static", calibration_samples=256)
STRUCTURED = StructuredPrune(method="structured_prune", amount=0.5, finetune_epochs=20)
SLIM = SparsityTrain(method="sparsity_train", target="channels", penalty=2e-3, finetune_epochs=20)
RECIPES = {
    "fp32": [],
    "magnitude_50": [MagnitudePrune(method="magnitude_prune", sparsity=0.5, finetune_epochs=10)],
    "structured_50": [STRUCTURED],
    "student_50": [Distill(method="distill", width_factor=0.5, epochs=60, alpha=0.5)],
    "int8_dynamic": [QuantizeDynamic(method="quantize_dynamic")],
    "int8_static": [STATIC],
    "fp16": [ConvertFp16(method="convert_fp16")],
    "structured_50+int8": [STRUCTURED, STATIC],
    "binary": [Binarize(method="binarize", finetune_epochs=40)],
    "slim+structured_50": [SLIM, STRUCTURED],
    "int8_qat": [QuantizeAware(method="quantize_aware", finetune_epochs=5, calibration_samples=256)],
}
TARGETS = {  # candidate: (min size ratio, min throughput ratio, max accuracy drop in points)
    "int8_static": (3.5, 1.5, 1.0),
    "structured_50": (None, 1.5, 1.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conv", default="32,64", help="conv channels of the benchmark CNN")
    parser.add_argument("--hidden", default="128", help="hidden widths of its head")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--latency-runs", type=int, default=2000)
    parser.add_argument("--throughput-runs", type=int, default=400)
    parser.add_argument(
        "--threads",
        default="0,1",
        help="ORT intra-op threads per session to measure with (0 = all cores); one table each",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-compress-"))
    data_dir = work / "data"
    materialize_digits(DataConfig(), data_dir)
    splits = load_splits(data_dir)
    arch = Arch(
        "cnn", 10, (1, 8, 8), tuple(int(c) for c in args.conv.split(",")), tuple(int(h) for h in args.hidden.split(","))
    )
    torch.manual_seed(0)
    model = build_model(arch)
    params = TrainParams(lr=0.003, optimizer="adam", epochs=args.epochs, patience=15)
    result = fit(model, splits.train, splits.val, params)
    print(
        f"[bench] FP32 {arch.conv}/{arch.hidden}: val {result.best_val_accuracy:.4f} "
        f"test {accuracy(model, *splits.test):.4f} after {result.epochs_run} epochs"
    )
    ckpt = save_checkpoint(work / "fp32.pt", model, arch, {"train": params.__dict__})

    train_cfg = TrainConfig(patience=15)
    candidates = [
        compress_candidate(name, recipe, ckpt, data_dir, train_cfg, work / "candidates")
        for name, recipe in RECIPES.items()
    ]
    for threads in (int(t) for t in args.threads.split(",")):
        cfg = ValidateConfig(
            warmup=100, latency_runs=args.latency_runs, throughput_runs=args.throughput_runs, intra_op_threads=threads
        )
        reports = validate_candidates(candidates, cfg, ClassifierEval(data_dir))
        print_table(reports, threads)
    print_techniques({c.name: c.info for c in candidates}, {r.name: r for r in reports})


def print_techniques(info: dict[str, dict], reports: dict) -> None:
    """Issue #16's comparisons, from the candidates' own step reports and the last timing table."""
    base = reports["fp32"]
    b = info["binary"]["binarize"]
    print(
        f"\nbinarize: {b['binary_weights']} of {b['params']} weights 1-bit; packed {b['packed_bytes'] / 1024:.1f} KB "
        f"vs {b['float32_bytes'] / 1024:.1f} KB float32 ({b['float32_bytes'] / b['packed_bytes']:.1f}x); ORT stores "
        f"and runs float32 (ONNX file {reports['binary'].size_bytes / 1024:.1f} KB, throughput "
        f"{reports['binary'].throughput_sps / base.throughput_sps:.2f}x); test accuracy {reports['binary'].score:.4f} "
        f"(drop {(base.score - reports['binary'].score) * 100:.2f} pts)"
    )
    slim = info["slim+structured_50"]["sparsity_train"]
    print(
        f"sparsity training (group L1 {slim['penalty']}): {slim['channels_near_zero']:.0%} of channels near zero; "
        "50% structured pruning, val accuracy right after pruning -> after fine-tuning, test accuracy:"
    )
    for name in ("structured_50", "slim+structured_50"):
        s = info[name]["structured_prune"]
        print(f"  {name:<20} {s['val_acc_pruned']:.4f} -> {s['val_acc_finetuned']:.4f}, test {reports[name].score:.4f}")
    ptq, qat = reports["int8_static"], reports["int8_qat"]
    print(
        f"INT8 post-training vs quantization-aware: test accuracy {ptq.score:.4f} vs {qat.score:.4f}, throughput "
        f"{ptq.throughput_sps / base.throughput_sps:.2f}x vs {qat.throughput_sps / base.throughput_sps:.2f}x of FP32"
    )


def print_table(reports, threads: int) -> None:
    base = reports[0]
    print(f"\nintra-op threads per session: {threads or 'all cores'}")
    header = (
        f"{'candidate':<20}{'acc':>8}{'drop pts':>10}{'size KB':>10}{'size x':>8}"
        f"{'p50 us':>9}{'p50 x':>8}{'thr/s b64':>12}{'thr x':>8}"
    )
    print(header + "\n" + "-" * len(header))
    for r in reports:
        print(
            f"{r.name:<20}{r.score:>8.4f}{(base.score - r.score) * 100:>10.2f}{r.size_bytes / 1024:>10.1f}"
            f"{base.size_bytes / r.size_bytes:>8.2f}{r.latency_p50_ms * 1000:>9.1f}"
            f"{base.latency_p50_ms / r.latency_p50_ms:>8.2f}{r.throughput_sps:>12,.0f}"
            f"{r.throughput_sps / base.throughput_sps:>8.2f}"
        )
    print("targets (issue #4):")
    by_name = {r.name: r for r in reports}
    for name, (min_size, min_thr, max_drop) in TARGETS.items():
        r = by_name[name]
        checks = []
        if min_size:
            checks.append(
                (
                    f"size {base.size_bytes / r.size_bytes:.2f}x >= {min_size}x",
                    base.size_bytes / r.size_bytes >= min_size,
                )
            )
        checks.append(
            (
                f"throughput {r.throughput_sps / base.throughput_sps:.2f}x >= {min_thr}x",
                r.throughput_sps / base.throughput_sps >= min_thr,
            )
        )
        drop = (base.score - r.score) * 100
        checks.append((f"accuracy drop {drop:.2f} <= {max_drop} pts", drop <= max_drop))
        print(f"  {name:<16}" + "; ".join(f"{text} {'MET' if ok else 'MISSED'}" for text, ok in checks))


if __name__ == "__main__":
    main()
