"""Quality against what users compare with: the model each example pipeline ships vs scikit-learn
baselines trained on the very same split, side by side.

    .venv/bin/python bench/quality.py [--examples digits,digits_png,wine,breast_cancer,docstring_topics] [--seeds 0,1,2]

For every example and seed it makes a throw-away project, writes the example data the way a user
would bring it (`modelforge example`), runs `modelforge run --config configs/<example>.yaml` end to
end (timed) with that seed as `search.seed` and `train.seed`, and evaluates the shipped bundle's ONNX
model on the test split with ONNX Runtime. Per example it reports each run's shipped candidate, the
median and the min-max of their test accuracies, and the worst run against the best baseline: a
quality claim is one that holds across runs, not a lucky seed. On the same
versioned splits (the arrays the pipeline trained on: the table's recorded preprocessing, the
images' recorded normalisation; for text, TF-IDF features of the same split's texts, which suit
these models better than token ids) it fits a tuned SVC, HistGradientBoosting and LogisticRegression
(each tuned by 5-fold cross-validation on train + val, which the pipeline also uses: train to fit,
val to select) and scores them on the same test rows. Not a test: its figures are what it reports.

On cores other jobs also load, run it with OMP_NUM_THREADS=1 (the pipelines inherit it): there, two
torch threads per process took 100 s for an epoch of the text ensemble that one thread trained in 4 s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {  # example -> (config, data folder the config names, `modelforge example` name or None if built in)
    "digits": ("digits.yaml", "data", None),
    "digits_png": ("digits_png.yaml", "datasets/digits_png", "digits_png"),
    "wine": ("wine.yaml", "datasets/wine", "wine"),
    "breast_cancer": ("breast_cancer.yaml", "datasets/breast_cancer", "breast_cancer"),
    "docstring_topics": ("docstring_topics.yaml", "datasets/docstring_topics", "docstring_topics"),
}


def features(data_dir: Path, splits) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, y) of train + val and of test as scikit-learn takes them: the pipeline's own arrays, or
    for text TF-IDF word and bigram features of the same split's texts (fitted on train + val)."""
    flat = lambda x: x.reshape(len(x), -1)
    y_fit, y_test = np.concatenate([splits.train[1], splits.val[1]]), splits.test[1]
    if splits.manifest["dataset"] != "text":
        return flat(np.concatenate([splits.train[0], splits.val[0]])), y_fit, flat(splits.test[0]), y_test
    from sklearn.feature_extraction.text import TfidfVectorizer

    from tasks.data.text import split_texts

    texts, _, split = split_texts(data_dir, splits.manifest)
    fit_texts = [t for t, s in zip(texts, split, strict=True) if s == "train"] + [
        t for t, s in zip(texts, split, strict=True) if s == "val"
    ]
    tfidf = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=5000, sublinear_tf=True).fit(fit_texts)
    return (
        tfidf.transform(fit_texts),
        y_fit,
        tfidf.transform([t for t, s in zip(texts, split, strict=True) if s == "test"]),
        y_test,
    )


