"""Training the XGBoost ranker on Ray Train (``XGBoostTrainer``), and the saved model.

``xgboost-ray`` is not used: its last release (2023) fails with xgboost 3. Ray Train's
own ``XGBoostTrainer`` runs a training function on each worker inside xgboost's
collective (rabit) context; each worker builds its matrices from the blocks the driver
handed it and calls ``xgboost.train``, which synchronises the trees.

**Workers** (:func:`worker_layout`): ``ranker.num_workers`` unset, one worker per alive node
that has CPUs, each with that node's CPUs (XGBoost's ``nthread``): on one node one worker with
every CPU, since two XGBoost processes on one machine only add start-up, a second copy of the
data and histogram exchanges to what one process with both threads does. A caller whose
trainings share the cluster (a sweep's concurrent trials) passes the share it may take.

**Data**: learning to rank needs each request's candidates together, so the driver sorts the
rows by request (then product), numbers the requests (``qid``, non-decreasing) and hands each
worker the whole requests a hash of their id gives it, as Arrow blocks of whole requests in
the object store (``train_0``, ``validation_0``, ...: their references; no strings travel).
The worker streams its training blocks into a ``QuantileDMatrix`` (:class:`RequestBatches`, an
``xgboost.DataIter``): no pandas frame, no float copy of the rows, only XGBoost's quantised
matrix; validation is a plain ``DMatrix`` (:func:`plain_matrix`: a quantised one costs every
round more than its copy saves). Early stopping watches validation NDCG@10; the final report
carries both NDCG@10 of the kept model. ``device`` is ``cuda`` when ``ray.use_gpu`` is set.

The saved model (``ranker/model/``) is written and read by :mod:`shoprank.recsys.booster`,
which Serve and the evaluation load without Ray.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import ray
import ray.train
import xgboost
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.xgboost import RayTrainReportCallback, XGBoostTrainer

from shoprank.config import Config
from shoprank.entrypoint import check_gpu, fit
from shoprank.recsys.booster import predict
from shoprank.recsys.features import FEATURES
from shoprank.recsys.metrics import mean_metrics
from shoprank.store.run import Run

REPORT_EVERY = 25
BLOCK_ROWS = 65_536
"""Rows of a block handed to a worker (whole requests, so a little more): the batch the worker's
``QuantileDMatrix`` takes in at a time."""
METRICS = {"validation/ndcg@10": "validation-ndcg@10"}
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


@dataclass(frozen=True)
class WorkerLayout:
    """How many XGBoost workers, and the CPUs (XGBoost's ``nthread``) of each."""

    num_workers: int
    cpus_per_worker: int
    spread: bool = False
    """One worker per node (the auto layout on several nodes)."""

    @property
    def cpus(self) -> int:
        return self.num_workers * self.cpus_per_worker


def node_cpus(use_gpu: bool = False) -> list[int]:
    """The CPUs of each alive node a ranker worker can run on: one with CPUs (and, with ``use_gpu``, a GPU)."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    return [int(r.get("CPU", 0)) for r in nodes if r.get("CPU", 0) >= 1 and (not use_gpu or r.get("GPU", 0) >= 1)]


def worker_layout(config: Config, *, trials: int = 1, nodes: list[int] | None = None) -> WorkerLayout:
    """The ranker's workers: ``ranker.num_workers`` x ``ranker.cpus_per_worker`` when set; else from the cluster.

    Unset (auto): one worker per alive node that has CPUs (``nodes``: their CPU counts, by default
    :func:`node_cpus` of the cluster now), each with the CPUs of the smallest of those nodes (Ray Train gives
    every worker the same resources), placed one per node; on one node, one worker with every CPU of it.
    ``trials`` trainings sharing the cluster (a sweep's concurrent trials) each take their share: a node per
    trial while there are as many nodes, else one worker with the node's CPUs divided among the trials that
    share it. No alive node with CPUs (an autoscaling cluster at zero): one worker of ``ranker.cpus_per_worker``,
    for which the autoscaler starts a node.
    """
    ranker = config.ranker
    if ranker.num_workers is not None:
        return WorkerLayout(ranker.num_workers, ranker.cpus_per_worker)
    nodes = node_cpus(config.ray.use_gpu) if nodes is None else [n for n in nodes if n >= 1]
    if not nodes:
        return WorkerLayout(1, ranker.cpus_per_worker)
    per_node = -(-max(1, trials) // len(nodes))
    if per_node > 1 or len(nodes) == 1:
        return WorkerLayout(1, max(1, min(nodes) // per_node))
    workers = len(nodes) // max(1, trials)
    return WorkerLayout(workers, min(nodes), spread=workers > 1)


def worker_of(request_ids: pd.Series, workers: int) -> np.ndarray:
    """The worker each request's rows go to (stable hash), so no request is split."""
    return np.array([zlib.crc32(r.encode()) % workers for r in request_ids], dtype=np.int64)


def sorted_rows(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The rows sorted by request then product: ``qid`` (the request's rank among the frame's requests, so
    non-decreasing), labels, features (rows x FEATURES, float32), and the request ids (``qid`` indexes them)."""
    qid, requests = pd.factorize(frame["request_id"], sort=True)
    products = pd.factorize(frame["product_id"], sort=True)[0]
    # one int64 key, a stable argsort: lexsort's order, 0.15 s less on a million rows
    order = np.argsort(qid.astype(np.int64) * (int(products.max(initial=0)) + 1) + products, kind="stable")
    features = frame[FEATURES].to_numpy(np.float32)[order]
    return qid[order].astype(np.int64), frame["label"].to_numpy(np.float32)[order], features, np.asarray(requests)


def grouped_matrix(frame: pd.DataFrame) -> xgboost.DMatrix:
    """A ``DMatrix`` with one query group per request, rows sorted by request (then product)."""
    qid, label, features, _ = sorted_rows(frame)
    return xgboost.DMatrix(features, label=label, qid=qid, feature_names=FEATURES)


def request_blocks(qid: np.ndarray, label: np.ndarray, features: np.ndarray,
                   block_rows: int = BLOCK_ROWS) -> list[pa.Table]:
    """Sorted rows as Arrow tables of whole requests, about ``block_rows`` rows each (at least one table): ``qid``,
    ``label`` and ``features`` (a fixed-size list of float32: a block's features are one row-major buffer)."""
    starts = np.flatnonzero(np.r_[True, qid[1:] != qid[:-1]]) if len(qid) else np.zeros(0, np.int64)
    cuts = [0]
    while cuts[-1] < len(qid):
        at = np.searchsorted(starts, cuts[-1] + block_rows)  # the first request starting at or past the target
        cuts.append(int(starts[at]) if at < len(starts) else len(qid))
    bounds = list(zip(cuts[:-1], cuts[1:])) or [(0, 0)]
    width = features.shape[1]
    return [pa.table({"qid": qid[a:b], "label": label[a:b],
                      "features": pa.FixedSizeListArray.from_arrays(pa.array(features[a:b].reshape(-1)), width)})
            for a, b in bounds]


def worker_blocks(frame: pd.DataFrame, workers: int) -> list[list[pa.Table]]:
    """Each worker's blocks (:func:`request_blocks`) of the whole requests :func:`worker_of` gives it."""
    qid, label, features, requests = sorted_rows(frame)
    owner = worker_of(pd.Series(requests), workers)[qid] if workers > 1 else np.zeros(len(qid), np.int64)
    return [request_blocks(qid[mine], label[mine], features[mine])
            for mine in (owner == i for i in range(workers))]


class RequestBatches(xgboost.DataIter):
    """A worker's shard as XGBoost's batches: the Arrow blocks of :func:`request_blocks`, read once from the
    object store (zero-copy) and kept for the passes a ``QuantileDMatrix`` makes over its input.

    A request never spans two batches (XGBoost would take its two parts for two queries): a block is passed on
    once the next one shows that its last request ends in it; should a request continue in the next block
    (blocks cut elsewhere than :func:`request_blocks` cuts them), its rows move to that block.
    """

    def __init__(self, blocks: Iterator[pa.Table]) -> None:
        super().__init__(release_data=True)
        self._source: Iterator[pa.Table] | None = blocks
        self._read: list[pa.Table] = []
        self._at = 0
        self._pending: pa.Table | None = None
        self._empty: pa.Table | None = None

    def reset(self) -> None:
        self._at = 0

    def _next_block(self) -> pa.Table | None:
        if self._at == len(self._read):
            block = self._whole_requests()
            if block is None:
                return None
            self._read.append(block)
        self._at += 1
        return self._read[self._at - 1]

    def _whole_requests(self) -> pa.Table | None:
        """The next block of whole requests from the source; None once it is exhausted."""
        while self._source is not None:
            block = next(self._source, None)
            if block is None:
                self._source = None
                break
            if not block.num_rows:
                self._empty = block
                continue
            pending, self._pending = self._pending, block
            if pending is None:
                continue
            last = pending.column("qid")[-1].as_py()
            if block.column("qid")[0].as_py() != last:
                return pending
            # the request continues in this block: its rows move there
            start = int(np.searchsorted(pending.column("qid").to_numpy(), last, side="left"))
            self._pending = pa.concat_tables([pending.slice(start), block])
            if start:
                return pending.slice(0, start)
        pending, self._pending = self._pending, None
        return pending

    def next(self, input_data: Any) -> bool:
        block = self._next_block()
        if block is None:
            if self._read or self._empty is None:
                return False
            block = self._empty  # a worker without rows still takes part, with one empty batch
            self._read.append(block)
            self._at += 1
        features = block.column("features").combine_chunks()
        input_data(data=features.flatten().to_numpy().reshape(-1, features.type.list_size),
                   label=block.column("label").to_numpy(), qid=block.column("qid").to_numpy(), feature_names=FEATURES)
        return True


def fetched(refs: list[ray.ObjectRef]) -> Iterator[pa.Table]:
    """The blocks behind ``refs``, in order, each read when asked for (zero-copy from the object store)."""
    return (ray.get(ref) for ref in refs)


def quantile_matrix(blocks: Iterator[pa.Table], nthread: int, ref: xgboost.DMatrix | None = None) -> xgboost.QuantileDMatrix:
    """The blocks streamed into XGBoost's quantised matrix (no float copy): the training matrix."""
    return xgboost.QuantileDMatrix(RequestBatches(blocks), nthread=nthread, ref=ref)


def plain_matrix(blocks: Iterator[pa.Table], nthread: int) -> xgboost.DMatrix:
    """The blocks as one ``DMatrix``: the validation matrix. A ``QuantileDMatrix`` there doubled the rounds'
    time (XGBoost predicts a quantised evaluation set anew every round; 200,000 training and 300,000 validation
    rows, 50 rounds: 4.4 s against 2.0 s), for a copy of the validation rows only."""
    table = pa.concat_tables(list(blocks))
    features = table.column("features").combine_chunks()
    return xgboost.DMatrix(features.flatten().to_numpy().reshape(-1, features.type.list_size),
                           label=table.column("label").to_numpy(), qid=table.column("qid").to_numpy(),
                           feature_names=FEATURES, nthread=nthread)


def xgboost_params(config: Config, layout: WorkerLayout | None = None) -> dict[str, Any]:
    ranker = config.ranker
    return {
        "objective": ranker.objective, "eval_metric": ["ndcg@10"], "tree_method": "hist",
        "device": "cuda" if config.ray.use_gpu else "cpu", "max_depth": ranker.max_depth, "eta": ranker.eta,
        "subsample": ranker.subsample, "colsample_bytree": ranker.colsample_bytree,
        "min_child_weight": ranker.min_child_weight, "seed": ranker.seed,
        "nthread": (layout or worker_layout(config)).cpus_per_worker,
        "lambdarank_pair_method": ranker.pair_method, "lambdarank_num_pair_per_sample": ranker.pairs_per_sample,
    }


def kept_metrics(booster: xgboost.Booster, evals: list[tuple[xgboost.DMatrix, str]]) -> dict[str, float]:
    """NDCG@10 of the booster (the kept model) on each of ``evals``, as ``<name>/ndcg@10``; across every worker
    when called inside the collective."""
    text = booster.eval_set(evals)
    return {f"{name}/ndcg@10": float(text.split(f"{name}-ndcg@10:")[1].split()[0]) for _, name in evals}


class SparseReport(RayTrainReportCallback):
    """Ray Train's XGBoost callback, reporting metrics every ``every`` rounds instead of every round, and at the
    end the NDCG@10 of the model it checkpoints.

    Each report waits for every worker and the controller, which would dominate the milliseconds a round
    takes. The last report describes the kept model (after early stopping cut it back to its best round):
    validation and training NDCG@10, evaluated once here (0.3 s on the demo's million rows) rather than training
    NDCG every round (0.9 s of 14.5 over 100 rounds there).
    """

    def __init__(self, every: int, evals: list[tuple[xgboost.DMatrix, str]] | None = None,
                 times: dict[str, float] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.every = every
        self.evals = evals or []
        self.times = times or {}
        self.started = time.time()

    def after_iteration(self, model: xgboost.Booster, epoch: int, evals_log: dict) -> bool:
        self._evals_log = evals_log
        if self.every and (epoch + 1) % self.every == 0:
            self._report_metrics(self._get_report_dict(evals_log))
        return False

    def after_training(self, model: xgboost.Booster) -> xgboost.Booster:
        report = self._get_report_dict(self._evals_log) if self._evals_log else {}
        if self.evals:
            report.update(kept_metrics(model, self.evals))
        report.update(self.times, **{"time/train_s": time.time() - self.started})
        self._save_and_report_checkpoint(report, model)
        return model


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """One XGBoost worker: its whole requests, training as ``QuantileDMatrix`` and validation as ``DMatrix``;
    early stopping on validation NDCG@10."""
    started = time.time()
    rank = ray.train.get_context().get_world_rank()
    nthread = loop["params"]["nthread"]
    train = quantile_matrix(fetched(loop["blocks"][f"train_{rank}"]), nthread)
    validation = plain_matrix(fetched(loop["blocks"][f"validation_{rank}"]), nthread)
    loaded = time.time()
    warm_start = xgboost.Booster(model_file=loop["warm_start"]) if loop.get("warm_start") else None
    report = SparseReport(loop.get("report_every", REPORT_EVERY), evals=[(train, "train"), (validation, "validation")],
                          times={"time/worker_started": started, "time/data_s": loaded - started,
                                 "workers": ray.train.get_context().get_world_size(), "cpus_per_worker": nthread},
                          metrics=METRICS)
    xgboost.train(
        loop["params"], train, num_boost_round=loop["rounds"], evals=[(validation, "validation")],
        xgb_model=warm_start, verbose_eval=False,
        callbacks=[
            # first, so the booster is cut back to its best round before the checkpoint is written
            xgboost.callback.EarlyStopping(rounds=loop["early_stopping_rounds"], metric_name="ndcg@10",
                                           data_name="validation", maximize=True, save_best=True),
            report,
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
    storage_filesystem: pafs.FileSystem | None = None, layout: WorkerLayout | None = None,
) -> ray.train.Result:
    """Fit the ranker on feature rows (columns: request_id, product_id, label, FEATURES); Ray's ``Result``.

    ``layout`` (default :func:`worker_layout` of the cluster now) sets the workers. ``callbacks`` (Ray Train
    callbacks, e.g. Tune's ``TuneReportCallback`` in a sweep) see every report, which comes every
    ``report_every`` boosting rounds (0: only the last). The result's metrics: NDCG@10 of the kept model
    (``validation/ndcg@10``, ``train/ndcg@10``), the layout (``workers``, ``cpus_per_worker``) and where the
    first worker's time went (``time/worker_started``, a timestamp; ``time/data_s``, its matrices;
    ``time/train_s``, the boosting rounds and the final evaluation).
    """
    check_gpu(config.ray)
    warm_coordinator()
    ranker = config.ranker
    layout = layout or worker_layout(config)
    workers = max(1, min(layout.num_workers, train["request_id"].nunique(), validation["request_id"].nunique()))
    # Each worker's blocks in the object store, their references in the loop's config (nested, so Ray passes them
    # as they are; this frame holds them until the run ends). Not Ray Data: a dataset per worker and split over the
    # same blocks cost the demo's million rows about 1 s more in the worker (the shard's streaming executor, a
    # stats actor) and, made with from_arrow, 1.2 s more in the driver (a metadata task per block), besides a
    # DatasetManager actor, for nothing it adds to blocks already in memory.
    blocks = {f"{split}_{i}": [ray.put(block) for block in mine]
              for split, frame in (("train", train), ("validation", validation))
              for i, mine in enumerate(worker_blocks(frame, workers))}
    trainer = (XGBoostTrainer if callbacks else UntunedTrainer)(
        train_loop_per_worker,
        train_loop_config={"params": xgboost_params(config, layout), "rounds": ranker.num_boost_round,
                           "early_stopping_rounds": ranker.early_stopping_rounds, "warm_start": warm_start,
                           "report_every": report_every, "blocks": blocks},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=config.ray.use_gpu,
                                     resources_per_worker={"CPU": layout.cpus_per_worker},
                                     placement_strategy="SPREAD" if layout.spread else "PACK"),
        run_config=RunConfig(name=name, storage_path=storage, storage_filesystem=storage_filesystem,
                             failure_config=FailureConfig(max_failures=1),
                             checkpoint_config=CheckpointConfig(num_to_keep=1), callbacks=callbacks or []),
    )
    # Ray Train's preemption watcher (an actor process, about a second and a half of CPU to start) restarts a
    # run whose worker node is going away; where every worker runs on the driver's node, that node takes the
    # driver with it, so there is nothing for it to do
    alone = len([n for n in ray.nodes() if n["Alive"]]) == 1
    return fit(trainer, config.ray, env={PREEMPTION_WATCHER: "0"} if alone else None)


class UntunedTrainer(XGBoostTrainer):
    """``XGBoostTrainer`` without two actors of Ray Train's that a training outside Tune, given no dataset, has no
    use for, each a process started beside the workers' on the start-up's critical path.

    The placement-group cleaner (a detached actor per run) frees the run's CPUs should its controller die while
    the driver lives on, which is what Tune does to a trial ASHA stops: a sweep's trials keep it (they pass
    Tune's callback, so they get ``XGBoostTrainer``); a stage or an update ends with its driver, and Ray frees a
    job's placement groups when the job ends. The datasets callback starts a ``DatasetManager`` actor even for
    a trainer given no dataset. Without both, and with the coordinator below started early, a fresh 2-CPU
    cluster's start-up went from 7.1 to 4.9 s. ``_create_default_callbacks`` and the callbacks' modules are
    Ray's (private): where a Ray version renames them, this class changes nothing.
    """

    def _create_default_callbacks(self) -> list[Any]:
        callbacks = super()._create_default_callbacks()
        try:
            from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
            from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
        except ImportError:
            return callbacks
        unused = (PlacementGroupCleanerCallback, *(() if self.datasets else (DatasetsCallback,)))
        return [c for c in callbacks if not isinstance(c, unused)]


def warm_coordinator() -> None:
    """Start Ray's autoscaling coordinator (a detached actor, one per cluster, which every trainer's controller
    asks for its resources, and creates when there is none yet) now: its process then starts while the driver
    hands the rows over, not after the controller's (1.2 s of a fresh cluster's start-up; a cluster that
    trained before has it). Ray's own function (private); nothing where a Ray version moves it."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:
        return
    get_or_create_autoscaling_coordinator()


def validation_ndcg(booster: xgboost.Booster, rows: pd.DataFrame, k: int = 10) -> float:
    """Mean NDCG@k of the booster's order over the requests of ``rows`` (labels as relevance)."""
    ranked, qrels = {}, {}
    for request, group in rows.groupby("request_id", sort=False):
        order = np.argsort(-predict(booster, group[FEATURES].to_numpy(np.float32)), kind="stable")
        ranked[request] = group["product_id"].to_numpy()[order].tolist()
        qrels[request] = {p: int(v) for p, v in zip(group["product_id"], group["label"]) if v > 0}
    return mean_metrics(ranked, qrels, k=k)[f"ndcg@{k}"] if qrels else 0.0
