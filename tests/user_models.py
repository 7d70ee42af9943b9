"""Modules as a user would write them, named in tests by `model.spec` ("user_models:...")."""

import torch
from torch import nn


class SmallResNet(nn.Module):
    """A user's residual net with BatchNorm, written without any modelforge code."""

    def __init__(self, num_classes, input_shape, width=16):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(input_shape[0], width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.body(x))
        return self.fc(self.pool(x).flatten(1))


def small_resnet(num_classes, input_shape):
    return SmallResNet(num_classes, input_shape)


def wrong_signature(num_classes):
    return nn.Linear(1, num_classes)


def not_a_module(num_classes, input_shape):
    return "a string"


def ten_logits(num_classes, input_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), 10))


def tiny_bert(folder, texts):
    """A user's local Hugging Face checkpoint, tiny and random-initialised: a 2-layer BERT with a
    WordPiece tokenizer over `texts`' words (config.json, model.safetensors, tokenizer.json)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        PreTrainedTokenizerFast,
    )

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # The vocabulary: the texts' words, then their characters (and as word pieces), each sorted. A trained
    # WordPiece vocabulary breaks ties between merges in hash-map order, which differs from process to
    # process: the same "pretrained" embedding rows then meet other tokens, and fine-tuning lands elsewhere.
    words = {w for t in texts for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(t))}
    chars = sorted(set("".join(words)))
    vocab = specials + sorted(words - set(chars)) + chars + [f"##{c}" for c in chars]
    tok.model = models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]")
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)
    torch.manual_seed(0)  # the same "pretrained" weights in every run
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def tiny_vit(folder, image_size=8, channels=1):
    """A user's local Hugging Face image classifier, tiny and random-initialised: a 2-layer ViT on
    4x4 patches (config.json, model.safetensors)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=image_size,
        patch_size=4,
        num_channels=channels,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=2,
    )
    ViTForImageClassification(config).save_pretrained(folder)
    return folder
