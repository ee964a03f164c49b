"""The ``pretrain`` stage: masked-language continued pre-training of the encoder's backbone on the shop's own text,
on Ray Train, before the encoder is fine-tuned (optional: ``pretrain.enabled``).

The texts are the catalogue's products exactly as the encoder reads them (:func:`~shoprank.encoder.text.product_texts`
under ``encoder.max_length`` and ``description_chars``) plus, with ``pretrain.include_queries``, the distinct queries
of the training split (the validation and test queries never: the evaluation's text stays unseen by the backbone).
``pretrain.heldout_texts`` of them, chosen by a hash of the text, are held out; the masked-token loss and accuracy
on them, under one fixed masking, are measured before and after training.

The model is ``transformers.AutoModelForMaskedLM`` loaded from ``encoder.model``. The packaged MiniLM is a
sentence-transformers ``BertModel``: it has no masked-token head, so the head's transform (a dense layer and a
LayerNorm) and its output bias start untrained, while its decoder is tied to the word embeddings (the head predicts
a token by its similarity to that token's input embedding). That is why the "before" figures are poor (they measure
an untrained head, not the backbone), and why the rate warms up linearly (``pretrain.warmup_fraction``) before it
moves the whole backbone (22M weights) at ``pretrain.learning_rate``: the untrained head's first gradients reach the
backbone gently. A warm-up with the backbone frozen was not tried: on the demo the stage did not pay at all (docs),
so nothing was left to tune it for.

The decoder's logits are computed for the masked positions only (the 15%): over a 30k-token vocabulary the full
decoder over every position costs about as much as the backbone's own forward and backward pass on a CPU.

Outputs, under the run: ``pretrain/ray/`` (Ray Train's run, a checkpoint every epoch, so a failed worker resumes
there) and ``pretrain/model/``: the backbone (``save_pretrained``, the packaged model's pooler kept as it was: mean
pooling never reads it and the masked-token loss does not train it) with its tokenizer, and ``pretrain.json``
(texts, steps, held-out loss and accuracy before and after, seconds). The encoder stage fine-tunes from that
directory (:func:`~shoprank.encoder.text.fine_tuning_base`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train
import torch
from ray.train import Checkpoint

from shoprank.config import Config, PretrainConfig
from shoprank.data.io import read_table
from shoprank.encoder.text import PRETRAINED, product_texts, resolve_model
from shoprank.encoder.tokens import fast_tokenizer, tokenize
from shoprank.encoder.train import fit_torch
from shoprank.entrypoint import check_gpu
from shoprank.errors import ConfigError, ShopRankError
from shoprank.store.run import Run, StageRecord

log = logging.getLogger(__name__)

PROGRESS_EVERY = 20
"""Training steps between progress lines in the worker's log."""
RECORD = "pretrain.json"


def pretrain_texts(config: Config, run: Run) -> tuple[list[str], list[str], dict[str, int]]:
    """(training texts, held-out texts, counts): the products' texts, then the training split's distinct queries,
    each text once, at most ``pretrain.max_texts`` (kept by a hash of the text, so the same ones every run)."""
    settings = config.pretrain
    texts = product_texts(read_table(run, "data", "products"), config.encoder)
    counts = {"products": len(texts)}
    if settings.include_queries:
        pairs = read_table(run, "data", "query_pairs", columns=["query", "split"])
        queries = pc.unique(pairs.filter(pc.equal(pairs.column("split"), "train")).column("query")).to_pylist()
        counts["queries"] = len(queries)
        texts += sorted(queries)
    unique = sorted({text for text in texts if text.strip()}, key=lambda text: _hash(text, settings.seed))
    kept = unique[: settings.max_texts]
    if len(kept) <= settings.heldout_texts:
        raise ConfigError(f"pretrain.heldout_texts ({settings.heldout_texts}) leaves nothing to train on: the run has "
                          f"{len(kept)} distinct texts (pretrain.max_texts {settings.max_texts})")
    counts.update(distinct=len(unique), kept=len(kept), heldout=settings.heldout_texts)
    return kept[settings.heldout_texts:], kept[: settings.heldout_texts], counts


def _hash(text: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


class TokenizeTexts:
    """Fixed-length token ids of a batch of texts; a Ray Data callable (the tokenizer pickled into its tasks)."""

    def __init__(self, model: str, max_length: int) -> None:
        self.tokenizer = fast_tokenizer(model)
        self.max_length = max_length

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return tokenize(self.tokenizer, list(batch["text"]), self.max_length)


# --------------------------------------------------------------------------- the model


def load_masked_lm(name: str) -> tuple[Any, Any]:
    """``AutoModelForMaskedLM`` and the tokenizer of ``encoder.model`` (its missing head initialised: see the module
    docstring)."""
    from transformers import AutoModelForMaskedLM, logging as hf_logging

    from shoprank.encoder.model import load_tokenizer

    tokenizer = load_tokenizer(name)
    if tokenizer.mask_token is None:
        raise ConfigError(f"encoder.model: {name!r}'s tokenizer has no mask token, so it cannot be pre-trained with "
                          "masked tokens: set pretrain.enabled=false")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head's weights missing from a sentence encoder is expected, said above
    try:
        model = AutoModelForMaskedLM.from_pretrained(resolve_model(name))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"encoder.model: cannot load {name!r} with a masked-token head: {exc}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, tokenizer


class MaskedTokenLoss(torch.nn.Module):
    """The masked-language model with its loss in ``forward``: the decoder runs on the masked positions only (see
    the module docstring), and under DDP the whole computation goes through DDP's forward, so its gradient
    all-reduce sees every step."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.head = model.cls if hasattr(model, "cls") else model.lm_head  # BERT's head, RoBERTa's

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean cross-entropy over the masked positions (``labels`` != -100), their count, the correct ones).
        A batch with no masked token gives 0 with zero gradients, so DDP's workers stay in step."""
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        masked = labels != -100
        logits = self.head(hidden[masked]).float()
        targets = labels[masked]
        count = masked.sum()
        loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum") / count.clamp(min=1)
        return loss, count, (logits.argmax(-1) == targets).sum()


def mask_batch(collator: Any, input_ids: torch.Tensor, special: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked ids, labels) by ``DataCollatorForLanguageModeling`` (80% [MASK], 10% a random token, 10% kept);
    padding and the special tokens are never masked."""
    return collator.torch_mask_tokens(input_ids.clone(), special_tokens_mask=special)


def special_mask(tokenizer: Any, input_ids: torch.Tensor) -> torch.Tensor:
    return torch.isin(input_ids, torch.tensor(tokenizer.all_special_ids, dtype=input_ids.dtype))


@torch.no_grad()
def heldout_figures(model: MaskedTokenLoss, batches: list[dict[str, torch.Tensor]],
                    device: torch.device) -> dict[str, float]:
    """Masked-token loss (per masked token) and top-1 accuracy on the held-out texts' fixed masking."""
    was_training = model.training
    model.eval()
    total = correct = 0
    loss_sum = 0.0
    for batch in batches:
        loss, count, right = model(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                   batch["labels"].to(device))
        loss_sum += float(loss) * int(count)
        correct += int(right)
        total += int(count)
    model.train(was_training)
    return {"loss": round(loss_sum / max(total, 1), 4), "accuracy": round(correct / max(total, 1), 4),
            "masked_tokens": total}


def heldout_batches(tokenizer: Any, texts: list[str], settings: PretrainConfig, max_length: int,
                    batch_size: int = 128) -> list[dict[str, torch.Tensor]]:
    """The held-out texts masked once (seeded), so before and after are measured on the same masked tokens."""
    from transformers import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=settings.mask_probability,
                                               seed=settings.seed)
    batches = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenize(tokenizer, texts[start: start + batch_size], max_length)
        ids, mask = torch.from_numpy(tokens["input_ids"]), torch.from_numpy(tokens["attention_mask"])
        masked, labels = mask_batch(collator, ids, special_mask(tokenizer, ids))
        batches.append({"input_ids": masked, "attention_mask": mask, "labels": labels})
    return batches


