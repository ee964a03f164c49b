"""The ``distil`` stage: a student encoder with fewer layers, distilled from the fine-tuned encoder on Ray Train.

The student is the fine-tuned encoder's merged model (``encoder/model/merged``) with only the layers that
``student.layers`` names (initialised from those layers, ``config.num_hidden_layers`` updated): it starts in the
teacher's embedding space and is trained to stay there, so serving can encode a query (or a live product's text)
with the student against the catalogue index the teacher built. The index and the batch embedding stay the
teacher's: a catalogue is embedded once, offline, where the teacher's six layers cost nothing at query time.

Training data: every product text of the catalogue (as the encoder reads it, :func:`product_texts`) and the distinct
queries of the training split (judged and searched; never a validation or test query, on which the export judges
the student). The teacher's vectors are the targets: the products' are the encoder stage's last evaluation of the
catalogue (what the index holds) when it covers it, the queries' are embedded here once. Each step takes a batch of
products and one of queries (cycled: there are fewer queries than products) and minimises

* ``student.mse_weight`` x the squared distance between the student's and the teacher's unit vectors (per row,
  summed over dimensions: ``2 - 2 cos``; a mean over dimensions would scale the loss down by the width), and
* ``student.ranking_weight`` x KL(teacher || student) of the query -> product similarity softmax over the batch
  (``student.temperature``): the order the teacher gives the batch's products for each query, which is what
  retrieval reads.

Dropout is off while the student trains (the model stays in evaluation mode; gradients flow all the same): the
student starts at the teacher's own layers and its targets are the teacher's deterministic vectors, and dropout
taught it to match them under a noise serving never applies. On the tiny run, trained with dropout, the student
ended further from the teacher, on its own training texts, than the pruned layers were before any training.

Outputs, under the run: ``encoder/distil/`` (Ray Train's run, a checkpoint every epoch, resumed after a worker
failure) and ``encoder/student/`` (the student, ``save_pretrained`` with its tokenizer, and ``student.json``: its
layers, parameters beside the teacher's, each epoch's losses and validation NDCG@k, seconds). Without
``student.enabled`` the stage writes nothing; the export then judges no student.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train
import torch
import torch.nn.functional as F
from ray.train import Checkpoint
from transformers import PreTrainedModel

from shoprank.config import Config, StudentConfig
from shoprank.data.io import read_table
from shoprank.encoder.examples import EvalData
from shoprank.encoder.export import retrieval_ndcg
from shoprank.encoder.index import embedding_matrix
from shoprank.encoder.model import TextEncoder, encode, load_encoder
from shoprank.encoder.runtime import STUDENT
from shoprank.encoder.stages import evaluated_catalogue
from shoprank.encoder.text import QUERY_MAX_LENGTH
from shoprank.encoder.tokens import tokenize
from shoprank.encoder.train import FINE_TUNED, PROGRESS_EVERY, build_eval_data, fit_torch
from shoprank.entrypoint import check_gpu
from shoprank.errors import ConfigError, ShopRankError
from shoprank.store.run import Run, StageRecord

log = logging.getLogger(__name__)

STUDENT_JSON = "student.json"


def layer_stack(backbone: PreTrainedModel, layers: list[int]) -> torch.nn.ModuleList:
    """The transformer layers of ``backbone``, once ``layers`` (``student.layers``) is shown to keep some of them."""
    stack = getattr(getattr(backbone, "encoder", None), "layer", None)
    if not isinstance(stack, torch.nn.ModuleList):
        raise ConfigError(f"student.layers: the fine-tuned encoder ({type(backbone).__name__}) has no BERT-style "
                          "layer list (encoder.layer) to keep layers of")
    if layers[-1] >= len(stack):
        raise ConfigError(f"student.layers {layers}: the fine-tuned encoder has {len(stack)} layers (0 to "
                          f"{len(stack) - 1})")
    if len(layers) == len(stack):
        raise ConfigError(f"student.layers {layers}: keeps every layer of the fine-tuned encoder; a student keeps "
                          "fewer")
    return stack


def prune(backbone: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """``backbone`` with only its transformer ``layers`` (in place), its config saying so: saved, it loads back as a
    model of ``len(layers)`` layers."""
    stack = layer_stack(backbone, layers)
    backbone.encoder.layer = torch.nn.ModuleList([stack[i] for i in layers])
    backbone.config.num_hidden_layers = len(layers)
    return backbone


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def training_queries(run: Run) -> list[str]:
    """The distinct queries of the training split (judged and from the search log), sorted."""
    pairs = read_table(run, "data", "query_pairs", columns=["query", "split"])
    train = pairs.filter(pc.equal(pairs.column("split"), "train")).column("query")
    return sorted(set(train.to_pylist()))


def _tensor_table(tokens: dict[str, np.ndarray], target: np.ndarray) -> pa.Table:
    from ray.data.extensions import ArrowTensorArray

    return pa.table({"ids": ArrowTensorArray.from_numpy(tokens["input_ids"]),
                     "mask": ArrowTensorArray.from_numpy(tokens["attention_mask"]),
                     "target": ArrowTensorArray.from_numpy(target.astype(np.float32))})


def _trimmed(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch cut to its longest text: tokens come padded to a fixed length (fixed shapes batch without copying
    in Ray Data), and a query's padding would otherwise cost as much as a product's text."""
    width = max(1, int(mask.sum(dim=1).max()))
    return ids[:, :width], mask[:, :width]


