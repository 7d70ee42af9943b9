"""A tiny random-initialised Llama saved as a Hugging Face folder, built offline in about a second.

Shared by the LM pipeline and serving tests (one signature: `make_tiny_llama(folder, *, seed=0)`).
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _train_tokenizer(vocab_size: int):
    """A byte-level BPE trained on a slice of the Python reference manual (offline, in the stdlib)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = [topics[k] for k in sorted(topics)[:40]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def make_tiny_llama(folder: Path, *, seed: int = 0) -> Path:
    """2 layers, hidden 64, 4 heads / 2 KV heads, vocab 512, context 256; safetensors weights, tokenizer
    files with a chat template, and a generation config."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_train_tokenizer(512), bos_token=SPECIAL[1],
                                        eos_token=SPECIAL[2], unk_token=SPECIAL[0], pad_token=SPECIAL[0])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=ids[SPECIAL[1]], eos_token_id=ids[SPECIAL[2]],
                         pad_token_id=ids[SPECIAL[0]], torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    # Random weights at the init's scale give near-uniform logits; wider ones make argmax and KL meaningful.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    model.save_pretrained(folder, safe_serialization=True)
    GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                     pad_token_id=config.pad_token_id, max_new_tokens=32).save_pretrained(folder)
    # transformers writes the template to chat_template.jinja; the contract (and onnxruntime-genai) read it
    # from tokenizer_config.json.
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_template": CHAT_TEMPLATE},
                                                             indent=2))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder
