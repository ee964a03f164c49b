"""A tiny BERT built in-process: for tests and device checks, no download, seconds.

Two layers, hidden size 32, and a WordPiece tokenizer trained on the given texts;
saved like any Hugging Face model, so it goes through the same loading path
(``encoder.model`` = its directory) as a real pretrained encoder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tiny_encoder(
    texts: list[str], directory: Path, *, hidden_size: int = 32, layers: int = 2, seed: int = 0
) -> Path:
    """Train a tokenizer on ``texts``, initialise a small BERT, save both to ``directory``."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=2000, special_tokens=SPECIAL_TOKENS))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]"))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch.manual_seed(seed)
    model = BertModel(
        BertConfig(
            vocab_size=fast.vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
            num_attention_heads=max(2, hidden_size // 32), intermediate_size=hidden_size * 2,
            max_position_embeddings=128,
        )
    )
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory
