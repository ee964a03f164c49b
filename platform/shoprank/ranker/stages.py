"""The ranking stages' bodies: ``features`` and ``ranker`` (their order and identity: :mod:`shoprank.stages`).

Outputs, under the run:

* ``ranker/features/`` Parquet rows (request, candidate, label, features) of the
  three splits, built by Ray Data with the fine-tuned encoder;
* ``ranker/ray/`` Ray Train's run; ``ranker/model/`` the booster and ``ranker.json``.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import ray
from ray.data import ActorPoolStrategy, SaveMode
from ray.train.xgboost import RayTrainReportCallback

from shoprank.config import Config
from shoprank.data.io import PartFilenames, pool_takes_every_cpu
from shoprank.encoder.runtime import load_embedder
from shoprank.encoder.text import QUERY_MAX_LENGTH
from shoprank.ranker.dataset import RequestFeatures, build_requests
from shoprank.ranker.train import read_features, train_ranker, with_positives
from shoprank.recsys.booster import save_ranker
from shoprank.recsys.context import decide_exclusion
from shoprank.store.run import Run, StageRecord

log = logging.getLogger(__name__)

REQUESTS_PER_BATCH = 64


def feature_rows(config: Config, run: Run, requests: pd.DataFrame, *,
                 new_events: pa.Table | None = None) -> ray.data.Dataset:
    """Requests -> candidate rows with features and labels (Ray Data, one context per actor).

    The features stage and an incremental update's rows (``new_events`` join the run's event log) come
    through here.
    """
    queries = requests["query"].dropna().unique().tolist()
    # a list and a matrix, not a dict of vectors: Ray Data prints every value of a dict argument into the
    # dataset's metadata (array2string per query: 9 s for the demo's queries)
    query_vectors = embed_queries(config, run, queries, zero_shot=False)
    actors = feature_actor_count(config)
    # Split in the driver: a repartition task would wait for a CPU beside a pool that holds them all.
    size = REQUESTS_PER_BATCH * 4
    blocks = [requests.iloc[start:start + size] for start in range(0, len(requests), size)] or [requests]
    return ray.data.from_pandas(blocks).map_batches(
        RequestFeatures,
        fn_constructor_args=(config.model_dump(mode="json"), run, queries, query_vectors, new_events),
        compute=ActorPoolStrategy(size=actors), batch_size=REQUESTS_PER_BATCH, batch_format="pandas", num_cpus=1,
    )


def feature_actor_count(config: Config) -> int:
    """``ranker.feature_actors``, or one per CPU the cluster has now (at least one): a cluster's worker nodes
    widen the pool without a config change."""
    return config.ranker.feature_actors or max(1, int(ray.cluster_resources().get("CPU", 1)))


def embed_queries(config: Config, run: Run, queries: list[str], *, zero_shot: bool) -> np.ndarray:
    """The queries embedded (a row each) by the run's fine-tuned encoder (or the pretrained one, ``zero_shot``),
    here, once: the feature actors then load no encoder (about 7 s of CPU per actor for the imports alone),
    and the queries are bounded by ``features.max_requests`` per split."""
    if not queries:
        return np.zeros((0, 0), np.float32)
    return load_embedder(config, run, zero_shot=zero_shot).embed(queries, QUERY_MAX_LENGTH)


def build_features(config: Config, run: Run, record: StageRecord) -> None:
    # before any row: the feature actors' contexts read the decision (ranker/exclusion.json)
    exclusion = decide_exclusion(config, run)
    exclusion.save(run)
    record.metrics["exclude_purchased"] = exclusion.exclude_purchased
    record.metrics["repeat_share"] = exclusion.shares
    record.notes.append(f"policy.exclude.purchased {exclusion.setting}: "
                        f"{'excluded' if exclusion.exclude_purchased else 'kept'}, {exclusion.reason}")
    requests = build_requests(config, run)
    for split, count in requests["split"].value_counts().items():
        record.rows[f"requests_{split}"] = int(count)
    rows = feature_rows(config, run, requests)
    if pool_takes_every_cpu(feature_actor_count(config)):
        rows = rows.materialize()  # written after the actors stop: write tasks beside them would wait for a CPU
    rows.write_parquet(
        run.uri("ranker", "features"), filename_provider=PartFilenames(), mode=SaveMode.OVERWRITE,
        filesystem=run.filesystem_for_ray,
    )
    record.rows["rows"] = pads.dataset(run.path("ranker", "features"), filesystem=run.fs).count_rows()


def fit_ranker(config: Config, run: Run, record: StageRecord, warm_start: str | None = None) -> None:
    train, validation = with_positives(read_features(run, "train")), with_positives(read_features(run, "validation"))
    result = train_ranker(config, train, validation, run.uri("ranker", "ray"), warm_start,
                          storage_filesystem=run.filesystem_for_ray)
    booster = RayTrainReportCallback.get_model(result.checkpoint)
    metrics = {k: v for k, v in result.metrics.items() if "ndcg" in k}
    metrics["num_trees"] = booster.num_boosted_rounds()
    metrics["workers"], metrics["cpus_per_worker"] = result.metrics["workers"], result.metrics["cpus_per_worker"]
    with run.local_output("ranker", "model") as directory:
        save_ranker(booster, directory, metrics)
    record.metrics.update(metrics)
    record.rows.update(train=len(train), validation=len(validation))
