"""`text`: the mean of the words' embeddings (a bag of words), then an MLP head."""

from __future__ import annotations

import torch
from torch import nn

from tasks.models.base import Arch, head


class TokenBag(nn.Module):
    """Token ids (as floats: every stage and the exported graph take float inputs) -> the mean of
    their word embeddings. Padding (id 0) and words outside the vocabulary (id 1) are left out: no
    train text holds an unknown word when every train word is in the vocabulary, so that embedding
    would be untrained noise at serving time."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long()
        mask = (ids > 1).unsqueeze(-1).to(self.embed.weight.dtype)
        return (self.embed(ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def text_arch(p: dict, num_classes: int, input_shape: tuple[int, ...], vocab: int) -> Arch:
    """Words embedded in `width` dimensions, then `depth - 1` hidden layers."""
    if vocab < 3:
        raise ValueError("the text family needs a text data set (a vocabulary); this data has none")
    return Arch("text", num_classes, input_shape, (), (p["width"],) * (p["depth"] - 1), vocab=vocab, embed=p["width"],
                **Arch._optional(p))


def build_text(arch: Arch) -> nn.Sequential:
    return nn.Sequential(TokenBag(arch.vocab, arch.embed), *head(arch.embed, arch))
