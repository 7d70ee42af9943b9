"""What "quality" means for each kind of model, in one place.

Validation, registration, shipping and promotion are shared by every pipeline; they ask an
evaluator for the model's quality metrics on held-out data, the inputs to time it on, an input
example for the registry signature, and what a serving bundle must say about preprocessing.
An evaluator holds paths only (it travels between Prefect tasks) and loads data on first use.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from tasks.run_onnx import make_session, onnx_accuracy
from tasks.data import load_splits
from tasks.data.docstrings import load_sentences

Inputs = np.ndarray | dict[str, np.ndarray]


class Evaluator(Protocol):
    primary: str  # the quality metric candidates are ranked, plotted and promoted by (higher is better)

    def quality(self, session: ort.InferenceSession) -> dict[str, float]: ...

    def timing_inputs(self) -> Inputs: ...

    def example_inputs(self) -> Inputs: ...

    def serving_info(self) -> dict: ...

    def attach(self, bundle: Path) -> None: ...


@dataclass(frozen=True)
class ClassifierEval:
    """Test-split accuracy of a logits model on the versioned image data."""

    data_dir: Path
    primary: str = "accuracy"

    @cached_property
    def _splits(self):
        return load_splits(self.data_dir)

    def quality(self, session: ort.InferenceSession) -> dict[str, float]:
        return {"accuracy": onnx_accuracy(session, *self._splits.test)}

    def timing_inputs(self) -> np.ndarray:
        return self._splits.test[0]

    def example_inputs(self) -> np.ndarray:
        return self._splits.test[0][:4]

    def serving_info(self) -> dict:
        m = self._splits.manifest
        return {"preprocessing": m["preprocessing"], "input_shape": m["input_shape"],
                "labels": m.get("classes", list(range(m["num_classes"])))}

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
        from tasks.embed_minilm import encode_onnx

        return encode_onnx(session, self._tokenizer, self._sentences.eval, max_length=self.max_length)

    @cached_property
    def _reference(self) -> np.ndarray:
        return self._embed(make_session(self.reference))

    def quality(self, session: ort.InferenceSession) -> dict[str, float]:
        from tasks.embed_minilm import fidelity

        return fidelity(self._reference, self._embed(session), self._sentences.queries)

    def timing_inputs(self) -> dict[str, np.ndarray]:
        """32 held-out sentences padded to `timing_seq_len`: latency and throughput at a known length."""
        from tasks.embed_minilm import tokenize

        return tokenize(self._tokenizer, self._sentences.eval[:32], self.timing_seq_len, pad_to_max=True)

    def example_inputs(self) -> dict[str, np.ndarray]:
        from tasks.embed_minilm import tokenize

        return tokenize(self._tokenizer, self._sentences.eval[:2], self.max_length)

    def serving_info(self) -> dict:
        return {"preprocessing": f"tokenizer/ (WordPiece, lower case), truncation at {self.max_length} tokens; "
                                 "feed input_ids and attention_mask as int64",
                "output": "L2-normalised sentence embedding (mean pooling over unmasked tokens)",
                "tokenizer_dir": "tokenizer", "max_length": self.max_length}

    def attach(self, bundle: Path) -> None:
        shutil.copytree(self.tokenizer_dir, Path(bundle) / "tokenizer")
