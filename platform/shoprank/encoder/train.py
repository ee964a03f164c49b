"""Fine-tuning the encoder on Ray Train, and the evaluation every epoch reports.

Objectives (weights from ``encoder.train``):

* **query -> product**: InfoNCE with in-batch negatives plus ``hard_negatives``
  labelled negatives per query (of the grades in ``hard_negative_labels``);
* **product -> product**: symmetric InfoNCE over co-engaged pairs (viewed or bought
  together in a session) and consecutive engagements of one user; for a shop without
  judged or searched queries these pairs are the whole training stream;
* **category**: a linear head on the product embedding; 10% of products (by a hash
  of their id) are held out of this loss and give the category accuracy and macro-F1.

Each epoch reports losses and, on the validation queries, Recall@k, NDCG@k and MRR
of query -> product retrieval against the whole catalogue, and the same figures for
the validation shoppers' next engagements (``next_items/``). The same evaluation of
the pretrained encoder before any training (the zero-shot baseline) is reported
beside it, so every run shows what fine-tuning bought.

The examples and the evaluation live in :mod:`shoprank.encoder.examples`, the
losses and the optimiser in :mod:`shoprank.encoder.objectives` (both free of Ray).
The driver (:func:`train_encoder`) is a plain function that returns Ray's
``Result``; the per-worker loop (:func:`train_loop_per_worker`) lives apart from it.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from shoprank.config import Config, EncoderConfig
from shoprank.data.io import read_table
from shoprank.encoder.examples import EvalData, eval_data, evaluate, training_tables
from shoprank.encoder.index import embedding_matrix, embedding_table
from shoprank.encoder.model import TextEncoder, encode, load_backbone
from shoprank.encoder.objectives import DualEncoderModel, Optimisation, build_model
from shoprank.encoder.runtime import FINE_TUNED, ZERO_SHOT
from shoprank.encoder.text import fine_tuning_base
from shoprank.encoder.tokens import Tokenize
from shoprank.entrypoint import check_gpu, fit
from shoprank.errors import ShopRankError
from shoprank.store.run import Run

log = logging.getLogger(__name__)

PROGRESS_EVERY = 20
"""Training steps between progress lines in the worker's log."""


def build_eval_data(run: Run, config: EncoderConfig, split: str = "validation") -> EvalData:
    """The run's catalogue, ``split``'s judged queries and its shoppers' next engagements."""
    return eval_data(
        read_table(run, "data", "products"), read_table(run, "data", "query_pairs"), config, split,
        events=read_table(run, "data", "events", columns=["user_id", "product_id", "event_type", "ts", "split"]),
        histories=read_table(run, "data", "user_histories"),
    )


def build_training_tables(run: Run, config: EncoderConfig) -> tuple[pa.Table, pa.Table, int]:
    """(query-product rows, product-pair rows, number of categories) of the run, as text."""
    qp, co = training_tables(
        read_table(run, "data", "products"), read_table(run, "data", "query_pairs"),
        read_table(run, "data", "coengagement"), config, read_table(run, "data", "user_histories"),
    )
    return qp, co, read_table(run, "data", "categories").num_rows


# --------------------------------------------------------------------------- checkpoints


def load_checkpoint_state(checkpoint: Checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=False)


CATALOGUE = "catalogue"
"""A checkpoint's folder of the catalogue as rank 0 embedded it to evaluate: with the checkpoint's weights
(``fine_tuned``) and, before training, with the pretrained model (``zero_shot``); Parquet (product_id,
embedding) each. The export keeps it beside the model, and the embed stage takes it instead of embedding the
catalogue a second time with each encoder (a minute of the demo on two cores)."""


def save_catalogue(directory: Path, product_ids: list[str], vectors: dict[str, np.ndarray]) -> None:
    for name, matrix in vectors.items():
        target = directory / CATALOGUE / name
        target.mkdir(parents=True)
        pq.write_table(embedding_table("product_id", product_ids, matrix), target / "part-00000.parquet")


def load_zero_shot_catalogue(checkpoint: Checkpoint, product_ids: list[str]) -> np.ndarray | None:
    """The checkpoint's zero-shot catalogue, when it holds one of exactly these products (a run continued from
    another run's checkpoint may have another catalogue)."""
    with checkpoint.as_directory() as directory:
        path = Path(directory) / CATALOGUE / ZERO_SHOT
        if not path.exists():
            return None
        table = pq.read_table(path)
    if table.column("product_id").to_pylist() != product_ids:
        return None
    return embedding_matrix(table, product_ids)


# --------------------------------------------------------------------------- worker loop


def _batches(shard: Any, batch_size: int, device: torch.device) -> Any:
    return shard.iter_torch_batches(batch_size=batch_size, drop_last=False, device=device)


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """One Ray Train worker: resume if a checkpoint exists, train epochs, report, checkpoint.

    Every report carries the whole per-epoch ``history`` (kept in the checkpoint too),
    because Ray keeps only the metrics of the checkpoints it keeps.
    """
    config = EncoderConfig.model_validate(loop["encoder"])
    train = config.train
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(train.seed + rank)
    torch.set_num_threads(train.cpus_per_worker)  # intra-op threads = the CPUs Ray reserved for this worker
    device = ray.train.torch.get_device()
    # each worker finds the base itself: on a cluster the driver's local copy of the run's pre-trained backbone is
    # not on the worker's node
    base = fine_tuning_base(Config.model_validate(loop["config"]), loop["run"])
    backbone, tokenizer = load_backbone(base)
    steps_per_epoch = max(1, math.ceil(loop["rows"] / (train.batch_size * context.get_world_size())))
    total_steps = max(1, steps_per_epoch * train.epochs // train.gradient_accumulation)
    model = build_model(backbone, config, loop["num_categories"], total_steps)
    data = EvalData(**loop["eval"])
    zero_shot: dict[str, float] = {}
    zero_shot_catalogue: np.ndarray | None = None
    history: list[dict[str, Any]] = []
    start_epoch, global_step = 0, 0
    checkpoint = ray.train.get_checkpoint() or (Checkpoint(loop["resume_from"]) if loop.get("resume_from") else None)
    state = None
    if checkpoint is not None:
        state = load_checkpoint_state(checkpoint)
        model.load_state_dict(state["model"], strict=False)
        start_epoch, global_step, zero_shot = state["epoch"], state["global_step"], state["zero_shot"]
        history = state.get("history", [])
        if rank == 0:
            zero_shot_catalogue = load_zero_shot_catalogue(checkpoint, data.product_ids)
    elif rank == 0:
        model.to(device)
        zero_shot_encoder, zero_shot_tokenizer = _zero_shot_encoder(model, tokenizer, base, config.model, device)
        zero_shot_catalogue = encode(zero_shot_encoder, zero_shot_tokenizer, data.product_texts, config.max_length,
                                     device=device)
        zero_shot = evaluate(zero_shot_encoder, None, zero_shot_tokenizer, data, config.max_length, train.eval_k,
                             device, products=zero_shot_catalogue)
        log.info("zero-shot: %s", zero_shot)
    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    optimisation = Optimisation(ddp_model, train, total_steps)
    if state is not None:
        optimisation.load_state_dict(state)
    use_bf16 = device.type == "cuda"
    for epoch in range(start_epoch, train.epochs):
        started = time.perf_counter()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        steps = samples = 0
        has_queries = loop["has_queries"]
        main = _batches(ray.train.get_dataset_shard("train" if has_queries else "pairs"), train.batch_size, device)
        pair_iter = (
            iter(_batches(ray.train.get_dataset_shard("pairs"), train.batch_size, device))
            if has_queries and loop["has_pairs"] else iter(())
        )
        ddp_model.train()
        for step, batch in enumerate(main):
            if has_queries:
                qp, pairs = batch, next(pair_iter, None) if step % train.coengagement_every == 0 else None
            else:
                qp, pairs = None, batch
            loss, losses = optimisation.step(step, qp, pairs, use_bf16)
            global_step += 1
            steps += 1
            samples += len(next(iter(batch.values())))
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
                counts[name] = counts.get(name, 0) + 1
            if rank == 0 and steps % PROGRESS_EVERY == 0:
                elapsed = time.perf_counter() - started
                log.info(
                    "epoch %d/%d step %d/~%d: loss %.4f, %.1f samples/s",
                    epoch + 1, train.epochs, steps, steps_per_epoch, float(loss),
                    steps * train.batch_size / elapsed,
                )
            if train.fail_at_step is not None and checkpoint is None and global_step == train.fail_at_step:
                raise RuntimeError(f"injected failure at step {global_step} (encoder.train.fail_at_step)")
        metrics: dict[str, Any] = {f"loss/{k}": v / counts[k] for k, v in sums.items()}
        metrics.update(epoch=epoch + 1, global_step=global_step, epoch_s=round(time.perf_counter() - started, 2))
        if context.get_world_size() > 1:
            metrics["workers"] = _what_each_worker_did(model, samples, device)
        with tempfile.TemporaryDirectory() as directory:
            saved = None
            if rank == 0:
                catalogue = _embed_catalogue(model, tokenizer, data, config, device)
                metrics.update(
                    {f"validation/{k}": v for k, v in evaluate(
                        model.encoder, model.head, tokenizer, data, config.max_length, train.eval_k, device,
                        products=catalogue,
                    ).items()}
                )
                history.append(dict(metrics))
                torch.save(
                    {"model": {k: v for k, v in model.state_dict().items() if _saved(k, model)},
                     **optimisation.state_dict(), "epoch": epoch + 1, "global_step": global_step,
                     "zero_shot": zero_shot, "history": history},
                    Path(directory) / "state.pt",
                )
                vectors = {FINE_TUNED: catalogue}
                if zero_shot_catalogue is not None:
                    vectors[ZERO_SHOT] = zero_shot_catalogue
                save_catalogue(Path(directory), data.product_ids, vectors)
                saved = Checkpoint.from_directory(directory)
            metrics.update({f"zero_shot/{k}": v for k, v in zero_shot.items()})
            ray.train.report({**metrics, "history": list(history)}, checkpoint=saved)


def _what_each_worker_did(model: DualEncoderModel, samples: int, device: torch.device) -> list[dict[str, float]]:
    """Per rank: the training samples of its shard this epoch and a checksum of its trainable weights.

    Gathered from every worker (a collective: each calls it at the same point), so a run can show that
    every worker trained on its own share of the data and that DDP kept the replicas' weights the same.
    """
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad)
    mine = torch.tensor([samples, checksum], dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, mine)
    return [{"rank": rank, "samples": int(row[0]), "weights_checksum": float(row[1])}
            for rank, row in enumerate(t.cpu().tolist() for t in gathered)]


def _zero_shot_encoder(model: DualEncoderModel, tokenizer: Any, base: str, zero_shot_model: str,
                       device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The zero-shot baseline's encoder: the model before training (LoRA's adapters start at zero) when it starts
    from ``encoder.model``; ``encoder.model`` itself when it starts from the pre-trained backbone, so the
    zero-shot figures and catalogue stay those of the packaged model that variant A serves, and the gain over
    them includes what pre-training bought."""
    if base == zero_shot_model:
        return model.encoder, tokenizer
    backbone, zero_shot_tokenizer = load_backbone(zero_shot_model)
    return TextEncoder(backbone).to(device), zero_shot_tokenizer


def _embed_catalogue(model: DualEncoderModel, tokenizer: Any, data: EvalData, config: EncoderConfig,
                     device: torch.device) -> np.ndarray:
    return encode(model.encoder, tokenizer, data.product_texts, config.max_length, device=device)


def _saved(name: str, model: DualEncoderModel) -> bool:
    """Keep trainable weights only (adapters and head), unless every weight trains."""
    parameter = dict(model.named_parameters()).get(name)
    return parameter is None or parameter.requires_grad


# --------------------------------------------------------------------------- driver


class NothingToLearn(ShopRankError):
    """The run's data holds no training example for the encoder: the stage keeps the pretrained model."""


