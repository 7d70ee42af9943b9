"""What "quality" means for each kind of model, in one place.

Validation, registration, shipping and promotion are shared by every pipeline; they ask an
evaluator for the model's quality metrics on held-out data, the inputs to time it on, an input
example for the registry signature, and what a serving bundle must say about preprocessing.
An evaluator holds paths only (it travels between Prefect tasks) and loads data on first use.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from tasks.data import SOURCES, load_splits
from tasks.data.base import read_manifest
from tasks.data.docstrings import load_sentences
from tasks.onnx.runtime import make_session, onnx_accuracy, predict_logits
from tasks.release.stats import mcnemar_exact, paired_bootstrap

Inputs = np.ndarray | dict[str, np.ndarray]


class Evaluator(Protocol):
    # read-only properties: the evaluators are frozen dataclasses
    @property
    def primary(
        self,
    ) -> str: ...  # the quality metric candidates are ranked, plotted and promoted by (higher is better)

    @property
    def data_dir(self) -> Path: ...  # the versioned data whose held-out split it measures on

    def quality(self, session: ort.InferenceSession) -> dict[str, float]: ...

    def per_sample(self, session: ort.InferenceSession) -> np.ndarray: ...

    def paired(self, challenger: np.ndarray, champion: np.ndarray) -> dict: ...

    def encoded_as(self, bundle_manifest: dict) -> Evaluator: ...

    def timing_inputs(self) -> Inputs: ...

    def example_inputs(self) -> Inputs: ...

    def serving_info(self) -> dict: ...

    def attach(self, bundle: Path) -> None: ...


def data_task(data_dir: Path) -> dict:
    """The task a model trained on the versioned `data_dir` serves, beside its classes and signature:
    the source, the folder and the split rule (so a champion and a challenger are compared on the
    same test split's lineage, however the data has grown)."""
    manifest = read_manifest(data_dir)
    # a text corpus records its rule and fractions at the top level
    corpus_split = {k: manifest[k] for k in ("split_rule", "validation_fraction", "test_fraction") if k in manifest}
    split = manifest.get("split", corpus_split or None)
    return {"dataset": manifest.get("dataset"), "data_folder": Path(data_dir).name, "split": split}


@dataclass(frozen=True)
class ClassifierEval:
    """Test-split accuracy of a logits model on the versioned image data."""

    data_dir: Path
    primary: str = "accuracy"
    # A bundle's own encoding (its manifest's preprocessing and input_shape), when it differs from the
    # data's current one: a table's categories, a text vocabulary, image statistics move as data grows.
    encoding: dict | None = None

    @cached_property
    def _splits(self):
        if self.encoding is None:
            return load_splits(self.data_dir)
        manifest = read_manifest(self.data_dir)
        return SOURCES[manifest["dataset"]].load(Path(self.data_dir), {**manifest, **self.encoding})

    def encoded_as(self, bundle_manifest: dict) -> ClassifierEval:
        """The same test samples, encoded the way the bundle with `bundle_manifest` was trained to take
        them: a champion is scored on its own preprocessing, not the challenger's."""
        if "preprocessing" not in bundle_manifest or "input_shape" not in bundle_manifest:
            return self
        return replace(self, encoding={k: bundle_manifest[k] for k in ("preprocessing", "input_shape")})

    def quality(self, session: ort.InferenceSession) -> dict[str, float]:
        return {"accuracy": onnx_accuracy(session, *self._splits.test)}

    def per_sample(self, session: ort.InferenceSession) -> np.ndarray:
        """Whether each test sample is classified right."""
        x, y = self._splits.test
        return predict_logits(session, x).argmax(1) == y

    def paired(self, challenger: np.ndarray, champion: np.ndarray) -> dict:
        """Accuracy of both on the same test samples and McNemar's exact test of the difference."""
        return {
            "challenger": float(challenger.mean()),
            "champion": float(champion.mean()),
            "gain_pts": float(challenger.mean() - champion.mean()) * 100,
            "p_value": mcnemar_exact(challenger, champion),
            "test": "McNemar exact",
        }

    def timing_inputs(self) -> np.ndarray:
        return self._splits.test[0]

    def example_inputs(self) -> np.ndarray:
        return self._splits.test[0][:4]

    def serving_info(self) -> dict:
        m = self._splits.manifest
        return {
            "preprocessing": m["preprocessing"],
            "input_shape": m["input_shape"],
            "labels": m.get("classes", list(range(m["num_classes"]))),
        }

    def attach(self, bundle: Path) -> None:
        """A classifier bundle needs nothing beside the model."""


@dataclass(frozen=True)
class EncoderEval:
    """Fidelity of a sentence encoder to the FP32 `reference` model on held-out sentences: mean and
    worst-case per-sentence cosine and top-10 retrieval overlap. The worst case is primary: one
    badly encoded sentence is a wrong search result, however good the mean."""

    data_dir: Path
    reference: Path  # FP32 teacher ONNX
    tokenizer_dir: Path  # saved tokenizer, shipped in the bundle
    max_length: int = 128
    timing_seq_len: int = 128
    primary: str = "cosine_min"

    @cached_property
    def _sentences(self):
        return load_sentences(self.data_dir)

    @cached_property
    def _tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.tokenizer_dir))

    def _embed(self, session: ort.InferenceSession) -> np.ndarray:
        from tasks.encoder.minilm import encode_onnx

        return encode_onnx(session, self._tokenizer, self._sentences.eval, max_length=self.max_length)

    @cached_property
    def _reference(self) -> np.ndarray:
        return self._embed(make_session(self.reference))

    def quality(self, session: ort.InferenceSession) -> dict[str, float]:
        from tasks.encoder.minilm import fidelity

        return fidelity(self._reference, self._embed(session), self._sentences.queries)

    def per_sample(self, session: ort.InferenceSession) -> np.ndarray:
        """Each held-out sentence's cosine to the FP32 reference."""
        from tasks.encoder.minilm import sentence_cosines

        return sentence_cosines(self._reference, self._embed(session))

    def paired(self, challenger: np.ndarray, champion: np.ndarray) -> dict:
        """The mean per-sentence cosine of both on the same sentences and a paired bootstrap interval of
        the difference (sentences resampled together). The mean, not the worst case the gates hold:
        a bootstrap of a minimum collapses onto the few hardest sentences and gives a zero-width
        interval (measured), so it cannot tell a difference from noise."""
        gain, low, high = paired_bootstrap(challenger, champion, np.mean)
        return {
            "metric": "cosine_mean",
            "challenger": float(challenger.mean()),
            "champion": float(champion.mean()),
            "gain_pts": gain * 100,
            "interval_pts": [low * 100, high * 100],
            "test": "paired bootstrap",
        }

    def encoded_as(self, bundle_manifest: dict) -> EncoderEval:
        """Sentences go through the packaged tokenizer for every encoder bundle."""
        return self

    def timing_inputs(self) -> dict[str, np.ndarray]:
        """32 held-out sentences padded to `timing_seq_len`: latency and throughput at a known length."""
        from tasks.encoder.minilm import tokenize

        return tokenize(self._tokenizer, self._sentences.eval[:32], self.timing_seq_len, pad_to_max=True)

    def example_inputs(self) -> dict[str, np.ndarray]:
        from tasks.encoder.minilm import tokenize

        return tokenize(self._tokenizer, self._sentences.eval[:2], self.max_length)

    def serving_info(self) -> dict:
        return {
            "preprocessing": f"tokenizer/ (WordPiece, lower case), truncation at {self.max_length} tokens; "
            "feed input_ids and attention_mask as int64",
            "output": "L2-normalised sentence embedding (mean pooling over unmasked tokens)",
            "tokenizer_dir": "tokenizer",
            "max_length": self.max_length,
        }

    def attach(self, bundle: Path) -> None:
        shutil.copytree(self.tokenizer_dir, Path(bundle) / "tokenizer")
