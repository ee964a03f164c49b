"""Ranker training: Ray Train's XGBoostTrainer (2 workers) against single-process xgboost.train.

Both fit the same feature table (``--rows``, default 1M: the run's ranker training
rows, whole requests resampled with new ids until the count is reached) with the
same parameters and the same number of rounds (no early stopping, so both build
every tree), then score the same validation rows. Prints both wall times, the
ratio (plain / Ray: above 1 means Ray Train is faster) and both models'
validation NDCG@10.

Then ranking latency in process: candidates' features (:func:`compute_features`)
plus the booster's prediction, for one request of 200 candidates, p50 and p99
over 1,000 requests.

    python benchmarks/train_ranker.py --config demo          # needs a run with ranker features
    python benchmarks/train_ranker.py --config demo --rows 200000 --rounds 50
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("RAY_AUTH_MODE", "token")

import ray  # noqa: E402
import xgboost  # noqa: E402

from shoprank.config import load_config  # noqa: E402
from shoprank.entrypoint import local_ray_options  # noqa: E402
from shoprank.ranker.train import (  # noqa: E402
    grouped_matrix, read_features, train_ranker, validation_ndcg, with_positives, xgboost_params,
)
from shoprank.recsys.context import load_context  # noqa: E402
from shoprank.recsys.features import FEATURES, compute_features  # noqa: E402
from shoprank.recsys.types import Candidates  # noqa: E402
from shoprank.store.run import Run  # noqa: E402
from ray.train.xgboost import RayTrainReportCallback  # noqa: E402


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--set", nargs="*", default=[])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    config = load_config(args.config, args.set)
    config = config.model_copy(update={"ranker": config.ranker.model_copy(update={
        "num_workers": args.workers, "num_boost_round": args.rounds, "early_stopping_rounds": args.rounds + 1})})
    run = Run.for_config(config)
    if not run.exists("ranker", "features"):
        raise SystemExit(f"{run.uri()}: no ranker features; run `python jobs/train_ranker.py --config {args.config}` first")
    train = resampled(with_positives(read_features(run, "train")), args.rows, seed=0)
    validation = with_positives(read_features(run, "validation"))
    print(f"feature table: {len(train):,} rows, {train['request_id'].nunique():,} requests, {len(FEATURES)} features")

    params = xgboost_params(config) | {"nthread": args.workers}  # the plain loop gets the CPUs of all workers
    started = time.perf_counter()
    dtrain, dvalid = grouped_matrix(train), grouped_matrix(validation)
    plain = xgboost.train(params, dtrain, num_boost_round=args.rounds, evals=[(dvalid, "validation")], verbose_eval=False)
    plain_s = time.perf_counter() - started

    with local_ray_options(args.workers * config.ranker.cpus_per_worker) as options:
        ray.init(**options, log_to_driver=False)
    with_ray_started = time.perf_counter()
    result = train_ranker(config, train, validation, str(Path("/tmp") / "shoprank-bench-ranker"))
    ray_s = time.perf_counter() - with_ray_started
    distributed = RayTrainReportCallback.get_model(result.checkpoint)
    ray.shutdown()

    report = {
        "rows": len(train), "rounds": args.rounds, "workers": args.workers,
        "xgboost_trainer_s": round(ray_s, 1), "xgboost_train_s": round(plain_s, 1),
        "ratio_plain_over_ray": round(plain_s / ray_s, 3),
        "xgboost_trainer_ndcg@10": round(validation_ndcg(distributed, validation), 4),
        "xgboost_train_ndcg@10": round(validation_ndcg(plain, validation), 4),
        "trees": [distributed.num_boosted_rounds(), plain.num_boosted_rounds()],
    }
    report["latency_200_candidates"] = {k: round(v, 3) for k, v in latency(config, run, plain, args.requests, 200).items()}
    print(f"{'':<34}{'XGBoostTrainer':>16}{'xgboost.train':>16}")
    print(f"{'wall time (s)':<34}{report['xgboost_trainer_s']:>16}{report['xgboost_train_s']:>16}")
    print(f"{'validation NDCG@10':<34}{report['xgboost_trainer_ndcg@10']:>16}{report['xgboost_train_ndcg@10']:>16}")
    print(f"ratio (plain / Ray Train wall time): {report['ratio_plain_over_ray']}")
    print(f"ranking latency, 200 candidates (features + predict): p50 {report['latency_200_candidates']['p50_ms']} ms, "
          f"p99 {report['latency_200_candidates']['p99_ms']} ms")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