def distil_loss(student: TextEncoder, products: dict[str, torch.Tensor], queries: dict[str, torch.Tensor],
                config: StudentConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The step's loss (see the module docstring) and its parts."""
    sp = student(*_trimmed(products["ids"], products["mask"]))
    sq = student(*_trimmed(queries["ids"], queries["mask"]))
    tp, tq = products["target"], queries["target"]
    mse = torch.cat([((sp - tp) ** 2).sum(dim=1), ((sq - tq) ** 2).sum(dim=1)]).mean()
    teacher = F.log_softmax(tq @ tp.T / config.temperature, dim=1)
    ranking = F.kl_div(F.log_softmax(sq @ sp.T / config.temperature, dim=1), teacher, log_target=True,
                       reduction="batchmean")
    loss = config.mse_weight * mse + config.ranking_weight * ranking
    return loss, {"mse": float(mse.detach()), "ranking": float(ranking.detach())}


def validation_ndcg(student: TextEncoder, tokenizer: Any, data: EvalData, products: np.ndarray, k: int,
                    device: torch.device) -> float | None:
    """NDCG@k of the student's validation query vectors against the teacher's catalogue vectors (as the index
    holds them); None without judged validation queries."""
    if not data.qrels:
        return None
    found = encode(student, tokenizer, list(data.queries.values()), QUERY_MAX_LENGTH, device=device)
    return retrieval_ndcg(found, products, data, k)


def distil_loop_per_worker(loop: dict[str, Any]) -> None:
    """One Ray Train worker: the pruned teacher, resumed from a checkpoint if there is one, trained ``epochs``
    passes over its shard of the products with the queries cycled beside them; rank 0 checkpoints and reports
    the epoch's losses and validation NDCG@k."""
    config = StudentConfig.model_validate(loop["student"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(loop["seed"] + rank)
    torch.set_num_threads(loop["cpus_per_worker"])
    device = ray.train.torch.get_device()
    teacher, tokenizer = load_encoder(loop["run"].local_path("encoder", "model"))  # fetched on this worker's node
    student = TextEncoder(prune(teacher.backbone, config.layers))
    optimiser = torch.optim.AdamW(student.parameters(), lr=config.learning_rate)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=False)
        student.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        start_epoch, history = state["epoch"], state["history"]
    model = ray.train.torch.prepare_model(student)
    data = EvalData(**loop["eval"])
    catalogue = np.asarray(loop["catalogue"], np.float32)
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        model.eval()  # no dropout: see the module docstring
        sums = {"mse": 0.0, "ranking": 0.0}
        steps = 0
        queries = ray.train.get_dataset_shard("queries")
        query_batches = iter(queries.iter_torch_batches(batch_size=config.batch_size, device=device))
        for products in ray.train.get_dataset_shard("products").iter_torch_batches(
                batch_size=config.batch_size, device=device, local_shuffle_buffer_size=config.batch_size * 8):
            batch = next(query_batches, None)
            if batch is None:  # fewer queries than products: the queries again
                query_batches = iter(queries.iter_torch_batches(batch_size=config.batch_size, device=device))
                batch = next(query_batches)
            loss, parts = distil_loss(model, products, batch, config)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            steps += 1
            for key, value in parts.items():
                sums[key] += value
            if rank == 0 and steps % PROGRESS_EVERY == 0:
                log.info("distil epoch %d/%d step %d: loss %.5f, %.1f products/s", epoch + 1, config.epochs, steps,
                         float(loss), steps * config.batch_size / (time.perf_counter() - started))
        metrics: dict[str, Any] = {"epoch": epoch + 1, "epoch_s": round(time.perf_counter() - started, 2),
                                   **{f"loss/{key}": round(value / max(1, steps), 5) for key, value in sums.items()}}
        with tempfile.TemporaryDirectory() as directory:
            saved = None
            if rank == 0:
                unwrapped = model.module if hasattr(model, "module") else model
                metrics[f"validation/ndcg@{loop['k']}"] = validation_ndcg(unwrapped, tokenizer, data, catalogue,
                                                                          loop["k"], device)
                history.append(dict(metrics))
                torch.save({"model": unwrapped.state_dict(), "optimiser": optimiser.state_dict(),
                            "epoch": epoch + 1, "history": history}, Path(directory) / "state.pt")
                saved = Checkpoint.from_directory(directory)
            ray.train.report({**metrics, "history": list(history)}, checkpoint=saved)


def distil(config: Config, run: Run, record: StageRecord) -> None:
    """The stage body (see the module docstring)."""
    if not config.student.enabled:
        record.notes.append("student.enabled is false: no student")
        record.outputs.clear()
        return
    started = time.perf_counter()
    train = config.encoder.train  # the teacher's training's machine shape: workers, CPUs, retries
    check_gpu(config.ray, train.num_workers)
    teacher_dir = run.local_path("encoder", "model")
    teacher, tokenizer = load_encoder(teacher_dir)
    layer_stack(teacher.backbone, config.student.layers)  # a wrong student.layers fails here, before any work
    teacher_size = {"teacher_layers": teacher.backbone.config.num_hidden_layers,
                    "teacher_parameters": parameters(teacher)}
    data = build_eval_data(run, config.encoder)
    evaluated = evaluated_catalogue(run).get(FINE_TUNED)
    catalogue = (embedding_matrix(evaluated, data.product_ids) if evaluated is not None
                 else encode(teacher, tokenizer, data.product_texts, config.encoder.max_length))
    queries = training_queries(run)
    if not queries:
        raise ShopRankError("student.enabled: the training split has no query to distil the query encoder on")
    # shuffled here, not by Ray Data: a shuffle's tasks would wait for the CPUs the training worker holds on a
    # small machine (the demo's worker takes both cores), and the trainer with them
    queries = [queries[i] for i in np.random.default_rng(train.seed).permutation(len(queries))]
    query_vectors = encode(teacher, tokenizer, queries, QUERY_MAX_LENGTH)
    del teacher
    datasets = {
        "products": ray.data.from_arrow(_tensor_table(
            tokenize(tokenizer, data.product_texts, config.encoder.max_length), catalogue)),
        "queries": ray.data.from_arrow(_tensor_table(tokenize(tokenizer, queries, QUERY_MAX_LENGTH), query_vectors)),
    }
    k = config.encoder.train.eval_k
    loop = {"student": config.student.model_dump(mode="json"), "run": run, "seed": train.seed,
            "cpus_per_worker": train.cpus_per_worker, "eval": asdict(data), "catalogue": catalogue, "k": k}
    result = fit_torch(distil_loop_per_worker, loop, config, run, name="distil", storage=run.uri("encoder", "distil"),
                       workers=train.num_workers, cpus_per_worker=train.cpus_per_worker,
                       max_failures=train.max_failures, datasets=datasets)
    if result.checkpoint is None:
        raise ShopRankError("the student's distillation finished without a checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=False)
    teacher, tokenizer = load_encoder(teacher_dir)
    student = TextEncoder(prune(teacher.backbone, config.student.layers))
    student.load_state_dict(state["model"])
    summary = {"layers": config.student.layers, "num_layers": len(config.student.layers),
               "parameters": parameters(student), **teacher_size,
               "training_products": len(data.product_texts), "training_queries": len(queries),
               "epochs": state["history"], "seconds": round(time.perf_counter() - started, 1)}
    with run.local_output(*STUDENT) as target:
        student.backbone.save_pretrained(target)
        tokenizer.save_pretrained(target)
        (target / STUDENT_JSON).write_text(json.dumps(summary, indent=2))
    log.info("distil: student of layers %s, %d parameters (teacher %d): %s", config.student.layers,
             summary["parameters"], summary["teacher_parameters"], state["history"])
    last = state["history"][-1]
    record.metrics.update({key: summary[key] for key in ("layers", "parameters", "teacher_layers",
                                                         "teacher_parameters")})
    record.metrics.update({key: value for key, value in last.items() if key.startswith(("loss/", "validation/"))})
    record.metrics["epochs"] = state["history"]
