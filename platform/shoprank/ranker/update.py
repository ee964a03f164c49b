"""Incremental ranker updates: train on the newest events, warm-started from the previous model.

The new events (Parquet, CSV or JSON Lines in the event record format: the event
store's export, or any log) are read and validated like any source, and become
requests (one per session); the oldest 75% by time train, the newest 25% validate.
Features come from the base run's catalogue, encoder and index, with the new events
in the users' histories; product statistics keep the base run's cut-off, so the
features mean what the old model learnt.

The new model continues the old booster (``xgb_model=``: its trees are kept and
new ones added) and is saved as a **new run** named after the base run and the
events' content hash (no timestamps: a rerun finds it). The run is registered
under its own name; the alias (``latest`` by default) moves to it only when its
validation NDCG@10 on the new requests is no worse than the old model's on the
same requests, minus ``ranker.update_tolerance``.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ray.train.xgboost import RayTrainReportCallback

from shoprank.config import Config, TableFile
from shoprank.data.io import read_table
from shoprank.data.readers import read_table as read_records
from shoprank.errors import DataError
from shoprank.privacy import Pseudonyms, pseudonyms
from shoprank.ranker.dataset import sessions_of
from shoprank.ranker.stages import feature_rows
from shoprank.ranker.train import train_ranker, validation_ndcg, with_positives
from shoprank.recsys.booster import load_ranker, save_ranker
from shoprank.store.registry import Registry
from shoprank.stages import run_stage, stage_hash
from shoprank.store.run import Run, StageRecord

log = logging.getLogger(__name__)

VALIDATION_SHARE = 0.25


def read_new_events(path: str, known_products: set[str], users: Pseudonyms) -> tuple[pa.Table, int]:
    """The new events, validated, users pseudonymous as in the base run (an export of the event store already
    is), and how many were left out for naming a product outside the base run's catalogue: one put live since
    (``PUT /products``), which the base model has no features for; the next pipeline run folds the catalogue change
    log in and learns from them."""
    events = users.table(read_records(TableFile(path=path), "events"))
    known = pc.is_in(events.column("product_id"), value_set=pa.array(sorted(known_products), pa.string()))
    kept = events.filter(known)
    return kept.append_column("split", pa.array(["new"] * kept.num_rows, pa.string())), events.num_rows - kept.num_rows


def update_run_name(base: Run, events: pa.Table) -> str:
    digest = hashlib.sha256()
    for column in ("event_id", "user_id", "product_id", "event_type"):
        digest.update("\x1f".join(map(str, events.column(column).to_pylist())).encode())
    return f"{base.name}-update-{digest.hexdigest()[:10]}"


def update_identity(config: Config, base: Run) -> str:
    """The update stage's identity: the same update of a retrained base model, or under other settings of
    the features or the ranker, is trained again, not skipped with the old one's model."""
    base_model = base.manifest()["stages"].get("ranker", {}).get("completed_at", "")
    return hashlib.sha256(f"{stage_hash(config, 'ranker')}:{base_model}".encode()).hexdigest()[:16]


def update_ranker(config: Config, base: Run, events_path: str, alias: str = "latest") -> dict[str, Any]:
    """Train the update, save it as a new run, register it, and move ``alias`` if it is no worse."""
    base_model = base.local_path("ranker", "model")
    old = load_ranker(base_model)
    known = set(read_table(base, "data", "products", columns=["product_id"]).column("product_id").to_pylist())
    events, of_new_products = read_new_events(events_path, known, pseudonyms(config))
    if of_new_products:
        log.info("update: %d events name products put after the base run and are left to the next pipeline run",
                 of_new_products)
    requests = sessions_of(events).sort_values("ts_s").reset_index(drop=True)
    cut = int(len(requests) * (1 - VALIDATION_SHARE))
    requests["split"] = np.where(np.arange(len(requests)) < cut, "train", "validation")
    rows = feature_rows(config, base, requests, new_events=events).to_pandas()
    train, validation = (with_positives(rows[rows["split"] == s]) for s in ("train", "validation"))
    if train.empty or validation.empty:
        raise DataError("too few new sessions with a click, cart or purchase to train and validate an update",
                        file=events_path)
    run = Run(base.root, update_run_name(base, events), filesystem=base.filesystem)

    def train_update(config: Config, run: Run, record: StageRecord) -> None:
        result = train_ranker(config, train, validation, run.uri("ranker", "ray"), warm_start=str(base_model / "model.ubj"),
                              storage_filesystem=run.filesystem_for_ray)
        booster = RayTrainReportCallback.get_model(result.checkpoint)
        metrics = {"validation/ndcg@10": validation_ndcg(booster, validation), "base/validation/ndcg@10": validation_ndcg(old, validation),
                   "num_trees": booster.num_boosted_rounds(), "base_num_trees": old.num_boosted_rounds(),
                   "base_run": base.uri(), "new_events": events.num_rows}
        record.drops["events_of_products_outside_the_base_run"] = of_new_products
        with run.local_output("ranker", "model") as directory:
            save_ranker(booster, directory, metrics)
        metrics["promoted"] = bool(
            metrics["validation/ndcg@10"] >= metrics["base/validation/ndcg@10"] - config.ranker.update_tolerance
        )
        record.metrics.update(metrics)
        record.rows.update(train=len(train), validation=len(validation))

    # the run's name holds the base run's and the events' identity; the stage's, what its rows and training read
    # (the ranker stage's identity: its settings and every upstream stage's) and the base model it starts from
    run_stage(run, config, "ranker-update", update_identity(config, base), ["ranker"], train_update)
    metrics = run.manifest()["stages"]["ranker-update"]["metrics"]
    promoted = metrics["promoted"]
    registry = Registry.beside(base)
    registry.set(run.name, run.uri(), base_run=base.uri(), metrics={k: metrics[k] for k in ("validation/ndcg@10",)})
    if promoted:
        registry.set(alias, run.uri(), base_run=base.uri(), ndcg=metrics["validation/ndcg@10"])
    log.info("update %s: NDCG@10 %.4f (base %.4f): %s", run.name, metrics["validation/ndcg@10"],
             metrics["base/validation/ndcg@10"], f"{alias} moved" if promoted else f"{alias} kept")
    return {"run": run.uri(), **metrics}