def baselines(x, y: np.ndarray, x_test, y_test: np.ndarray) -> dict[str, float]:
    """Test accuracy of scikit-learn models tuned by cross-validation on train + val (`x` may be a
    sparse TF-IDF matrix: SVC and logistic regression take it as is, boosting needs it dense)."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    boosting = HistGradientBoostingClassifier(random_state=0)
    # On thousands of TF-IDF columns one boosting fit takes minutes and the full SVC grid an hour
    # here: boosting keeps its defaults and the SVC searches C only, there.
    wide = x.shape[1] > 500
    svc_grid = (
        {"C": [1, 3, 10, 30], "gamma": ["scale"]}
        if wide
        else {"C": [0.3, 1, 3, 10, 30], "gamma": ["scale", 0.3, 0.1, 0.03, 0.01]}
    )
    models = {
        "svc": GridSearchCV(SVC(), svc_grid, n_jobs=-1),
        "hist_gb": boosting
        if wide
        else GridSearchCV(boosting, {"learning_rate": [0.05, 0.1, 0.2], "max_leaf_nodes": [15, 31]}, n_jobs=-1),
        "logreg": GridSearchCV(LogisticRegression(max_iter=5000), {"C": [0.1, 0.3, 1, 3, 10]}, n_jobs=-1),
    }
    dense = lambda m: m.toarray() if hasattr(m, "toarray") else m
    return {
        name: float(
            model.fit(dense(x) if name == "hist_gb" else x, y).score(
                dense(x_test) if name == "hist_gb" else x_test, y_test
            )
        )
        for name, model in models.items()
    }


def run_pipeline(name: str, project: Path, seed: int) -> dict:
    """One end-to-end run of the example's pipeline with `seed`; its shipped candidate and test accuracy."""
    config, data_dir, example = EXAMPLES[name]
    (project / "configs").mkdir(parents=True)
    shutil.copy(ROOT / "configs" / config, project / "configs" / config)
    cli = [str(Path(sys.executable).with_name("modelforge"))]
    if example:
        subprocess.run([*cli, "example", example, data_dir], cwd=project, check=True, capture_output=True)
    started = time.perf_counter()
    proc = subprocess.run(
        [*cli, "run", "--config", f"configs/{config}", "--set", f"search.seed={seed}", "--set", f"train.seed={seed}"],
        cwd=project,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{name} seed {seed}: the pipeline failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    run = {**shipped_model(name, project), "seconds": seconds}
    print(
        f"[bench] {name} seed {seed}: shipped {run['candidate']} at test accuracy {run['shipped']:.4f} in "
        f"{seconds:.0f} s",
        flush=True,
    )
    return run


def shipped_model(name: str, project: Path) -> dict:
    """The candidate a finished run shipped and its test accuracy on ONNX Runtime."""
    from tasks.config import load_config
    from tasks.data import load_splits
    from tasks.onnx.runtime import make_session, onnx_accuracy

    config, data_dir, _ = EXAMPLES[name]
    bundle = project / load_config(project / "configs" / config).register_.bundle_dir
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {
        "candidate": manifest["candidate"],
        "shipped": onnx_accuracy(make_session(bundle / "model.onnx"), *load_splits(project / data_dir).test),
    }


def run_example(name: str, work: Path, seeds: list[int]) -> dict:
    """Every seed's run, then the baselines once: the split is a hash of the data, the same for every seed."""
    from tasks.data import load_splits

    runs = [run_pipeline(name, work / f"{name}-seed{seed}", seed) for seed in seeds]
    data_dir = work / f"{name}-seed{seeds[0]}" / EXAMPLES[name][1]
    splits = load_splits(data_dir)
    print(f"[bench] {name}: fitting the scikit-learn baselines", flush=True)
    accuracies = [r["shipped"] for r in runs]
    return {
        "runs": runs,
        "median": float(np.median(accuracies)),
        "worst": min(accuracies),
        "best_run": max(accuracies),
        "seconds": float(np.median([r["seconds"] for r in runs])),
        "test_rows": len(splits.test[1]),
        **baselines(*features(data_dir, splits)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", default=",".join(EXAMPLES), help="comma-separated: " + ", ".join(EXAMPLES))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated search and training seeds, one run each")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    header = (
        f"{'example':<18}{'test rows':>10}{'median':>8}{'min-max':>15}{'svc':>8}{'hist_gb':>9}{'logreg':>8}"
        f"{'median vs best':>16}{'worst vs best':>15}{'run s':>7}  shipped per seed"
    )
    rows, gaps = [], {}
    for name in args.examples.split(","):
        r = run_example(name, work, seeds)
        best = max(r["svc"], r["hist_gb"], r["logreg"])
        gaps[name] = (100 * (r["median"] - best), 100 * (r["worst"] - best))
        spread = f"{r['worst']:.4f}-{r['best_run']:.4f}"
        shipped = " ".join(f"{run['candidate']}:{run['shipped']:.4f}" for run in r["runs"])
        rows.append(
            f"{name:<18}{r['test_rows']:>10}{r['median']:>8.4f}{spread:>15}{r['svc']:>8.4f}{r['hist_gb']:>9.4f}"
            f"{r['logreg']:>8.4f}{gaps[name][0]:>+16.2f}{gaps[name][1]:>+15.2f}{r['seconds']:>7.0f}  {shipped}"
        )
        print(rows[-1], flush=True)  # a long run keeps what it measured so far
    print(f"\nseeds {args.seeds}; run s is the median pipeline run\n" + "\n".join([header, *rows]))
    print(
        "RESULT "
        + " ".join(
            f"worst_gap_pts_{name}={worst:+.2f} median_gap_pts_{name}={median:+.2f}"
            for name, (median, worst) in gaps.items()
        )
    )


if __name__ == "__main__":
    main()
