"""`hf`: a local Hugging Face checkpoint fine-tuned for text classification
(`AutoModelForSequenceClassification` with a fresh head sized to the data's classes). `minilm` names
the packaged all-MiniLM-L6-v2, the offline default; anything else is a directory holding
`config.json`, the weights and `tokenizer.json`. Nothing is downloaded.

Like every classifier here the model takes one float tensor: the token ids the data source made
with the checkpoint's own tokenizer, padded to `max_length`. The attention mask is derived inside
the graph (`ids != pad`), so the exported ONNX model, the gates and the server see one input.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from tasks.models.base import Arch

PACKAGED = "minilm"


def resolve_pretrained(name: str) -> Path:
    """The directory of a pretrained name: the packaged MiniLM, or a local folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights ship in packages or folders: never ask a hub
    if name == PACKAGED:
        from tasks.embed_minilm import packaged_model_path

        return Path(packaged_model_path())
    path = Path(name)
    if not path.is_dir():
        raise ValueError(f"pretrained model {name!r} is neither {PACKAGED!r} nor a local folder")
    missing = [f for f in ("config.json", "tokenizer.json") if not (path / f).is_file()]
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        missing.append("weights (*.safetensors)")
    if missing:
        raise ValueError(f"pretrained model folder {path} has no {', '.join(missing)}")
    return path


class HFClassifier(nn.Module):
    """Float token ids [batch, tokens] -> logits, the attention mask computed from the padding id."""

    def __init__(self, hf: nn.Module, pad_id: int):
        super().__init__()
        self.hf, self.pad_id = hf, pad_id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long()
        return self.hf(input_ids=ids, attention_mask=(ids != self.pad_id).long()).logits


def hf_arch(p: dict, num_classes: int, input_shape: tuple[int, ...], vocab: int) -> Arch:
    """Nothing architectural is searched: the search carries the checkpoint's name in its parameters."""
    return Arch("hf", num_classes, input_shape, (), (), spec=p["pretrained"])


def build_hf(arch: Arch) -> HFClassifier:
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "newly initialized: classifier" is the point of a fresh head, not news
    hf_logging.disable_progress_bar()
    # Eager attention: the exported graph keeps attention as plain MatMuls that INT8 quantizes.
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_pretrained(arch.spec), num_labels=arch.num_classes, attn_implementation="eager",
        ignore_mismatched_sizes=True)
    return HFClassifier(model, int(model.config.pad_token_id or 0))
