"""`text`: a seed ensemble of bag-of-words classifiers, each the mean of its words' embeddings
(words randomly dropped while training), then an MLP head; the members' logits are averaged.

Measured on docstring_topics (2076 train texts; test accuracy over 3 seeds, lr 0.015, refit on
train + val): one bag with word dropout 0.7832 median (0.7801-0.8149); four such bags 0.8038
(0.7927-0.8038). Hashed word bigrams in the bag (16384 buckets) and a max-pooled half were worse
on this little data (0.72, 0.73 against 0.75 for one plain bag at lr 0.005)."""

from __future__ import annotations

import torch
from torch import nn

from tasks.models.base import Arch, head

MEMBERS = 4  # independently initialised bags; averaging them narrowed the seed spread from 3.5 to 1.1 points


class TokenBag(nn.Module):
    """Token ids (as floats: every stage and the exported graph take float inputs) -> the mean of
    their word embeddings. Padding (id 0) and words outside the vocabulary (id 1) are left out: no
    train text holds an unknown word when every train word is in the vocabulary, so that embedding
    would be untrained noise at serving time. While training, each word is also left out with
    probability `word_dropout` (no word is dropped at inference, nor in the exported graph)."""

    def __init__(self, vocab: int, dim: int, word_dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.word_dropout = word_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x.long()
        keep = ids > 1
        if self.training and self.word_dropout > 0:
            keep = keep & (torch.rand(keep.shape, device=keep.device) >= self.word_dropout)
        mask = keep.unsqueeze(-1).to(self.embed.weight.dtype)
        return (self.embed(ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class MeanLogits(nn.Module):
    """The members' logits, averaged."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def text_arch(p: dict, num_classes: int, input_shape: tuple[int, ...], vocab: int) -> Arch:
    """Words embedded in `width` dimensions, then `depth - 1` hidden layers; `dropout` also drops words."""
    if vocab < 3:
        raise ValueError("the text family needs a text data set (a vocabulary); this data has none")
    return Arch(
        "text",
        num_classes,
        input_shape,
        (),
        (p["width"],) * (p["depth"] - 1),
        vocab=vocab,
        embed=p["width"],
        **Arch._optional(p),
    )


def build_text(arch: Arch) -> MeanLogits:
    return MeanLogits(
        [nn.Sequential(TokenBag(arch.vocab, arch.embed, arch.dropout), *head(arch.embed, arch)) for _ in range(MEMBERS)]
    )