# --------------------------------------------------------------------------- worker loop


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """One Ray Train worker: resume from a checkpoint if there is one, train, checkpoint every epoch; rank 0
    measures the held-out texts before training and after every epoch."""
    from transformers import DataCollatorForLanguageModeling, get_linear_schedule_with_warmup

    settings = PretrainConfig.model_validate(loop["pretrain"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(settings.seed + rank)
    torch.set_num_threads(settings.cpus_per_worker)
    device = ray.train.torch.get_device()
    masked_lm, tokenizer = load_masked_lm(loop["model"])
    model = MaskedTokenLoss(masked_lm)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=settings.mask_probability,
                                               seed=settings.seed + 1 + rank)
    steps_per_epoch = max(1, math.ceil(loop["rows"] / (settings.batch_size * world)))
    total_steps = min(steps_per_epoch * settings.epochs, settings.max_steps or steps_per_epoch * settings.epochs)
    heldout = heldout_batches(tokenizer, loop["heldout"], settings, loop["max_length"]) if rank == 0 else []
    model.to(device)
    before: dict[str, float] = {}
    start_epoch, global_step, history = 0, 0, []
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=False)
        masked_lm.load_state_dict(state["model"])
        start_epoch, global_step, before, history = (state["epoch"], state["global_step"], state["before"],
                                                     state["history"])
    elif rank == 0:
        before = heldout_figures(model, heldout, device)
        log.info("pretrain: held-out masked tokens before: %s", before)
    ddp_model = ray.train.torch.prepare_model(model)
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimiser, int(settings.warmup_fraction * total_steps), total_steps)
    if state is not None:
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
    shard = ray.train.get_dataset_shard("train")
    model.train()
    for epoch in range(start_epoch, settings.epochs):
        if global_step >= total_steps:
            break
        started = time.perf_counter()
        losses: list[float] = []
        for batch in shard.iter_torch_batches(batch_size=settings.batch_size, drop_last=False):
            if global_step >= total_steps:
                break
            ids, mask = batch["input_ids"], batch["attention_mask"]
            masked, labels = mask_batch(collator, ids, special_mask(tokenizer, ids))
            loss, _, _ = ddp_model(masked.to(device), mask.to(device), labels.to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            global_step += 1
            losses.append(float(loss.detach()))
            if rank == 0 and global_step % PROGRESS_EVERY == 0:
                log.info("pretrain epoch %d step %d/%d: loss %.4f", epoch + 1, global_step, total_steps, losses[-1])
        metrics: dict[str, Any] = {"epoch": epoch + 1, "global_step": global_step,
                                   "loss/train": round(float(np.mean(losses)), 4) if losses else None,
                                   "epoch_s": round(time.perf_counter() - started, 2)}
        with tempfile.TemporaryDirectory() as directory:
            saved = None
            if rank == 0:
                metrics.update({f"heldout/{k}": v for k, v in heldout_figures(model, heldout, device).items()})
                history.append(dict(metrics))
                torch.save({"model": masked_lm.state_dict(), "optimiser": optimiser.state_dict(),
                            "schedule": schedule.state_dict(), "epoch": epoch + 1, "global_step": global_step,
                            "before": before, "history": history}, Path(directory) / "state.pt")
                saved = Checkpoint.from_directory(directory)
            ray.train.report({**metrics, "before": before, "history": list(history)}, checkpoint=saved)


# --------------------------------------------------------------------------- driver and stage


def train_pretrain(config: Config, run: Run, train: list[str], heldout: list[str]) -> ray.train.Result:
    """Pre-train on Ray Train (``TorchTrainer``) on ``train``, measuring on ``heldout``; Ray's ``Result``."""
    settings = config.pretrain
    check_gpu(config.ray, settings.num_workers)
    model = config.encoder.model
    # tokenised and materialised before the trainer starts: on a 2-CPU machine Ray Data work beside the worker
    # would starve it
    dataset = ray.data.from_arrow(pa.table({"text": train})).map_batches(
        TokenizeTexts(model, config.encoder.max_length), num_cpus=0.5, batch_format="numpy",
    ).materialize()
    return fit_torch(train_loop_per_worker, {"pretrain": settings.model_dump(mode="json"), "model": model,
                                             "rows": len(train), "heldout": heldout,
                                             "max_length": config.encoder.max_length},
                     config, run, name="pretrain", storage=run.uri("pretrain", "ray"), workers=settings.num_workers,
                     cpus_per_worker=settings.cpus_per_worker, max_failures=settings.max_failures,
                     datasets={"train": dataset})


def pretrain(config: Config, run: Run, record: StageRecord) -> None:
    """The stage body: when enabled, pre-train and save the backbone (see the module docstring); when not, write
    nothing and say so."""
    if not config.pretrain.enabled:
        record.outputs.pop("ray")
        record.outputs.pop("model")
        record.notes.append("pretrain.enabled is false: the encoder fine-tunes encoder.model as it is")
        return
    started = time.perf_counter()
    train, heldout, counts = pretrain_texts(config, run)
    result = train_pretrain(config, run, train, heldout)
    if result.checkpoint is None:
        raise ShopRankError("pre-training finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=False)
    save_backbone(config, run, state["model"])
    final = result.metrics
    after = {key.split("/", 1)[1]: value for key, value in final.items() if key.startswith("heldout/")}
    figures = {"texts": counts, "steps": final["global_step"], "epochs": final["epoch"],
               "heldout_before": final["before"], "heldout_after": after,
               "history": final["history"], "seconds": round(time.perf_counter() - started, 1),
               "started_from": config.encoder.model}
    run.write_json(figures, *PRETRAINED, RECORD)
    record.rows.update(texts=len(train), heldout=len(heldout))
    record.metrics.update({key: value for key, value in figures.items() if key != "history"})


def save_backbone(config: Config, run: Run, state: dict[str, torch.Tensor]) -> None:
    """The masked-language model's backbone saved as ``encoder.model``'s own kind of model (a ``BertModel`` for the
    packaged MiniLM): the packaged model with the pre-trained weights loaded over it, so the weights MLM does not
    train (the pooler) stay the packaged ones, and the tokenizer beside it."""
    from shoprank.encoder.model import load_backbone

    masked_lm, _ = load_masked_lm(config.encoder.model)
    masked_lm.load_state_dict(state)
    backbone, tokenizer = load_backbone(config.encoder.model)
    missing, unexpected = backbone.load_state_dict(masked_lm.base_model.state_dict(), strict=False)
    if unexpected or any(not name.startswith("pooler.") for name in missing):
        raise ShopRankError(f"the pre-trained weights do not fit encoder.model's backbone: missing {missing}, "
                            f"unexpected {unexpected}")
    with run.local_output(*PRETRAINED) as target:
        backbone.save_pretrained(target)
        tokenizer.save_pretrained(target)
