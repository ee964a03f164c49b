"""Training the XGBoost ranker on Ray Train (``XGBoostTrainer``), and the saved model.

``xgboost-ray`` is not used: its last release (2023) fails with xgboost 3. Ray Train's
own ``XGBoostTrainer`` runs a training function on each worker inside xgboost's
collective (rabit) context; each worker builds a ``DMatrix`` from its Ray Data
shard and calls ``xgboost.train``, which synchronises the trees.

Learning to rank needs each request's candidates together, so the rows are split
among workers by a hash of the request id, one Ray dataset per worker
(``train_0``, ``train_1``, ...; the same for validation), and each worker sorts its
rows by request before building the ``DMatrix`` with ``qid``. Early stopping
watches validation NDCG@10. ``device`` is ``cuda`` when ``ray.use_gpu`` is set.

The saved model (``ranker/model/``) is written and read by :mod:`shoprank.recsys.booster`,
which Serve and the evaluation load without Ray.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import ray
import ray.train
import xgboost
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.xgboost import RayTrainReportCallback, XGBoostTrainer

from shoprank.config import Config
from shoprank.entrypoint import check_gpu, fit
from shoprank.recsys.booster import predict
from shoprank.recsys.features import FEATURES
from shoprank.recsys.metrics import mean_metrics
from shoprank.store.run import Run

REPORT_EVERY = 25


def worker_of(request_ids: pd.Series, workers: int) -> np.ndarray:
    """The worker each request's rows go to (stable hash), so no request is split."""
    return np.array([zlib.crc32(r.encode()) % workers for r in request_ids], dtype=np.int64)


def grouped_matrix(frame: pd.DataFrame) -> xgboost.DMatrix:
    """A ``DMatrix`` with one query group per request, rows sorted by request."""
    frame = frame.sort_values(["request_id", "product_id"], kind="stable")
    qid = pd.factorize(frame["request_id"], sort=True)[0]
    return xgboost.DMatrix(frame[FEATURES].to_numpy(np.float32), label=frame["label"].to_numpy(np.float32),
                           qid=qid, feature_names=FEATURES)


def xgboost_params(config: Config) -> dict[str, Any]:
    ranker = config.ranker
    return {
        "objective": ranker.objective, "eval_metric": ["ndcg@10"], "tree_method": "hist",
        "device": "cuda" if config.ray.use_gpu else "cpu", "max_depth": ranker.max_depth, "eta": ranker.eta,
        "subsample": ranker.subsample, "colsample_bytree": ranker.colsample_bytree,
        "min_child_weight": ranker.min_child_weight, "seed": ranker.seed, "nthread": ranker.cpus_per_worker,
        "lambdarank_pair_method": ranker.pair_method, "lambdarank_num_pair_per_sample": ranker.pairs_per_sample,
    }


class SparseReport(RayTrainReportCallback):
    """Ray Train's XGBoost callback, reporting metrics every ``every`` rounds instead of every round.

    Each report waits for every worker and the controller (about a second on a
    small machine), which would dominate the milliseconds a round takes; the
    final report still carries the metrics and the checkpoint.
    """

    def __init__(self, every: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.every = every

    def after_iteration(self, model: xgboost.Booster, epoch: int, evals_log: dict) -> bool:
        self._evals_log = evals_log
        if (epoch + 1) % self.every == 0:
            self._report_metrics(self._get_report_dict(evals_log))
        return False


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """One XGBoost worker: its whole requests, sorted; early stopping on validation NDCG@10."""
    rank = ray.train.get_context().get_world_rank()
    train = grouped_matrix(ray.train.get_dataset_shard(f"train_{rank}").materialize().to_pandas())
    validation = grouped_matrix(ray.train.get_dataset_shard(f"validation_{rank}").materialize().to_pandas())
    warm_start = xgboost.Booster(model_file=loop["warm_start"]) if loop.get("warm_start") else None
    xgboost.train(
        loop["params"], train, num_boost_round=loop["rounds"], evals=[(train, "train"), (validation, "validation")],
        xgb_model=warm_start, verbose_eval=False,
        callbacks=[
            # first, so the booster is cut back to its best round before the checkpoint is written
            xgboost.callback.EarlyStopping(rounds=loop["early_stopping_rounds"], metric_name="ndcg@10",
                                           data_name="validation", maximize=True, save_best=True),
            SparseReport(loop.get("report_every", REPORT_EVERY), metrics={"validation/ndcg@10": "validation-ndcg@10",
                                                "train/ndcg@10": "train-ndcg@10"}),
        ],
    )


def read_features(run: Run, split: str) -> pd.DataFrame:
    """One split of the feature rows the features stage wrote."""
    dataset = pads.dataset(run.path("ranker", "features"), filesystem=run.fs, format="parquet")
    return dataset.to_table(filter=pc.field("split") == split).to_pandas()


def with_positives(frame: pd.DataFrame) -> pd.DataFrame:
    """Only requests with a relevant candidate: the others carry no ranking signal."""
    positive = frame.groupby("request_id")["label"].transform("max") > 0
    return frame[positive]


def train_ranker(
    config: Config, train: pd.DataFrame, validation: pd.DataFrame, storage: str, warm_start: str | None = None,
    *, name: str = "ranker", callbacks: list[Any] | None = None, report_every: int = REPORT_EVERY,
    storage_filesystem: pafs.FileSystem | None = None,
) -> ray.train.Result:
    """Fit the ranker on feature rows (columns: request_id, product_id, label, FEATURES); Ray's ``Result``.

    ``callbacks`` (Ray Train callbacks, e.g. Tune's ``TuneReportCallback`` in a sweep) see
    every report, which comes every ``report_every`` boosting rounds.
    """
    check_gpu(config.ray)
    ranker = config.ranker
    workers = max(1, min(ranker.num_workers, train["request_id"].nunique(), validation["request_id"].nunique()))
    datasets = {}
    for name, frame in (("train", train), ("validation", validation)):
        columns = frame[["request_id", "product_id", "label", *FEATURES]]
        owner = worker_of(columns["request_id"], workers)
        for i in range(workers):
            datasets[f"{name}_{i}"] = ray.data.from_pandas(columns[owner == i].reset_index(drop=True))
    trainer = XGBoostTrainer(
        train_loop_per_worker,
        train_loop_config={"params": xgboost_params(config), "rounds": ranker.num_boost_round,
                           "early_stopping_rounds": ranker.early_stopping_rounds, "warm_start": warm_start,
                           "report_every": report_every},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=config.ray.use_gpu,
                                     resources_per_worker={"CPU": ranker.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage, storage_filesystem=storage_filesystem, failure_config=FailureConfig(max_failures=1),
                             checkpoint_config=CheckpointConfig(num_to_keep=1), callbacks=callbacks or []),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),  # each worker reads only its own requests
    )
    return fit(trainer, config.ray)


def validation_ndcg(booster: xgboost.Booster, rows: pd.DataFrame, k: int = 10) -> float:
    """Mean NDCG@k of the booster's order over the requests of ``rows`` (labels as relevance)."""
    ranked, qrels = {}, {}
    for request, group in rows.groupby("request_id", sort=False):
        order = np.argsort(-predict(booster, group[FEATURES].to_numpy(np.float32)), kind="stable")
        ranked[request] = group["product_id"].to_numpy()[order].tolist()
        qrels[request] = {p: int(v) for p, v in zip(group["product_id"], group["label"]) if v > 0}
    return mean_metrics(ranked, qrels, k=k)[f"ndcg@{k}"] if qrels else 0.0
