"""A tiny random-initialised Llama saved as a Hugging Face folder, built offline in a second or two.

Shared by the causal-LM tests (pipeline and serving): the weights are random, so what it writes is
plausible only as token ids, but every stage (export, quantization, generation, serving) runs for real.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)[:40]]  # a few hundred KB of offline English


def make_tiny_llama(
    folder: Path, *, seed: int = 0, init_std: float = 0.02, tied: bool = False, intermediate_size: int = 128
) -> Path:
    """Write a 2-layer LlamaForCausalLM (hidden 64, 4 heads / 2 KV heads, vocab 512, context 256) with a
    byte-level BPE tokenizer trained here, a chat template and a generation config; returns `folder`.
    `init_std` above the default gives it logits far from flat, which fine-tuning can then sharpen; `tied`
    shares the embedding table with the lm_head, as SmolLM2 does; `intermediate_size` is the MLP's width."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        _corpus(),
        trainers.BpeTrainer(
            vocab_size=512, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    bos = tokenizer.convert_tokens_to_ids("<|im_start|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=tied,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, do_sample=False).save_pretrained(folder)
    # The chat template also in tokenizer_config.json itself, where onnxruntime-genai reads it.
    config_path = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(tokenizer_config, indent=2))
    return folder


def snap_to_q4_1(folder: Path) -> Path:
    """The decoder projections in `folder`'s model.safetensors moved onto llama.cpp's Q4_1 grid (per 32 inputs: an
    fp16 minimum and step, 16 levels), in place: the grid a GGUF's dequantized weights lie on."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    for name, w in weights.items():
        if name.endswith("proj.weight"):  # [out, in]: blocks of 32 along the input
            blocks = w.reshape(w.shape[0], -1, 32)
            low = blocks.min(-1, keepdims=True).astype(np.float16).astype(np.float32)
            step = ((blocks.max(-1, keepdims=True) - low) / 15).astype(np.float16).astype(np.float32)
            weights[name] = (low + np.clip(np.round((blocks - low) / step), 0, 15) * step).reshape(w.shape)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder
