"""Fine-tuning the encoder on Ray Train, and the evaluation every epoch reports.

Objectives (weights from ``encoder.train``):

* **query -> product**: InfoNCE with in-batch negatives plus ``hard_negatives``
  labelled negatives per query (irrelevant and substitute products of that query);
* **product -> product**: symmetric InfoNCE over co-engaged pairs (viewed or bought
  together in a session);
* **category**: a linear head on the product embedding; 10% of products (by a hash
  of their id) are held out of this loss and give the category accuracy and macro-F1.

Each epoch reports losses and, on the validation queries, Recall@k, NDCG@k and MRR
of query -> product retrieval against the whole catalogue. The same evaluation of
the pretrained encoder before any training (the zero-shot baseline) is reported
beside it, so every run shows what fine-tuning bought.

The driver (:func:`train_encoder`) is a plain function that returns Ray's
``Result``; the per-worker loop (:func:`train_loop_per_worker`) lives apart from it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from sklearn.metrics import f1_score
from torch import nn

from shoprank.config import Config, EncoderConfig
from shoprank.data.io import read_table
from shoprank.encoder.model import QUERY_MAX_LENGTH, TextEncoder, encode, load_backbone, load_tokenizer, product_texts, tokenize
from shoprank.encoder.objectives import DualEncoderModel, build_model
from shoprank.errors import ConfigError
from shoprank.evaluation.metrics import mean_metrics
from shoprank.store.run import Run

log = logging.getLogger(__name__)

CATEGORY_HOLDOUT = 0.1
MAX_POSITIVES_PER_QUERY = 4
PROGRESS_EVERY = 20
"""Training steps between progress lines in the worker's log."""


def _unit(key: str, salt: str) -> float:
    return int.from_bytes(hashlib.blake2b(f"{salt}:{key}".encode(), digest_size=8).digest(), "big") / 2**64


def category_holdout(product_ids: list[str]) -> np.ndarray:
    """True for the products held out of the category loss (stable per id)."""
    return np.array([_unit(p, "category-holdout") < CATEGORY_HOLDOUT for p in product_ids])


# --------------------------------------------------------------------------- data


@dataclass
class EvalData:
    """What rank 0 needs to evaluate: the catalogue, validation queries and their labels."""

    product_ids: list[str]
    product_texts: list[str]
    category_labels: list[int]
    holdout: list[bool]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def build_eval_data(run: Run, config: EncoderConfig, split: str = "validation") -> EvalData:
    products = read_table(run, "data", "products")
    pairs = read_table(run, "data", "query_pairs")
    judged = pairs.filter(pc.and_(pc.equal(pairs.column("split"), split), pc.equal(pairs.column("source"), "judgment")))
    qrels: dict[str, dict[str, int]] = {}
    for query, product, label in zip(
        judged.column("query").to_pylist(), judged.column("product_id").to_pylist(), judged.column("label").to_pylist()
    ):
        qrels.setdefault(query, {})[product] = max(label, qrels.get(query, {}).get(product, 0))
    qrels = {q: rel for q, rel in qrels.items() if any(v > 0 for v in rel.values())}
    ids = products.column("product_id").to_pylist()
    return EvalData(
        product_ids=ids,
        product_texts=product_texts(products, config),
        category_labels=products.column("category_label").to_pylist(),
        holdout=category_holdout(ids).tolist(),
        queries={q: q for q in qrels},
        qrels=qrels,
    )


def build_training_tables(run: Run, config: EncoderConfig) -> tuple[pa.Table, pa.Table, int]:
    """(query-product rows, co-engagement rows, number of categories) as text, ready to tokenize.

    Positives are exact matches (label 3) from judgments and purchases from search
    behaviour, at most four per query; hard negatives are that query's irrelevant
    (0) and substitute (2) judged products, drawn by a seeded generator.
    """
    train = config.train
    rng = np.random.default_rng(train.seed)
    products = read_table(run, "data", "products")
    ids = products.column("product_id").to_pylist()
    text_of = dict(zip(ids, product_texts(products, config)))
    label_of = dict(zip(ids, products.column("category_label").to_pylist()))
    held = dict(zip(ids, category_holdout(ids)))
    pairs = read_table(run, "data", "query_pairs")
    pairs = pairs.filter(pc.equal(pairs.column("split"), "train")).to_pylist()
    positives: dict[str, list[str]] = {}
    negatives: dict[str, list[str]] = {}
    for row in pairs:
        if row["label"] == 3:
            positives.setdefault(row["query"], []).append(row["product_id"])
        elif row["source"] == "judgment" and row["label"] in (0, 2):
            negatives.setdefault(row["query"], []).append(row["product_id"])
    rows: dict[str, list[Any]] = {"query": [], "positive": [], "category": [], "negatives": []}
    for query in sorted(positives):
        chosen = list(dict.fromkeys(positives[query]))
        rng.shuffle(chosen)
        for product in chosen[:MAX_POSITIVES_PER_QUERY]:
            pool = negatives.get(query) or ids
            picks = [pool[int(i)] for i in rng.integers(0, len(pool), train.hard_negatives)]
            rows["query"].append(query)
            rows["positive"].append(text_of[product])
            rows["category"].append(-1 if held[product] else label_of[product])
            rows["negatives"].append([text_of[p] for p in picks])
    order = rng.permutation(len(rows["query"]))
    qp = pa.table({k: [v[i] for i in order] for k, v in rows.items()})
    co = read_table(run, "data", "coengagement").sort_by([("sessions", "descending"), ("product_a", "ascending")])
    co = co.slice(0, train.max_coengagement_pairs)
    co = co.take(pa.array(rng.permutation(co.num_rows)))  # frequent pairs spread over every batch
    coengagement = pa.table(
        {
            "anchor": [text_of[p] for p in co.column("product_a").to_pylist()],
            "other": [text_of[p] for p in co.column("product_b").to_pylist()],
        }
    )
    categories = read_table(run, "data", "categories").num_rows
    return qp, coengagement, categories


class Tokenize:
    """Ray Data callable class: the tokenizer is loaded once per actor, not per batch."""

    def __init__(self, model: str, max_length: int) -> None:
        self.tokenizer = load_tokenizer(model)
        self.max_length = max_length

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if "query" in batch:
            q = tokenize(self.tokenizer, list(batch["query"]), QUERY_MAX_LENGTH)
            p = tokenize(self.tokenizer, list(batch["positive"]), self.max_length)
            negatives = [list(n) for n in batch["negatives"]]
            width = len(negatives[0]) if negatives else 0
            out.update(q_ids=q["input_ids"], q_mask=q["attention_mask"], p_ids=p["input_ids"],
                       p_mask=p["attention_mask"], category=batch["category"].astype(np.int64))
            if width:
                flat = tokenize(self.tokenizer, [t for n in negatives for t in n], self.max_length)
                shape = (len(negatives), width, self.max_length)
                out.update(n_ids=flat["input_ids"].reshape(shape), n_mask=flat["attention_mask"].reshape(shape))
        else:
            a = tokenize(self.tokenizer, list(batch["anchor"]), self.max_length)
            b = tokenize(self.tokenizer, list(batch["other"]), self.max_length)
            out.update(a_ids=a["input_ids"], a_mask=a["attention_mask"], b_ids=b["input_ids"], b_mask=b["attention_mask"])
        return out


# --------------------------------------------------------------------------- checkpoints


def load_checkpoint_state(checkpoint: Checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------- evaluation


def evaluate(
    encoder: TextEncoder, head: nn.Module | None, tokenizer: Any, data: EvalData, max_length: int, k: int,
    device: torch.device | str,
) -> dict[str, float]:
    """Query -> product retrieval over the whole catalogue, and category accuracy / macro-F1."""
    products = encode(encoder, tokenizer, data.product_texts, max_length, device=device)
    query_texts = list(data.queries.values())
    queries = encode(encoder, tokenizer, query_texts, QUERY_MAX_LENGTH, device=device)
    scores = queries @ products.T
    top = np.argsort(-scores, axis=1)[:, :k]
    ranked = {q: [data.product_ids[i] for i in row] for q, row in zip(data.queries, top)}
    metrics = mean_metrics(ranked, data.qrels, k=k)
    if head is not None:
        held = np.flatnonzero(np.array(data.holdout))
        with torch.no_grad():
            logits = head(torch.from_numpy(products[held]).to(device)).float().cpu().numpy()
        predicted = logits.argmax(axis=1)
        truth = np.array(data.category_labels)[held]
        metrics["category_accuracy"] = float((predicted == truth).mean()) if len(held) else 0.0
        metrics["category_macro_f1"] = float(f1_score(truth, predicted, average="macro")) if len(held) else 0.0
    return metrics


# --------------------------------------------------------------------------- worker loop


def _batches(shard: Any, batch_size: int, device: torch.device) -> Any:
    return shard.iter_torch_batches(batch_size=batch_size, drop_last=False, device=device)


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """One Ray Train worker: resume if a checkpoint exists, train epochs, report, checkpoint."""
    config = EncoderConfig.model_validate(loop["encoder"])
    train = config.train
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(train.seed + rank)
    torch.set_num_threads(train.cpus_per_worker)  # intra-op threads = the CPUs Ray reserved for this worker
    device = ray.train.torch.get_device()
    backbone, tokenizer = load_backbone(loop["model_path"])
    steps_per_epoch = max(1, math.ceil(loop["rows"] / (train.batch_size * context.get_world_size())))
    total_steps = max(1, steps_per_epoch * train.epochs // train.gradient_accumulation)
    model = build_model(backbone, config, loop["num_categories"], total_steps)
    eval_data = EvalData(**loop["eval"])
    zero_shot: dict[str, float] = {}
    start_epoch, global_step = 0, 0
    checkpoint = ray.train.get_checkpoint() or (Checkpoint(loop["resume_from"]) if loop.get("resume_from") else None)
    state = None
    if checkpoint is not None:
        state = load_checkpoint_state(checkpoint)
        model.load_state_dict(state["model"], strict=False)
        start_epoch, global_step, zero_shot = state["epoch"], state["global_step"], state["zero_shot"]
    elif rank == 0:
        model.to(device)
        zero_shot = evaluate(model.encoder, None, tokenizer, eval_data, config.max_length, train.eval_k, device)
        log.info("zero-shot: %s", zero_shot)
    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    trainable = [p for p in ddp_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=train.learning_rate, weight_decay=train.weight_decay)
    warmup = int(train.warmup_fraction * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total_steps - s) / max(1, total_steps - warmup)),
    )
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    use_bf16 = device.type == "cuda"
    weights = {"query_product": train.query_product_weight, "coengagement": train.coengagement_weight,
               "category": train.category_weight}
    for epoch in range(start_epoch, train.epochs):
        started = time.perf_counter()
        sums: dict[str, float] = {}
        steps = 0
        pair_iter = (
            iter(_batches(ray.train.get_dataset_shard("pairs"), train.batch_size, device))
            if loop["has_pairs"] else iter(())
        )
        ddp_model.train()
        for step, qp in enumerate(_batches(ray.train.get_dataset_shard("train"), train.batch_size, device)):
            pairs = next(pair_iter, None)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                losses = ddp_model(qp, pairs)
                loss = sum(weights[name] * value for name, value in losses.items())
            (loss / train.gradient_accumulation).backward()
            if (step + 1) % train.gradient_accumulation == 0:
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            global_step += 1
            steps += 1
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            if rank == 0 and steps % PROGRESS_EVERY == 0:
                elapsed = time.perf_counter() - started
                log.info(
                    "epoch %d/%d step %d/~%d: loss %.4f, %.1f samples/s",
                    epoch + 1, train.epochs, steps, steps_per_epoch, float(loss.detach()),
                    steps * train.batch_size / elapsed,
                )
            if train.fail_at_step is not None and checkpoint is None and global_step == train.fail_at_step:
                raise RuntimeError(f"injected failure at step {global_step} (encoder.train.fail_at_step)")
        metrics: dict[str, Any] = {f"loss/{k}": v / max(1, steps) for k, v in sums.items()}
        metrics.update(epoch=epoch + 1, global_step=global_step, epoch_s=round(time.perf_counter() - started, 2))
        metrics.update({f"zero_shot/{k}": v for k, v in zero_shot.items()})
        with tempfile.TemporaryDirectory() as directory:
            saved = None
            if rank == 0:
                metrics.update(
                    {f"validation/{k}": v for k, v in evaluate(
                        model.encoder, model.head, tokenizer, eval_data, config.max_length, train.eval_k, device
                    ).items()}
                )
                torch.save(
                    {"model": {k: v for k, v in model.state_dict().items() if _saved(k, model)},
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "epoch": epoch + 1, "global_step": global_step, "zero_shot": zero_shot},
                    Path(directory) / "state.pt",
                )
                saved = Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=saved)


def _saved(name: str, model: DualEncoderModel) -> bool:
    """Keep trainable weights only (adapters and head), unless every weight trains."""
    parameter = dict(model.named_parameters()).get(name)
    return parameter is None or parameter.requires_grad


# --------------------------------------------------------------------------- driver


def _check_gpu(use_gpu: bool) -> None:
    if use_gpu and ray.cluster_resources().get("GPU", 0) < 1:
        raise ConfigError(
            "ray.use_gpu is true but the Ray cluster has no GPU; set ray.use_gpu=false or add GPU workers"
        )


def train_encoder(config: Config, run: Run, resume_from: str | None = None) -> ray.train.Result:
    """Fine-tune the encoder on the run's training data; returns Ray's ``Result``.

    ``resume_from`` continues from a checkpoint directory of an earlier (even finished)
    run, e.g. with more epochs; within a run, restarts after a worker failure resume
    from the latest checkpoint by themselves.
    """
    encoder_config = config.encoder
    train = encoder_config.train
    _check_gpu(config.ray.use_gpu)
    qp, co, num_categories = build_training_tables(run, encoder_config)
    if qp.num_rows == 0:
        raise ConfigError("no training query-product pairs with label 3 in the run: preprocess a source with judgments")
    model_path = encoder_config.model

    def tokenized(table: pa.Table) -> ray.data.Dataset:
        # Materialised before the trainer starts, so the tokenizer actor has released its
        # CPU: on a 2-CPU machine, an actor pool beside the training worker would starve it.
        return ray.data.from_arrow(table).map_batches(
            Tokenize, fn_constructor_args=(model_path, encoder_config.max_length), concurrency=1,
            num_cpus=0.5, batch_format="numpy",
        ).materialize()

    datasets = {"train": tokenized(qp)}
    if co.num_rows and train.coengagement_weight > 0:
        datasets["pairs"] = tokenized(co)
    loop = {
        "encoder": encoder_config.model_dump(mode="json"),
        "model_path": model_path,
        "rows": qp.num_rows,
        "num_categories": num_categories,
        "eval": asdict(build_eval_data(run, encoder_config)),
        "has_pairs": "pairs" in datasets,
        "resume_from": resume_from,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop,
        scaling_config=ScalingConfig(
            num_workers=train.num_workers, use_gpu=config.ray.use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker},
        ),
        run_config=RunConfig(
            name="encoder",
            storage_path=run.uri("encoder", "ray"),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
    )
    return trainer.fit()
