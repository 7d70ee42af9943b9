"""LoRA fine-tuning benchmark on SmolLM2-135M-Instruct and the example's domain corpus (the Python reference
manual, one document per topic; the test topics are never trained on).

    .venv/bin/python bench/lm_finetune.py [--project /tmp/lm-ft-bench] [--steps 6] [--configs single ddp2 fsdp2]
        [--skip-gain | --skip-parallel] [--train-windows 64] [--window 256] [--batch 8] [--epochs 1] [--lr 5e-4]
        [--target attention+mlp]

Part 1, model parallelism: the same `--steps` optimizer steps (windows of 256 tokens, 8 per step) on one
process, on 2 DDP ranks and on 2 FSDP2 ranks (gloo on CPU), each rank measuring its peak resident memory
during training (VmHWM reset after the model is loaded), its median step time, and the share of the
parameters and of the optimizer state it holds.
Part 2, quality (skipped with --skip-gain): the pipeline's fine-tune (one process) on the calibration topics,
then base and fine-tuned exported to ONNX (FP32) and quantized with the INT4 recipes below (the merged
weights; and the base weights with the adapter kept beside them at FP32), all scored by the pipeline's
evaluator on the same test windows. ft_int4_keeps_gain is the share of the FP32 fine-tune's gain over the
base FP32 model that the separate-adapter INT4 candidate keeps.
It ends with one line (ft_cpu_minutes: wall-clock minutes of the fine-tune on this 2-core machine):

    RESULT ft_ppl_gain_pct=<> ft_int4_keeps_gain=<> ft_cpu_minutes=<> fsdp2_rank_param_share=<> ...
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.data.corpus import CorpusConfig, describe_corpus  # noqa: E402
from tasks.lm.finetune import FinetuneConfig  # noqa: E402
from tasks.lm.lora import merge, train_lora  # noqa: E402
from tasks.lm.quantize import LMRecipe  # noqa: E402
from tasks.lm.train import check_finetune  # noqa: E402

# The INT4 recipes of configs/smollm2.yaml: symmetric RTN and minmax (Q4_1 min/max blocks) on the merged weights,
# and minmax on the base weights with the LoRA update kept beside them at FP32 (the fine-tuned config's shipped one).
INT4 = {
    "int4_rtn32": LMRecipe(bits=4, algorithm="rtn", block_size=32, symmetric=True, accuracy_level=0, lm_head="int8"),
    "int4_minmax32": LMRecipe(bits=4, algorithm="minmax", block_size=32, lm_head="int8"),
    "int4_minmax32_lora": LMRecipe(bits=4, algorithm="minmax", block_size=32, lm_head="int8", adapter="separate"),
}


def example(project: Path) -> tuple[Path, Path]:
    folder = project / "datasets" / "smollm2"
    if not (folder / "model" / "config.json").is_file():
        project.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "flows.cli", "example", "smollm2", "datasets/smollm2", "--root", str(project)],
            check=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            cwd=project,
        )
    return folder / "model", folder / "corpus"


CONFIGS = {"single": (1, "ddp"), "ddp2": (2, "ddp"), "fsdp2": (2, "fsdp")}


def parallelism(model: Path, corpus: Path, steps: int, names: list[str]) -> dict:
    cfg = FinetuneConfig(
        enabled=True,
        window=256,
        batch_size=8,
        max_windows=8 * steps,
        val_windows=2,
        epochs=1,
        target="attention+mlp",
        lr=5e-4,
    )
    data = check_finetune(model, corpus, cfg)
    rows = {}
    for name in names:
        processes, parallel = CONFIGS[name]
        _, result = train_lora(
            model, data.train, data.val, cfg.model_copy(update={"processes": processes, "parallel": parallel})
        )
        rows[name] = result.shards
        for s in result.shards:
            print(
                f"[bench] {name} rank {s['rank']}: peak {s['peak_rss_mb']:.0f} MB, "
                f"step {s['step_seconds_median']:.2f} s, "
                f"params held {s['params_held'] / s['params_total']:.3f}, optimizer state held "
                f"{s['optimizer_state_held'] / max(1, s['optimizer_state_total']):.3f}",
                flush=True,
            )
    return rows


def quality(model: Path, corpus: Path, work: Path, args) -> dict:
    from tasks.lm.evaluate import LMEval
    from tasks.lm.export import export_lm
    from tasks.lm.quantize import quantize_lm

    cfg = FinetuneConfig(
        enabled=True,
        window=args.window,
        batch_size=args.batch,
        max_windows=args.train_windows,
        val_windows=8,
        epochs=args.epochs,
        lr=args.lr,
        target=args.target,
        patience=1,
    )
    data = check_finetune(model, corpus, cfg)
    start = time.perf_counter()
    tuned, result = train_lora(
        model,
        data.train,
        data.val,
        cfg,
        on_record=lambda r: (
            "val_perplexity" in r
            and print(f"[bench] epoch {r['epoch']}: validation perplexity {r['val_perplexity']:.3f}", flush=True)
        ),
    )
    minutes = (time.perf_counter() - start) / 60
    tuned.save_pretrained(str(work / "adapter"))  # before merging: merge_and_unload folds the adapter away
    merged = merge(tuned, model, work / "merged")
    scores: dict[str, dict[str, float]] = {}
    fp32_dirs = {}
    for name, hf in (("base", model), ("tuned", merged)):
        windows = LMEval(corpus, hf, 512, 2, 2).windows("validation")
        fp32_dirs[name] = export_lm(hf, work / f"{name}_fp32", 2048, windows, 2).checkpoint
    evaluator = LMEval(corpus, fp32_dirs["base"], 512, 8, 2)
    for name in ("base", "tuned"):
        scores[name] = {"fp32": evaluator.test_perplexity(fp32_dirs[name])}
        for recipe_name, recipe in INT4.items():
            if recipe.adapter == "separate":  # the base weights quantized, the tuned model's update beside them
                if name == "base":
                    continue
                folder = quantize_lm(fp32_dirs["base"], recipe, work / f"{name}_{recipe_name}", [], work / "adapter")
            else:
                folder = quantize_lm(fp32_dirs[name], recipe, work / f"{name}_{recipe_name}", [])
            scores[name][recipe_name] = evaluator.test_perplexity(folder)
        print(f"[bench] {name}: test perplexity " + ", ".join(f"{k} {v:.3f}" for k, v in scores[name].items()))
    base = scores["base"]["fp32"]
    gain = (1 - scores["tuned"]["fp32"] / base) * 100
    kept = {k: (1 - v / base) * 100 / gain if gain > 0 else float("nan") for k, v in scores["tuned"].items()}
    return {
        "ft_ppl_gain_pct": f"{gain:.1f}",
        "ft_int4_keeps_gain": f"{kept['int4_minmax32_lora']:.2f}",  # the fine-tuned config's INT4 candidate
        "ft_cpu_minutes": f"{minutes:.1f}",
        "ft_train_windows": len(data.train),
        "ft_best_epoch": result.best_epoch,
        "base_test_ppl": f"{base:.2f}",
        **{f"ft_{k}_test_ppl": f"{v:.2f}" for k, v in scores["tuned"].items()},
        **{f"base_{k}_test_ppl": f"{v:.2f}" for k, v in scores["base"].items() if k != "fp32"},
        **{f"ft_{k}_keeps_gain": f"{v:.2f}" for k, v in kept.items() if k != "fp32"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=Path("/tmp/lm-ft-bench"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--skip-gain", action="store_true")
    parser.add_argument("--skip-parallel", action="store_true")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--train-windows", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--target", default="attention+mlp")
    args = parser.parse_args()
    project = args.project.resolve()
    model, corpus = example(project)
    describe_corpus(CorpusConfig(window=512, model=model), corpus)
    rows = {} if args.skip_parallel else parallelism(model, corpus, args.steps, args.configs)
    result = {}
    for name, shards in rows.items():  # the worst rank
        if name == "fsdp2":
            result["fsdp2_rank_param_share"] = f"{max(s['params_held'] / s['params_total'] for s in shards):.3f}"
            result["fsdp2_rank_optimizer_share"] = (
                f"{max(s['optimizer_state_held'] / s['optimizer_state_total'] for s in shards):.3f}"
            )
        result[f"{name}_rank_peak_mb"] = f"{max(s['peak_rss_mb'] for s in shards):.0f}"
        result[f"{name}_step_s"] = f"{max(s['step_seconds_median'] for s in shards):.2f}"
    if not args.skip_gain:
        result = quality(model, corpus, project / "finetune", args) | result
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
