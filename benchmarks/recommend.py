"""Recommendation quality on behaviour-only data: the pipeline against popularity, EASE and implicit's ALS.

Not a speed benchmark. By default it generates the latent-factor shop of
:mod:`shoprank.data.latent` (about 100k clicks and purchases of 1,000 users on 1,700
products, no views, no queries; ``--seed``), writes a pipeline config that reads it
as a ratings export (``<data>/pipeline.yaml``), runs ``jobs/pipeline.py`` on it
(its finished stages are skipped), then measures three baselines on exactly
the pipeline's test requests and relevance (``build_requests`` and the evaluation's
qrels: a request is a test-split browsing session, relevant are the products
engaged there, purchase 3 > click 1):

* **popularity**: the products with most engagements in the training split, less
  what the user already met;
* **EASE** (Steck 2019), dense and unpruned, its L2 chosen from a grid on the
  validation requests;
* **ALS** of ``implicit`` (Hu, Koren and Volinsky 2008), factors, regularisation and
  alpha chosen on the validation requests; each request's user factors are
  recomputed from their history (``recalculate_user``) and the products they already
  met are filtered (the library's default).

Each baseline is fitted on the training split's engagements and reads each request's
history as the system does: every event of the user before the request. The system's
figures are the run's ``evaluation/offline.json`` (recommendation, fine-tuned
retrieval + ranker; its per-request rankings are asked again of Serve's answer path, as
the evaluation asks them, and must give the evaluation's NDCG@10). Prints one table with
NDCG@10, Recall@10, MRR, the system's NDCG@10 over each row's and, for each baseline,
the system's mean per-request NDCG@10 difference with a 95% bootstrap interval; then
one JSON line.

    .venv/bin/python benchmarks/recommend.py                      # generate, run the pipeline, compare
    .venv/bin/python benchmarks/recommend.py --seed 1 --set encoder.train.epochs=1
    .venv/bin/python benchmarks/recommend.py --config demo        # an existing config's run instead

Needs ``implicit`` (``pip install implicit``, 0.7.x) for the ALS row.

Results (this 2-core machine, 2026-12-01; pipeline 4 to 10 minutes per seed, baselines
1 to 2 minutes), NDCG@10 on the test split, and the system's per-request gain with its 95%
bootstrap interval (a rerun of seed 0 on 2026-12-02, in benchmarks/README.md, gave the system 0.2339,
EASE 0.2236, ALS 0.2205: the pipeline's ranker is not bit-for-bit repeatable across runs):

=========================================  ===============  ===============
system                                     seed 0 (2,804)   seed 1 (2,741)
=========================================  ===============  ===============
pipeline: popularity (its candidate rows)  0.0127           0.0123
pipeline: retrieval (fine-tuned encoder)   0.0260           0.0259
popularity, seen left out                  0.0507           0.0601
implicit ALS, tuned                        0.2206           0.2335
EASE, tuned                                0.2236           0.2395
pipeline: retrieval + ranker (the system)  0.2360           0.2502
system - popularity                        +0.185 (4.65x)   +0.190 (4.16x)
system - ALS                               +0.015 [.009,    +0.017 [.010,
                                           .022] (1.07x)    .024] (1.07x)
system - EASE                              +0.012 [.006,    +0.011 [.004,
                                           .019] (1.06x)    .018] (1.04x)
=========================================  ===============  ===============

The pipeline's own popularity row is low because it ranks the "popular" candidates,
which hold products the user already clicked (only purchases are left out by
default) and a ratings export never repeats a (user, product) pair; the
``popularity, seen left out`` row is the fair one. The ranker's gain over EASE comes
from its item-item source and scores (EASE fitted at the ranker's cut-off, see
:mod:`shoprank.recsys.retrieval`) combined with what a bag of products misses:
what the user already met (``user_product_events``, ``unseen_rank_in_category``),
their latest visit (``cf_recent``), popularity and conversion.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "token")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import yaml  # noqa: E402

from shoprank.config import Config, load_config  # noqa: E402
from shoprank.data.io import read_table  # noqa: E402
from shoprank.data.latent import CATALOG_FILE, RATING_EVENT_TYPES, RATINGS_FILE, LatentShopSpec, write_latent_shop  # noqa: E402
from shoprank.evaluation.offline import qrels_of, served_top_k  # noqa: E402
from shoprank.ranker.dataset import build_requests, judgments  # noqa: E402
from shoprank.recsys.context import ENGAGEMENTS, EventLog  # noqa: E402
from shoprank.recsys.features import epoch_seconds  # noqa: E402
from shoprank.recsys.metrics import bootstrap_mean, mean_metrics, ndcg_at_k  # noqa: E402
from shoprank.store.run import Run  # noqa: E402

from baselines import K, ease_weights, fit_als, run_pipeline, top_k, user_matrix  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "fine-tuned retrieval + ranker"
EASE_L2 = (10.0, 30.0, 100.0, 300.0, 1000.0)
ALS_GRID = [{"factors": f, "regularization": r, "alpha": a}
            for f in (32, 64, 128, 256) for r in (0.1, 1.0, 10.0) for a in (0.03, 0.1, 0.3, 1.0, 5.0)]

PIPELINE_SETTINGS: dict[str, Any] = {
    # the demo preset's encoder settings (configs/demo.yaml) with one epoch on 1,500 pairs of each kind (co-engaged
    # products, consecutive engagements): about 95 steps, minutes on 2 CPUs instead of the hours 20,000 would take;
    # on this data the encoder's source is the weakest (the results in the module docstring)
    "encoder": {"max_length": 32, "description_chars": 60,
                "train": {"epochs": 1, "cpus_per_worker": 2, "batch_size": 32, "learning_rate": 0.002,
                          "max_coengagement_pairs": 1500}},
    # 100 candidates per source: the candidates then hold 85% of each test session's products, against 75% at 50
    "retrieval": {"candidates_per_source": 100},
}


def write_pipeline_config(data: Path, run_root: Path, name: str) -> Path:
    """``<data>/pipeline.yaml``: the generated files read as a ratings export (docs/data.md)."""
    config = {
        "run": {"root": str(run_root.resolve()), "name": name},
        "ray": {"num_cpus": 2},
        "source": {"kind": "files", "files": {
            "products": {"path": str((data / CATALOG_FILE).resolve())},
            "events": {
                "path": str((data / RATINGS_FILE).resolve()),
                "columns": {"user_id": "user", "product_id": "item", "ts": "timestamp"},
                "event_type": {"column": "rating", "map": RATING_EVENT_TYPES},
                "event_id": "hash",
                "session_id": {"gap_minutes": 30},
            },
        }},
        **PIPELINE_SETTINGS,
    }
    path = data / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class Split:
    """The run's products, training engagements, and one split's requests, histories and relevance."""

    product_ids: list[str]
    train_users: np.ndarray
    train_rows: np.ndarray
    histories: list[np.ndarray]
    """Catalogue rows of each request's user's events before the request, in qrels order."""
    qrels: dict[str, dict[str, int]]


def load_splits(config: Config, run: Run) -> dict[str, Split]:
    """Validation and test recommendation requests exactly as the pipeline's evaluation builds them."""
    products = read_table(run, "data", "products", columns=["product_id"]).column("product_id").to_pylist()
    row_of = {p: i for i, p in enumerate(products)}
    table = read_table(run, "data", "events", columns=["user_id", "product_id", "event_type", "ts", "split"])
    events = pd.DataFrame({name: table.column(name).to_numpy(zero_copy_only=False)
                           for name in ("user_id", "product_id", "event_type", "split")})
    events["ts_s"] = epoch_seconds(table.column("ts"))
    events = events[events["product_id"].isin(row_of.keys())]
    train = events[(events["split"] == "train") & events["event_type"].isin(ENGAGEMENTS)]
    log = EventLog(events, row_of)
    requests = build_requests(config, run)
    requests = requests[requests["kind"] == "recommend"]
    judged = judgments(run)
    out = {}
    for split in ("validation", "test"):
        chosen = requests[requests["split"] == split]
        qrels = qrels_of(chosen, judged)
        when = dict(zip(chosen["request_id"], zip(chosen["user_id"], chosen["ts_s"])))
        histories = [log.history(when[r][0], float(when[r][1]), config.features.history_events).product_rows
                     for r in qrels]
        out[split] = Split(products, train["user_id"].to_numpy(), train["product_id"].map(row_of).to_numpy(np.int64),
                           histories, qrels)
    return out


