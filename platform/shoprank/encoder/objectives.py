"""The training objectives: one module whose forward computes every loss.

Kept free of Ray so the same code runs in a Ray Train worker, in a plain PyTorch
loop (the benchmark's baseline) and in a GPU check on a machine without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners.adalora import AdaLoraModel
from torch import nn

from shoprank.config import EncoderConfig, EncoderTrainConfig
from shoprank.encoder.model import TextEncoder, apply_finetuning


def trimmed(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns every row of the batch has: same embeddings, less compute.

    Examples are padded to a fixed length so Ray Data batches them without copies;
    a batch of short queries would otherwise pay for the full length.
    """
    length = max(1, int(mask.sum(dim=1).max()))
    return ids[:, :length], mask[:, :length]


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

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(*trimmed(ids, mask))

    def forward(self, qp: dict[str, torch.Tensor] | None, pairs: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Every loss of one step; ``qp`` is None for a shop without judged or searched queries (pairs alone)."""
        losses: dict[str, torch.Tensor] = {}
        if qp is not None:
            q = self.embed(qp["q_ids"], qp["q_mask"])
            p = self.embed(qp["p_ids"], qp["p_mask"])
            candidates = p
            if "n_ids" in qp:
                b, h, length = qp["n_ids"].shape
                n = self.embed(qp["n_ids"].reshape(b * h, length), qp["n_mask"].reshape(b * h, length))
                candidates = torch.cat([p, n])
            losses["query_product"] = info_nce(q, candidates, self.temperature)
            labelled = qp["category"] >= 0
            if labelled.any():
                losses["category"] = F.cross_entropy(self.head(p[labelled]), qp["category"][labelled])
            else:
                losses["category"] = p.sum() * 0.0
        if pairs is not None:
            a = self.embed(pairs["a_ids"], pairs["a_mask"])
            other = self.embed(pairs["b_ids"], pairs["b_mask"])
            losses["coengagement"] = 0.5 * (
                info_nce(a, other, self.temperature) + info_nce(other, a, self.temperature)
            )
        return losses


def build_model(backbone: nn.Module, config: EncoderConfig, num_categories: int, total_steps: int) -> DualEncoderModel:
    """The trainable model: the backbone wrapped for fine-tuning, plus the category head."""
    return DualEncoderModel(
        TextEncoder(apply_finetuning(backbone, config, total_steps)), num_categories, config.train.temperature
    )


def loss_weights(train: EncoderTrainConfig) -> dict[str, float]:
    """Each objective's weight in the total loss, by the names :class:`DualEncoderModel` returns."""
    return {"query_product": train.query_product_weight, "coengagement": train.coengagement_weight,
            "category": train.category_weight}


@dataclass
class Optimisation:
    """AdamW over the trainable weights, linear warm-up then linear decay, gradient accumulation,
    and AdaLoRA's rank budget (``encoder.finetune: adalora``) after every optimiser step.

    One object for the Ray Train worker and the plain loops of the benchmarks, so
    both take exactly the same steps.
    """

    model: nn.Module
    train: EncoderTrainConfig
    total_steps: int

    def __post_init__(self) -> None:
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=self.train.learning_rate, weight_decay=self.train.weight_decay
        )
        warmup = int(self.train.warmup_fraction * self.total_steps)
        total = self.total_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)),
        )
        self.weights = loss_weights(self.train)
        self.adalora = next((m for m in self.model.modules() if isinstance(m, AdaLoraModel)), None)
        """AdaLoRA's model, whose budget moves with the optimiser steps (its own schedule: tinit, tfinal,
        total_step; see :func:`shoprank.encoder.model.apply_finetuning`); None for LoRA and full fine-tuning."""
        self.optimizer_steps = 0

    def step(
        self, step: int, qp: dict[str, torch.Tensor] | None, pairs: dict[str, torch.Tensor] | None, use_bf16: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward one batch; the optimiser steps every ``gradient_accumulation`` batches."""
        batch = qp if qp is not None else pairs
        assert batch is not None, "a step needs query-product rows or product pairs"
        device_type = next(iter(batch.values())).device.type
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=use_bf16):
            losses = self.model(qp, pairs)
            loss = sum(self.weights[name] * value for name, value in losses.items())
        (loss / self.train.gradient_accumulation).backward()
        if (step + 1) % self.train.gradient_accumulation == 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
            self.optimizer.step()
            self.scheduler.step()
            if self.adalora is not None:  # after the step, before zero_grad: it scores ranks by weight x gradient
                self.adalora.update_and_allocate(self.optimizer_steps)
            self.optimizer_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), losses

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.optimizer_steps = state.get("optimizer_steps", self.scheduler.last_epoch)