def train_encoder(
    config: Config, run: Run, resume_from: str | None = None, *, storage: str | None = None, name: str = "encoder",
    callbacks: list[Any] | None = None,
) -> ray.train.Result:
    """Fine-tune the encoder on the run's training data; returns Ray's ``Result``.

    ``storage`` (default: the run's ``encoder/ray``), ``name`` and ``callbacks`` let a sweep
    train trials beside the run, reporting each epoch to Tune.

    ``resume_from`` continues from a checkpoint directory of an earlier (even finished)
    run, e.g. with more epochs; within a run, restarts after a worker failure resume
    from the latest checkpoint by themselves. Without query-product rows (a shop with no
    judged or searched queries) the product pairs are the training stream; with neither,
    :class:`NothingToLearn` says so (:func:`trainable_rows` tells beforehand).
    """
    encoder_config = config.encoder
    train = encoder_config.train
    check_gpu(config.ray, train.num_workers)
    qp, co, num_categories = build_training_tables(run, encoder_config)
    use_pairs = co.num_rows > 0 and train.coengagement_weight > 0
    if qp.num_rows == 0 and not use_pairs:
        raise NothingToLearn("no query-product rows with label 3 and no product pairs (co-engagement, user "
                             "sequences) to train on")
    fine_tuning_base(config, run)  # a missing pre-trained backbone is refused here, before anything starts
    # the tokenizer is encoder.model's: pre-training keeps its vocabulary (and saves it beside the backbone)
    model_path = encoder_config.model

    def tokenized(table: pa.Table) -> ray.data.Dataset:
        # Materialised before the trainer starts, so tokenizing has released its CPU: on a
        # 2-CPU machine, Ray Data work beside the training worker would starve it.
        # A callable object, not a class: tasks with the tokenizer pickled in, no actor to start.
        return ray.data.from_arrow(table).map_batches(
            Tokenize(model_path, encoder_config.max_length), num_cpus=0.5, batch_format="numpy",
        ).materialize()

    datasets = {"train": tokenized(qp)} if qp.num_rows else {}
    if use_pairs:
        datasets["pairs"] = tokenized(co)
    loop = {
        "encoder": encoder_config.model_dump(mode="json"),
        "config": config.model_dump(mode="json"),
        "run": run,
        "rows": qp.num_rows or co.num_rows,
        "num_categories": num_categories,
        "eval": asdict(build_eval_data(run, encoder_config)),
        "has_queries": "train" in datasets,
        "has_pairs": "pairs" in datasets,
        "resume_from": resume_from,
    }
    return fit_torch(train_loop_per_worker, loop, config, run, name=name, storage=storage or run.uri("encoder", "ray"),
                     workers=train.num_workers, cpus_per_worker=train.cpus_per_worker,
                     max_failures=train.max_failures, keep=2, datasets=datasets, callbacks=callbacks)


def fit_torch(loop_per_worker: Any, loop: dict[str, Any], config: Config, run: Run, *, name: str, storage: str,
              workers: int, cpus_per_worker: int, max_failures: int, keep: int = 1,
              datasets: dict[str, Any] | None = None, callbacks: list[Any] | None = None) -> ray.train.Result:
    """A ``TorchTrainer`` run of the encoder's stages (fine-tuning, pre-training, distillation), fitted: its
    checkpoints in ``storage`` on the run's filesystem (``keep`` of them), retried ``max_failures`` times, on GPUs
    with ``ray.use_gpu``; the one place those stages build a trainer, so they place and retry alike."""
    trainer = TorchTrainer(
        loop_per_worker,
        train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=config.ray.use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(
            name=name, storage_path=storage, storage_filesystem=run.filesystem_for_ray,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep), callbacks=callbacks or [],
        ),
        datasets=datasets or {},
    )
    return fit(trainer, config.ray)