def history_matrix(split: Split) -> sp.csr_matrix:
    """Binary requests x products matrix of each request's history."""
    n = len(split.product_ids)
    indptr = np.cumsum([0] + [len(np.unique(h)) for h in split.histories])
    indices = np.concatenate([np.unique(h) for h in split.histories]) if split.histories else np.zeros(0, np.int64)
    return sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(len(split.histories), n))


Runs = dict[str, list[str]]
"""Request id -> ranked product ids."""


def runs_of(split: Split, ranked: np.ndarray) -> Runs:
    return {r: [split.product_ids[i] for i in row] for r, row in zip(split.qrels, ranked)}


def ndcg(split: Split, runs: Runs) -> float:
    return mean_metrics(runs, split.qrels, k=K)[f"ndcg@{K}"]


def popularity(splits: dict[str, Split]) -> tuple[Runs, dict[str, Any]]:
    test = splits["test"]
    counts = np.bincount(test.train_rows, minlength=len(test.product_ids)).astype(np.float64)
    history = history_matrix(test)
    return runs_of(test, top_k(np.tile(counts, (history.shape[0], 1)), history)), {}


def ease(splits: dict[str, Split]) -> tuple[Runs, dict[str, Any]]:
    """Dense EASE; the L2 with the best validation NDCG@10."""
    test, validation = splits["test"], splits["validation"]
    matrix = user_matrix(test.train_users, test.train_rows, len(test.product_ids))

    def run(split: Split, weights: np.ndarray) -> Runs:
        history = history_matrix(split)
        return runs_of(split, top_k(history @ weights, history))

    scores = {l2: ndcg(validation, run(validation, ease_weights(matrix, l2))) for l2 in EASE_L2}
    best = max(scores, key=scores.get)
    return run(test, ease_weights(matrix, best)), {"l2": best, "validation_ndcg@10": scores[best],
                                                   "grid": len(scores)}


