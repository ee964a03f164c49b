"""The encoder stages' bodies: fine-tune (``encoder``) and embed + index (``embed``); their order and
identity: :mod:`shoprank.stages`.

Outputs, under the run:

* ``encoder/ray/`` Ray Train's run (checkpoints every epoch);
* ``encoder/model/`` the final encoder: ``adapter/`` (peft), ``merged/`` (a plain
  model for serving), ``head.pt`` (category head) and ``head.npz`` (the same in numpy, with its categories),
  ``encoder.json``, and
  ``catalogue/`` the catalogue as the training's last evaluation embedded it, with the
  exported weights and with the pretrained model (absent when nothing was trained);
* ``embeddings/products``, ``embeddings/users`` Parquet (id, embedding);
* ``embeddings/zero_shot_products`` Parquet (id, embedding) of the pretrained encoder
  (``encoder.model``, not fine-tuned, nor pre-trained by the ``pretrain`` stage): what variant A
  serves and the evaluation's zero-shot rows read, embedded once instead of at every replica's start.
  Both catalogue tables are the encoder stage's ``catalogue/`` when it covers the
  catalogue, else embedded here by an actor pool;
* ``index/products.faiss`` and ``index/product_ids.parquet`` (FAISS row -> product).
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import torch
from ray.data import ActorPoolStrategy, SaveMode

from shoprank.config import Config
from shoprank.data.io import PartFilenames, pool_takes_every_cpu, read_dataset, read_table, write_table
from shoprank.encoder.index import PRODUCT_EMBEDDINGS, ZERO_SHOT_PRODUCTS, build_index, embedding_table
from shoprank.encoder.model import load_backbone, save_encoder
from shoprank.encoder.objectives import build_model
from shoprank.encoder.runtime import Embedder, Runtime, load_embedder, verdicts
from shoprank.encoder.text import CATEGORY_HEAD, PRETRAINED, fine_tuning_base, product_texts
from shoprank.encoder.train import (
    CATALOGUE, FINE_TUNED, ZERO_SHOT, NothingToLearn, load_checkpoint_state, train_encoder,
)
from shoprank.encoder.users import user_embedding
from shoprank.errors import ShopRankError
from shoprank.store.run import Run, StageRecord

log = logging.getLogger(__name__)


def fine_tune(config: Config, run: Run, record: StageRecord) -> None:
    """Train on Ray Train, then export the best-last checkpoint as adapter + merged model; with nothing to
    learn from, export the pretrained model and say so."""
    try:
        result = train_encoder(config, run)  # raises TrainingFailedError once retries are spent
    except NothingToLearn as reason:
        record.notes.append(f"{reason}: the pretrained encoder is kept as it is")
        record.outputs.pop("ray")  # no training run to keep
        record.metrics["started_from"] = export_checkpoint(config, run, {"model": {}})
        return
    if result.checkpoint is None:
        raise ShopRankError("encoder training finished without a checkpoint")
    with result.checkpoint.as_directory() as checkpoint:
        started_from = export_checkpoint(config, run, load_checkpoint_state(result.checkpoint),
                                         Path(checkpoint) / CATALOGUE)
    record.metrics["started_from"] = started_from
    final = result.metrics
    record.metrics.update(
        {k: v for k, v in final.items() if k.startswith(("validation/", "zero_shot/", "loss/")) or k == "epoch"}
    )
    record.metrics["epochs"] = final.get("history", [])
    if "validation/category_accuracy" not in final:
        record.notes.append("no category accuracy: no product held out of the category loss has a category")
    k = config.encoder.train.eval_k
    if f"validation/ndcg@{k}" not in final:
        record.notes.append("no validation figure: the validation split has no judged query and no shopper with a "
                            "training history who engaged")
        return
    if f"validation/recall@{k}" not in final:
        record.notes.append("validated on the validation shoppers' next engagements (no judged validation queries)")
    record.metrics["ndcg_gain_over_zero_shot"] = round(
        final.get(f"validation/ndcg@{config.encoder.train.eval_k}", 0.0)
        - final.get(f"zero_shot/ndcg@{config.encoder.train.eval_k}", 0.0),
        4,
    )


def export_checkpoint(config: Config, run: Run, state: dict, catalogue: Path | None = None) -> str:
    """Rebuild the trained model from a checkpoint's state and save it for serving, with the checkpoint's
    ``catalogue`` folder (the embeddings of its evaluation) when it has one; what it started from (the run's
    pre-trained backbone, or ``encoder.model``).

    The state is loaded over a fresh base with ``strict=False``: with LoRA it holds only the adapters and the head,
    so the base must be the one training started from (:func:`~shoprank.encoder.text.fine_tuning_base`), or the
    merged model would silently lose the pre-training."""
    base = fine_tuning_base(config, run)
    started_from = run.uri(*PRETRAINED) if config.pretrain.enabled else config.encoder.model
    backbone, tokenizer = load_backbone(base)
    categories = read_table(run, "data", "categories").sort_by("category_label").column("category").to_pylist()
    model = build_model(backbone, config.encoder, len(categories), total_steps=2)
    model.load_state_dict(state["model"], strict=False)
    with run.local_output("encoder", "model") as target:
        save_encoder(model.encoder, tokenizer, target, config.encoder, base=base, started_from=started_from)
        torch.save(model.head.state_dict(), target / "head.pt")
        # the same head in numpy, with its labels' categories: a serving replica in ONNX Runtime fills in a live
        # product's missing category without PyTorch (shoprank.recsys.live.CategoryHead)
        np.savez(target / CATEGORY_HEAD[-1], weight=model.head.weight.detach().float().cpu().numpy(),
                 bias=model.head.bias.detach().float().cpu().numpy(), categories=np.array(categories, dtype=str))
        if catalogue is not None and catalogue.is_dir():
            shutil.copytree(catalogue, target / CATALOGUE)
    return started_from


def batch_runtime(run: Run, name: str, device: str) -> Runtime:
    """How batch embedding runs encoder ``name``: the export's fp32 ONNX graph on a CPU where the export matched
    PyTorch (the same vectors, faster), else PyTorch (on the GPU, or a run without an export)."""
    return "onnx" if device == "cpu" and "onnx" in verdicts(run).get(name, {}).get("offered", []) else "torch"


class EmbedProducts:
    """Ray Data callable class: the encoders are loaded once per actor, then embed batches.

    Each actor fetches the run's model itself, so it works on any node of a cluster
    whose run root is shared storage. ``encoders`` names the ones to embed with
    (:data:`FINE_TUNED`, :data:`ZERO_SHOT`: the pretrained model that ``encoder.model``
    names); each gives a column of that name. Both in one actor cost one actor start and
    one read of the catalogue instead of two, which on a small machine is most of the
    embed stage's time. On a CPU each encoder runs as the export stage's fp32 ONNX graph
    where the export matched PyTorch (:mod:`shoprank.encoder.runtime`), else in PyTorch.
    """

    def __init__(self, run: Run, config: dict, batch_size: int, use_gpu: bool,
                 encoders: tuple[str, ...] = (FINE_TUNED,)) -> None:
        self.config = Config.model_validate(config)
        self.batch_size = batch_size
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.encoders: dict[str, Embedder] = {
            name: load_embedder(self.config, run, zero_shot=name == ZERO_SHOT, device=device,
                                runtime=batch_runtime(run, name, device))
            for name in encoders
        }

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = product_texts(batch, self.config.encoder)
        columns = {"product_id": batch.column("product_id")}
        for name, embedder in self.encoders.items():
            vectors = embedder.embed(texts, self.config.encoder.max_length, batch_size=self.batch_size)
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()),
                                                              vectors.shape[1])
        return pa.table(columns)


def embed_catalogue(config: Config, run: Run, targets: dict[str, tuple[str, ...]], *,
                    embedder: type[EmbedProducts] = EmbedProducts) -> None:
    """Embed the run's catalogue with an actor pool, in one pass, with each encoder that ``targets`` names
    (:data:`FINE_TUNED`, :data:`ZERO_SHOT`), into that encoder's Parquet dataset of the run (product_id,
    embedding, and any column ``embedder`` adds).

    ``embedder`` is the actor class (``benchmarks/embed.py`` passes a subclass that times its calls).
    """
    embed = config.embed
    phased = pool_takes_every_cpu(embed.actors)
    # blocks of a few batches, so every actor gets a share (a small catalogue is one file: one block)
    products = read_dataset(run, "data", "products").repartition(
        target_num_rows_per_block=embed.batch_size * 4)
    if phased:
        products = products.materialize()
    embedded = products.map_batches(
        embedder,
        fn_constructor_args=(run, config.model_dump(mode="json"), embed.batch_size, config.ray.use_gpu,
                             tuple(targets)),
        batch_size=embed.batch_size, compute=ActorPoolStrategy(size=embed.actors), num_gpus=1 if config.ray.use_gpu else 0,
        batch_format="pyarrow",
    )
    if phased or len(targets) > 1:
        embedded = embedded.materialize()  # and embedded once, written once per encoder
    for name, target in targets.items():
        others = [other for other in targets if other != name]
        (embedded.drop_columns(others) if others else embedded).rename_columns({name: "embedding"}).write_parquet(
            run.uri(*target), filename_provider=PartFilenames(), mode=SaveMode.OVERWRITE,
            filesystem=run.filesystem_for_ray,
        )


def embed_and_index(config: Config, run: Run, record: StageRecord) -> None:
    """The catalogue's embeddings (fine-tuned, and pretrained for the zero-shot baseline), the index, and the
    users embedded from their histories.

    The catalogue vectors of the encoder's last evaluation are taken as they are when they cover this
    catalogue; the others are embedded by an actor pool."""
    embed = config.embed
    targets = {FINE_TUNED: PRODUCT_EMBEDDINGS, ZERO_SHOT: ZERO_SHOT_PRODUCTS}
    evaluated = evaluated_catalogue(run)
    for name, table in evaluated.items():
        write_table(run, table, *targets.pop(name))
    if evaluated:
        record.notes.append(f"{' and '.join(evaluated)} catalogue embeddings from the encoder's last evaluation")
    if targets:
        embed_catalogue(config, run, targets)
    table = read_table(run, *PRODUCT_EMBEDDINGS).sort_by("product_id")
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    index = build_index(vectors, embed)
    with run.local_output("index") as index_dir:
        faiss.write_index(index, str(index_dir / "products.faiss"))
    write_table(run, pa.table({"row": np.arange(table.num_rows), "product_id": table.column("product_id")}),
                "index", "product_ids")
    record.rows["products"] = table.num_rows
    record.metrics["index"] = embed.index
    record.metrics["dim"] = int(vectors.shape[1])
    users = embed_users(run, table.column("product_id").to_pylist(), vectors, embed.user_half_life_days)
    write_table(run, users, "embeddings", "users")
    record.rows["users"] = users.num_rows


def evaluated_catalogue(run: Run) -> dict[str, pa.Table]:
    """Encoder name -> (product_id, embedding) of the encoder stage's ``catalogue/`` that holds exactly the
    run's products (each product once)."""
    products = set(read_table(run, "data", "products", columns=["product_id"]).column("product_id").to_pylist())
    found = {}
    for name in (FINE_TUNED, ZERO_SHOT):
        if run.exists("encoder", "model", CATALOGUE, name):
            table = read_table(run, "encoder", "model", CATALOGUE, name)
            ids = table.column("product_id").to_pylist()
            if len(ids) == len(products) and set(ids) == products:
                found[name] = table
    return found


def embed_users(run: Run, product_ids: list[str], vectors: np.ndarray, half_life_days: float) -> pa.Table:
    """Every user with a training history, embedded by :func:`user_embedding`."""
    row_of = {p: i for i, p in enumerate(product_ids)}
    histories = read_table(run, "data", "user_histories").to_pylist()
    ids, out = [], []
    for history in histories:
        keep = [i for i, p in enumerate(history["product_ids"]) if p in row_of]
        if not keep:
            continue
        latest: dt.datetime = max(history["ts"])
        ages = [(latest - history["ts"][i]).total_seconds() / 86_400 for i in keep]
        vector = user_embedding(
            vectors[[row_of[history["product_ids"][i]] for i in keep]],
            [history["event_types"][i] for i in keep], ages, half_life_days,
        )
        if vector is not None:
            ids.append(history["user_id"])
            out.append(vector)
    return embedding_table("user_id", ids, np.stack(out) if out else np.zeros((0, vectors.shape[1]), np.float32))
