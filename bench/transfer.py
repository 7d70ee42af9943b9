"""Bring your own model, measured: transfer learning and compression of non-trivial models, side by
side in one run on ONNX Runtime CPU.

    .venv/bin/python bench/transfer.py [--skip-images] [--skip-text]

Text (`modelforge example docstring_topics`: standard-library docstring sentences labelled by
package, 8 classes, the same hash split for every row below):
- frozen MiniLM: all-MiniLM-L6-v2 sentence embeddings (mean pooled, normalised) and a logistic
  regression tuned by 5-fold CV on train + val: what a user does without fine-tuning;
- text family from scratch: `configs/docstring_topics.yaml` end to end (averaged word embeddings
  searched and trained on the data alone);
- MiniLM fine-tuned: `configs/docstring_minilm.yaml` end to end (a fresh 8-class head on the
  packaged MiniLM, the whole encoder fine-tuned, the schedule searched), with its compressed
  candidates: dynamic INT8, half the attention heads and FFN channels pruned through Torch-Pruning,
  both, and a 3-layer student made of the teacher's own layers 0, 2 and 5, distilled.
Images (`modelforge example digits_png`, 32x32 PNGs): the residual CNN family,
`configs/digits_png.yaml` end to end, with 50% structured pruning through the dependency
graph, static INT8, and both.

Fine-tuned vs each of the other two, paired on the same test texts: McNemar's exact test (how many
texts only one of the two gets right, and the p-value of a gap that size by chance) says whether the
win is clear or within the noise of 632 test texts (one text is 0.16 points).

Accuracy is on each run's test split; size and throughput come from the pipeline's own validation
(ORT CPU, all cores, interleaved timing; batch 32 for the text models, 64 for images). Not a test:
its figures are what it reports.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("modelforge"))


def run_pipeline(project: Path, config: str, example: str, data_dir: str) -> tuple[dict[str, dict], float]:
    """`modelforge example` then `modelforge run` in a project of its own; the candidate table."""
    (project / "configs").mkdir(parents=True)
    shutil.copy(ROOT / "configs" / config, project / "configs" / config)
    subprocess.run([CLI, "example", example, data_dir], cwd=project, check=True, capture_output=True)
    print(f"[bench] {config}: running the pipeline", flush=True)
    started = time.perf_counter()
    proc = subprocess.run([CLI, "run", "--config", f"configs/{config}"], cwd=project, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    table = sorted((project / ".modelforge" / "reports").glob("*/candidates.csv"))
    if not table:  # a run whose gates all failed still writes its table; no table is a real failure
        raise RuntimeError(f"{config}: the pipeline failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    with open(table[-1]) as f:
        rows = {r["candidate"]: r for r in csv.DictReader(f)}
    print(f"[bench] {config}: {seconds:.0f} s, exit {proc.returncode}", flush=True)
    return rows, seconds


def frozen_minilm_right(data_dir: Path) -> np.ndarray:
    """Logistic regression on frozen MiniLM sentence embeddings, on the pipeline's own split: whether
    it classifies each test text right, in the data's order."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV

    from tasks.data.base import read_manifest
    from tasks.data.text import split_texts
    from tasks.encoder.minilm import load_minilm

    texts, labels, split = split_texts(data_dir, read_manifest(data_dir))
    encoder, tokenizer = load_minilm()

    def embed(batch: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(batch), 64):
            enc = tokenizer(batch[i : i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
            with torch.no_grad():
                out.append(encoder(enc["input_ids"], enc["attention_mask"]).numpy())
        return np.concatenate(out)

    fit = [i for i, s in enumerate(split) if s != "test"]
    test = [i for i, s in enumerate(split) if s == "test"]
    print(f"[bench] frozen MiniLM: embedding {len(texts)} texts", flush=True)
    x = embed(texts)
    y = np.array(labels)
    model = GridSearchCV(LogisticRegression(max_iter=5000), {"C": [0.3, 1, 3, 10, 30]}, n_jobs=-1)
    return model.fit(x[fit], y[fit]).predict(x[test]) == y[test]


def baseline_right(project: Path, data_dir: str) -> np.ndarray:
    """Whether the run's FP32 model (its ONNX graph, as validated) classifies each test sample right,
    in the data's order: the same hash split orders every project's test rows alike."""
    from tasks.data import load_splits
    from tasks.onnx.runtime import make_session, predict_logits

    x, y = load_splits(project / data_dir).test
    graph = max((project / ".modelforge" / "candidates").glob("*/baseline/model.onnx"), key=lambda f: f.stat().st_mtime)
    return predict_logits(make_session(graph), x).argmax(1) == y


def paired(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """McNemar's exact test on the same test samples: how many only `a` gets right, how many only `b`,
    and the two-sided p-value that the two are equally accurate (a gap this size by chance)."""
    from scipy.stats import binomtest

    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return only_a, only_b, float(binomtest(only_a, only_a + only_b).pvalue) if only_a + only_b else 1.0


def number(row: dict, key: str) -> float:
    return float(row[key].replace(",", ""))


def ratios(rows: dict[str, dict], base: str = "baseline") -> list[str]:
    b = rows[base]
    lines = []
    for name, r in rows.items():
        lines.append(
            f"{name:<22}{number(r, 'accuracy'):>10.4f}{100 * (number(r, 'accuracy') - number(b, 'accuracy')):>+10.2f}"
            f"{number(r, 'size_kb') / 1024:>10.2f}{number(b, 'size_kb') / number(r, 'size_kb'):>9.2f}x"
            f"{number(r, 'throughput_sps'):>12,.0f}{number(r, 'throughput_sps') / number(b, 'throughput_sps'):>9.2f}x"
            f"{r['passed']:>8}"
        )
    return lines


HEADER = (
    f"{'candidate':<22}{'accuracy':>10}{'drop pts':>10}{'size MB':>10}{'smaller':>10}{'samples/s':>12}"
    f"{'faster':>10}{'gates':>8}"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-text", action="store_true")
    parser.add_argument("--skip-images", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-transfer-"))
    result, report = {}, []
    if not args.skip_text:
        data = "datasets/docstring_topics"
        tuned, tuned_s = run_pipeline(work / "minilm", "docstring_minilm.yaml", "docstring_topics", data)
        scratch, scratch_s = run_pipeline(work / "scratch", "docstring_topics.yaml", "docstring_topics", data)
        fine_right = baseline_right(work / "minilm", data)
        frozen_right, scratch_right = (
            frozen_minilm_right(work / "minilm" / data),
            baseline_right(work / "scratch", data),
        )
        frozen, fine = float(frozen_right.mean()), number(tuned["baseline"], "accuracy")
        tests = {
            name: paired(fine_right, right) for name, right in (("frozen", frozen_right), ("scratch", scratch_right))
        }
        report += [
            "Text classification, docstring_topics (8 packages), test accuracy:",
            f"  frozen MiniLM embeddings + logistic regression  {frozen:.4f}",
            f"  text family trained from scratch (FP32)         {number(scratch['baseline'], 'accuracy'):.4f}"
            f"   ({scratch_s:.0f} s pipeline)",
            f"  MiniLM fine-tuned (FP32)                        {fine:.4f}   ({tuned_s:.0f} s pipeline)",
            f"Paired on the same {len(fine_right)} test texts (McNemar's exact test), fine-tuned vs:",
            *(
                f"  {name:<8} right only by fine-tuning {a:3d}, only by {name} {b:3d}: p = {p:.2g}"
                for name, (a, b, p) in tests.items()
            ),
            "",
            "The fine-tuned MiniLM's candidates (throughput at batch 32):",
            HEADER,
            *ratios(tuned),
            "",
        ]
        int8 = tuned["int8_dynamic"]
        result.update(
            {
                "finetune_vs_frozen_pts": 100 * (fine - frozen),
                "finetune_vs_scratch_pts": 100 * (fine - number(scratch["baseline"], "accuracy")),
                "finetune_vs_frozen_p": tests["frozen"][2],
                "finetune_vs_scratch_p": tests["scratch"][2],
                "minilm_int8_smaller": number(tuned["baseline"], "size_kb") / number(int8, "size_kb"),
                "minilm_int8_throughput_b32": number(int8, "throughput_sps")
                / number(tuned["baseline"], "throughput_sps"),
                "minilm_int8_drop_pts": 100 * (fine - number(int8, "accuracy")),
                "minilm_3_layers_throughput_b32": number(tuned["student_3_layers"], "throughput_sps")
                / number(tuned["baseline"], "throughput_sps"),
                "minilm_3_layers_drop_pts": 100 * (fine - number(tuned["student_3_layers"], "accuracy")),
            }
        )
    if not args.skip_images:
        resnet, resnet_s = run_pipeline(work / "resnet", "digits_png.yaml", "digits_png", "datasets/digits_png")
        report += [
            f"Residual CNN on the 32x32 digits_png folder ({resnet_s:.0f} s pipeline; throughput at batch 64):",
            HEADER,
            *ratios(resnet),
            "",
        ]
        base = resnet["baseline"]
        result.update(
            {
                "resnet_pruned_throughput": number(resnet["structured"], "throughput_sps")
                / number(base, "throughput_sps"),
                "resnet_pruned_drop_pts": 100 * (number(base, "accuracy") - number(resnet["structured"], "accuracy")),
                "resnet_int8_throughput": number(resnet["int8_static"], "throughput_sps")
                / number(base, "throughput_sps"),
            }
        )
    print("\n" + "\n".join(report))
    print("RESULT " + " ".join(f"{k}={v:.4g}" for k, v in result.items()))


if __name__ == "__main__":
    main()