def als(splits: dict[str, Split]) -> tuple[Runs, dict[str, Any]]:
    """implicit's ALS; the grid point with the best validation NDCG@10."""
    from threadpoolctl import threadpool_limits

    test, validation = splits["test"], splits["validation"]
    matrix = user_matrix(test.train_users, test.train_rows, len(test.product_ids))

    def fit(params: dict[str, Any]) -> Any:
        return fit_als(matrix, params)

    def run(split: Split, model: Any) -> Runs:
        history = history_matrix(split)
        ranked, _ = model.recommend(np.arange(history.shape[0]), history, N=K, recalculate_user=True,
                                    filter_already_liked_items=True)
        return runs_of(split, ranked)

    with threadpool_limits(1, "blas"):  # implicit's advice: its own threads, not BLAS's
        scores = {json.dumps(p, sort_keys=True): ndcg(validation, run(validation, fit(p))) for p in ALS_GRID}
        best = max(scores, key=scores.get)
        return run(test, fit(json.loads(best))), {"params": json.loads(best), "validation_ndcg@10": scores[best],
                                                  "grid": len(scores)}


BASELINES: dict[str, Callable[[dict[str, Split]], tuple[Runs, dict[str, Any]]]] = {
    "popularity (training split, seen left out)": popularity,
    "EASE (dense, L2 tuned on validation)": ease,
    "implicit ALS (tuned on validation)": als,
}


def system_runs(config: Config, run: Run) -> Runs:
    """The run's test rankings, as its evaluation made them: Serve's answer for each test request
    (:func:`~shoprank.evaluation.offline.served_top_k`: the run's ranker, exclusions and diversity rule)."""
    requests = build_requests(config, run)
    return served_top_k(config, run, requests[requests["split"] == "test"])


