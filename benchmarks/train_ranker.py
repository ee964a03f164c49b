"""Ranker training: Ray Train's XGBoostTrainer against single-process xgboost.train, and across nodes.

Both fit the same feature table (``--rows``, default 1M: the run's ranker training
rows, whole requests resampled with new ids until the count is reached) with the
same parameters, seed and number of rounds (early stopping never fires: both build
every tree, then keep the best round's trees, as the ranker stage does), then score
the same validation rows. The trainer takes its layout from the cluster
(``ranker.num_workers`` unset: on this one-node local cluster, one worker with every
CPU; ``--workers`` sets it), and ``xgboost.train`` gets as many threads as the
trainer's workers together. Prints both wall times, the ratio (plain / Ray: 1 is
native speed), where the trainer's wall went (driver and start-up, the worker's
matrices, the rounds, the end) and both models' validation NDCG@10.

``--nodes 2``: weak scaling on a multi-node cluster on this machine (``tests/fake_cluster.py``:
Ray's fake multi-node provider, the head with no CPU, worker nodes of 1 CPU started by the
autoscaler): ``--rows`` on one node against twice the rows on two (one worker per node),
same seed and rounds; the efficiency is t(1 node) / t(2 nodes), 1 being perfect. The fake
nodes share this machine's cores, so on a 2-core machine two nodes already take every core.

Then ranking latency in process: candidates' features (:func:`compute_features`)
plus the booster's prediction, for one request of 200 candidates, p50 and p99
over 1,000 requests.

    python benchmarks/train_ranker.py --config demo          # needs a run with ranker features
    python benchmarks/train_ranker.py --config demo --rows 200000 --rounds 50
    python benchmarks/train_ranker.py --config demo --rows 200000 --rounds 50 --nodes 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

os.environ.setdefault("RAY_AUTH_MODE", "token")

import ray  # noqa: E402
import xgboost  # noqa: E402

from common import ContentionWatcher  # noqa: E402
from shoprank.config import Config, load_config  # noqa: E402
from shoprank.entrypoint import local_ray_options  # noqa: E402
from shoprank.ranker.train import (  # noqa: E402
    WorkerLayout, grouped_matrix, read_features, train_ranker, validation_ndcg, with_positives, worker_layout,
    xgboost_params,
)
from shoprank.recsys.context import load_context  # noqa: E402
from shoprank.recsys.features import FEATURES, compute_features  # noqa: E402
from shoprank.recsys.types import Candidates  # noqa: E402
from shoprank.store.run import Run  # noqa: E402
from ray.train.xgboost import RayTrainReportCallback  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STORAGE = str(Path("/tmp") / "shoprank-bench-ranker")


def resampled(frame: pd.DataFrame, rows: int, seed: int) -> pd.DataFrame:
    """Whole requests drawn with replacement (renamed) until ``rows`` rows."""
    rng = np.random.default_rng(seed)
    groups = [g for _, g in frame.groupby("request_id", sort=False)]
    out, total, i = [], 0, 0
    while total < rows:
        group = groups[int(rng.integers(len(groups)))].copy()
        group["request_id"] = f"{group['request_id'].iat[0]}~{i}"
        out.append(group)
        total += len(group)
        i += 1
    return pd.concat(out, ignore_index=True)


def latency(config, run: Run, booster: xgboost.Booster, requests: int, candidates: int) -> dict[str, float]:
    context = load_context(config, run)
    stats = context.catalogue.stats
    rng = np.random.default_rng(0)
    users = [u for u, h in context.events.histories.items() if len(h) >= 5]
    times = []
    for i in range(requests):
        history = context.events.histories[users[i % len(users)]]
        now = float(history.ts_s[-1]) + 60.0
        history = history.before(now, config.features.history_events)
        rows = rng.choice(len(stats.product_ids), candidates, replace=False)
        cands = Candidates(rows=rows, cosine=rng.random(candidates, dtype=np.float32),
                           bm25=np.zeros(candidates, np.float32), sources=np.ones(candidates, np.int64),
                           position=np.arange(1, candidates + 1, dtype=np.float32))
        started = time.perf_counter()
        booster.inplace_predict(compute_features(cands, history, now, stats, is_search=False))
        times.append(time.perf_counter() - started)
    ms = np.array(times) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def plain_train(config: Config, train: pd.DataFrame, validation: pd.DataFrame, nthread: int,
                rounds: int) -> tuple[xgboost.Booster, float]:
    """``xgboost.train`` in this process, as the trainer's workers run it (same parameters, seed, early
    stopping that keeps the best round): the sorted ``DMatrix`` of each split, then the rounds; its wall time."""
    params = xgboost_params(config, WorkerLayout(1, nthread))
    started = time.perf_counter()
    dtrain, dvalid = grouped_matrix(train), grouped_matrix(validation)
    booster = xgboost.train(params, dtrain, num_boost_round=rounds, evals=[(dvalid, "validation")], verbose_eval=False,
                            callbacks=[xgboost.callback.EarlyStopping(rounds=rounds + 1, metric_name="ndcg@10",
                                                                      data_name="validation", maximize=True,
                                                                      save_best=True)])
    return booster, time.perf_counter() - started


def ray_train(config: Config, train: pd.DataFrame, validation: pd.DataFrame) -> tuple[xgboost.Booster, dict[str, Any]]:
    """``train_ranker`` on the connected cluster: the model and where its wall time went (the worker's own
    timestamps: start-up is the driver's hand-over plus the trainer's start until the worker runs)."""
    started = time.time()
    result = train_ranker(config, train, validation, STORAGE)
    wall = time.time() - started
    m = result.metrics
    startup = m["time/worker_started"] - started
    return RayTrainReportCallback.get_model(result.checkpoint), {
        "wall_s": wall, "workers": m["workers"], "cpus_per_worker": m["cpus_per_worker"],
        "startup_s": startup, "worker_matrices_s": m["time/data_s"], "rounds_s": m["time/train_s"],
        "end_s": wall - startup - m["time/data_s"] - m["time/train_s"],
    }


def single_node(config: Config, train: pd.DataFrame, validation: pd.DataFrame, args: argparse.Namespace,
                watcher: ContentionWatcher) -> tuple[dict[str, Any], xgboost.Booster]:
    layout = worker_layout(config, nodes=[args.cpus])  # what the trainer will pick on the local cluster below
    watcher.set_phase("xgboost.train")
    plain, plain_s = plain_train(config, train, validation, layout.cpus, args.rounds)
    watcher.set_phase("ray start")
    with local_ray_options(args.cpus) as options:
        ray.init(**options, log_to_driver=False)
    watcher.set_phase("XGBoostTrainer")
    try:
        distributed, timing = ray_train(config, train, validation)
    finally:
        ray.shutdown()
    watcher.set_phase("scoring")
    report = {
        "workers": timing["workers"], "cpus_per_worker": timing["cpus_per_worker"], "plain_nthread": layout.cpus,
        "xgboost_trainer_s": round(timing["wall_s"], 1), "xgboost_train_s": round(plain_s, 1),
        "ratio_plain_over_ray": round(plain_s / timing["wall_s"], 3),
        "xgboost_trainer_ndcg@10": round(validation_ndcg(distributed, validation), 4),
        "xgboost_train_ndcg@10": round(validation_ndcg(plain, validation), 4),
        "trees": [distributed.num_boosted_rounds(), plain.num_boosted_rounds()],
        "trainer_wall": {k: round(v, 2) for k, v in timing.items() if k.endswith("_s")},
    }
    t = report["trainer_wall"]
    print(f"{'':<34}{'XGBoostTrainer':>16}{'xgboost.train':>16}")
    shape = f"{report['workers']} x {report['cpus_per_worker']} CPUs"
    print(f"{'layout':<34}{shape:>16}{f'{layout.cpus} threads':>16}")
    print(f"{'wall time (s)':<34}{report['xgboost_trainer_s']:>16}{report['xgboost_train_s']:>16}")
    print(f"{'validation NDCG@10':<34}{report['xgboost_trainer_ndcg@10']:>16}{report['xgboost_train_ndcg@10']:>16}")
    print(f"{'trees kept':<34}{report['trees'][0]:>16}{report['trees'][1]:>16}")
    print(f"ratio (plain / Ray Train wall time): {report['ratio_plain_over_ray']}; NDCG@10 difference "
          f"{report['xgboost_trainer_ndcg@10'] - report['xgboost_train_ndcg@10']:+.4f}")
    print(f"trainer's wall: driver hand-over + start-up {t['startup_s']} s, worker's matrices {t['worker_matrices_s']} s, "
          f"rounds + final evaluation {t['rounds_s']} s, checkpoint and end {t['end_s']} s")
    return report, plain


def wait_for_nodes(count: int, timeout_s: float = 300.0) -> None:
    """Ask the autoscaler for ``count`` 1-CPU nodes and wait until that many are alive."""
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"CPU": 1}] * count)
    deadline = time.monotonic() + timeout_s
    while sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"the fake cluster did not reach {count} worker nodes in {timeout_s:.0f} s")
        time.sleep(1)


def weak_scaling(config: Config, base: pd.DataFrame, validation: pd.DataFrame, args: argparse.Namespace,
                 watcher: ContentionWatcher) -> tuple[dict[str, Any], xgboost.Booster]:
    """``--rows`` on one fake node against ``2 x --rows`` on two, each with the auto layout."""
    sys.path.insert(0, str(REPO / "tests"))
    from fake_cluster import FakeCluster, node_types

    cluster = FakeCluster(node_types(without=("worker.gpu",)), idle_timeout_s=120.0)
    watcher.set_phase("fake cluster start")
    cluster.start()
    runs, models = {}, {}
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        for nodes in (1, 2):
            train = resampled(base, nodes * args.rows, seed=0)
            watcher.set_phase(f"{nodes} node(s) up")
            wait_for_nodes(nodes)
            watcher.set_phase(f"XGBoostTrainer on {nodes} node(s)")
            models[nodes], timing = ray_train(config, train, validation)
            runs[nodes] = {"rows": len(train), **{k: round(v, 2) if isinstance(v, float) else v for k, v in timing.items()}}
        ray.shutdown()
    finally:
        cluster.stop()
    watcher.set_phase("scoring")
    for nodes in (1, 2):
        runs[nodes]["ndcg@10"] = round(validation_ndcg(models[nodes], validation), 4)
        runs[nodes]["trees"] = models[nodes].num_boosted_rounds()
    report = {"weak_scaling": {"one_node": runs[1], "two_nodes": runs[2],
                               "efficiency": round(runs[1]["wall_s"] / runs[2]["wall_s"], 3)}}
    print(f"{'':<34}{'1 node':>16}{'2 nodes':>16}")
    print(f"{'rows':<34}{runs[1]['rows']:>16,}{runs[2]['rows']:>16,}")
    shapes = [f"{runs[n]['workers']} x {runs[n]['cpus_per_worker']}" for n in (1, 2)]
    print(f"{'workers x CPUs':<34}{shapes[0]:>16}{shapes[1]:>16}")
    for key, label in (("wall_s", "wall time (s)"), ("startup_s", "  hand-over + start-up (s)"),
                       ("worker_matrices_s", "  worker's matrices (s)"), ("rounds_s", "  rounds (s)"),
                       ("end_s", "  checkpoint and end (s)"), ("ndcg@10", "validation NDCG@10"), ("trees", "trees kept")):
        print(f"{label:<34}{runs[1][key]:>16}{runs[2][key]:>16}")
    print(f"weak-scaling efficiency (t 1 node / t 2 nodes, 2x rows): {report['weak_scaling']['efficiency']}")
    return report, models[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--set", nargs="*", default=[])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--workers", type=int, default=None, help="ranker.num_workers (default: unset, the auto layout)")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the local cluster (default: ray.num_cpus)")
    parser.add_argument("--nodes", type=int, choices=[1, 2], default=1)
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    config = load_config(args.config, args.set)
    args.cpus = args.cpus or config.ray.num_cpus
    config = config.model_copy(update={"ranker": config.ranker.model_copy(update={
        "num_workers": args.workers, "num_boost_round": args.rounds, "early_stopping_rounds": args.rounds + 1})})
    run = Run.for_config(config)
    if not run.exists("ranker", "features"):
        raise SystemExit(f"{run.uri()}: no ranker features; run `python jobs/train_ranker.py --config {args.config}` first")
    base = with_positives(read_features(run, "train"))
    validation = with_positives(read_features(run, "validation"))
    watcher = ContentionWatcher().start()
    figures: dict[str, Any] = {"rows": args.rows, "rounds": args.rounds, "nodes": args.nodes}
    if args.nodes == 1:
        train = resampled(base, args.rows, seed=0)
        figures["rows"] = len(train)
        print(f"feature table: {len(train):,} rows, {train['request_id'].nunique():,} requests, {len(FEATURES)} "
              f"features; validation {len(validation):,} rows")
        report, booster = single_node(config, train, validation, args, watcher)
    else:
        print(f"feature table: {args.rows:,} rows per node, validation {len(validation):,} rows")
        report, booster = weak_scaling(config, base, validation, args, watcher)
    figures.update(report)
    watcher.set_phase("latency")
    figures["latency_200_candidates"] = {k: round(v, 3) for k, v in latency(config, run, booster, args.requests, 200).items()}
    watcher.stop()
    figures["max_loadavg_1m"] = {name: phase["max_loadavg_1m"] for name, phase in watcher.figures()["phases"].items()}
    print(f"ranking latency, 200 candidates (features + predict): p50 {figures['latency_200_candidates']['p50_ms']} ms, "
          f"p99 {figures['latency_200_candidates']['p99_ms']} ms")
    print("max 1-min load average per phase (2 = both cores busy): "
          + ", ".join(f"{name} {value}" for name, value in figures["max_loadavg_1m"].items()))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
