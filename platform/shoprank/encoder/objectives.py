"""The training objectives: one module whose forward computes every loss.

Kept free of Ray so the same code runs in a Ray Train worker, in a plain PyTorch
loop (the benchmark's baseline) and in a GPU check on a machine without Ray.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shoprank.config import EncoderConfig
from shoprank.encoder.model import TextEncoder, apply_finetuning


def info_nce(anchors: torch.Tensor, candidates: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of each anchor against all candidates, its own (same index) the right one."""
    logits = anchors @ candidates.T / temperature
    return F.cross_entropy(logits, torch.arange(len(anchors), device=anchors.device))


class DualEncoderModel(nn.Module):
    """The encoder and the category head; one forward computes every loss (one DDP call a step)."""

    def __init__(self, encoder: TextEncoder, num_categories: int, temperature: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.dim, num_categories)
        self.temperature = temperature

    def forward(self, qp: dict[str, torch.Tensor], pairs: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        q = self.encoder(qp["q_ids"], qp["q_mask"])
        p = self.encoder(qp["p_ids"], qp["p_mask"])
        candidates = p
        if "n_ids" in qp:
            b, h, length = qp["n_ids"].shape
            n = self.encoder(qp["n_ids"].reshape(b * h, length), qp["n_mask"].reshape(b * h, length))
            candidates = torch.cat([p, n])
        losses = {"query_product": info_nce(q, candidates, self.temperature)}
        labelled = qp["category"] >= 0
        if labelled.any():
            losses["category"] = F.cross_entropy(self.head(p[labelled]), qp["category"][labelled])
        else:
            losses["category"] = p.sum() * 0.0
        if pairs is not None:
            a = self.encoder(pairs["a_ids"], pairs["a_mask"])
            other = self.encoder(pairs["b_ids"], pairs["b_mask"])
            losses["coengagement"] = 0.5 * (
                info_nce(a, other, self.temperature) + info_nce(other, a, self.temperature)
            )
        return losses


def build_model(backbone: nn.Module, config: EncoderConfig, num_categories: int, total_steps: int) -> DualEncoderModel:
    """The trainable model: the backbone wrapped for fine-tuning, plus the category head."""
    return DualEncoderModel(
        TextEncoder(apply_finetuning(backbone, config, total_steps)), num_categories, config.train.temperature
    )