def paired_difference(split: Split, system: Runs, other: Runs, seed: int = 0) -> tuple[float, float, float]:
    """Mean per-request NDCG@10 of ``system`` minus ``other`` and its 95% bootstrap interval (2,000 resamples)."""
    delta = np.array([ndcg_at_k(system.get(r, []), rel, K) - ndcg_at_k(other.get(r, []), rel, K)
                      for r, rel in split.qrels.items()])
    return bootstrap_mean(delta, seed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", help="an existing preset or YAML (default: generate the latent shop)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data set")
    parser.add_argument("--data", type=Path, help="where the data set goes (default runs/latent-s<seed>-data)")
    parser.add_argument("--run-root", type=Path, default=REPO / "runs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="pipeline config override")
    parser.add_argument("--no-pipeline", action="store_true", help="read the run's evaluation as it is")
    parser.add_argument("--json", help="also write the JSON line to this file")
    args = parser.parse_args()
    figures: dict[str, Any] = {}
    if args.config is None:
        data = args.data or args.run_root / f"latent-s{args.seed}-data"
        if not (data / RATINGS_FILE).exists():
            shop = write_latent_shop(data, LatentShopSpec(seed=args.seed))
            print(f"generated {len(shop.ratings):,} ratings -> {data}", flush=True)
        config_arg = str(write_pipeline_config(data, args.run_root, f"latent-s{args.seed}"))
        figures["data"] = {"generator": "shoprank.data.latent", "seed": args.seed, "directory": str(data)}
    else:
        config_arg = args.config
    if not args.no_pipeline:
        run_pipeline(config_arg, args.set)
    config = load_config(config_arg, args.set)
    run = Run.for_config(config)
    evaluation = run.read_json("evaluation", "offline.json")
    if "recommend" not in evaluation:
        raise SystemExit(f"{run.uri()}: the evaluation has no recommendation figures: "
                         f"{evaluation.get('no_figures', {}).get('recommend')}")
    pipeline_rows = evaluation["recommend"]
    splits = load_splits(config, run)
    test = splits["test"]
    if len(test.qrels) != pipeline_rows[SYSTEM]["requests"]:
        raise SystemExit(f"the run's evaluation scored {pipeline_rows[SYSTEM]['requests']} recommendation requests, "
                         f"this benchmark built {len(test.qrels)}: the run is stale, rerun jobs/pipeline.py")
    system = system_runs(config, run)
    if abs(ndcg(test, system) - pipeline_rows[SYSTEM]["ndcg@10"]) > 1e-6:
        raise SystemExit(f"the saved ranker's test NDCG@10 is {ndcg(test, system):.4f}, the evaluation's "
                         f"{pipeline_rows[SYSTEM]['ndcg@10']:.4f}: the evaluation is stale, rerun jobs/pipeline.py")
    rows: dict[str, dict[str, float]] = {f"pipeline: {name}": m for name, m in pipeline_rows.items()}
    baselines: dict[str, Runs] = {}
    chosen: dict[str, Any] = {}
    for name, baseline in BASELINES.items():
        start_s = time.perf_counter()
        baselines[name], chosen[name] = baseline(splits)
        chosen[name]["seconds"] = round(time.perf_counter() - start_s, 1)
        rows[name] = mean_metrics(baselines[name], test.qrels, k=K)
    differences = {name: paired_difference(test, system, other) for name, other in baselines.items()}
    system_ndcg = pipeline_rows[SYSTEM]["ndcg@10"]
    width = max(len(n) for n in rows) + 2
    print()
    print(f"recommendation on {config_arg} (run {run.uri()}): {len(test.qrels)} test requests. Last columns: the "
          f"system's ({SYSTEM}) NDCG@10 over the row's, and their per-request difference with its 95% bootstrap "
          "interval")
    print(f"{'system':<{width}}{'ndcg@10':>9}{'recall@10':>11}{'mrr':>8}  system/row   difference [95% interval]")
    for name, m in rows.items():
        ratio = system_ndcg / m["ndcg@10"] if m["ndcg@10"] > 0 else float("inf")
        text = f"{name:<{width}}{m['ndcg@10']:>9.4f}{m['recall@10']:>11.4f}{m['mrr']:>8.4f}  {ratio:>9.2f}x"
        if name in differences:
            mean, low, high = differences[name]
            text += f"   {mean:+.4f} [{low:+.4f}, {high:+.4f}]"
        print(text)
    for name, detail in chosen.items():
        if "params" in detail or "l2" in detail:
            print(f"{name}: chosen {detail.get('params', detail.get('l2'))} ({detail['seconds']} s)")
    figures.update({
        "config": config_arg, "run": run.uri(), "test_requests": len(test.qrels),
        "rows": {n: {k: round(v, 4) for k, v in m.items() if isinstance(v, float)} for n, m in rows.items()},
        "system_over": {n: round(system_ndcg / m["ndcg@10"], 3) for n, m in rows.items() if m["ndcg@10"] > 0},
        "system_minus": {n: {"mean": round(d[0], 4), "ci95": [round(d[1], 4), round(d[2], 4)]}
                         for n, d in differences.items()},
        "chosen": chosen,
    })
    line = json.dumps(figures, sort_keys=True, default=str)
    if args.json:
        Path(args.json).write_text(line + "\n")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
