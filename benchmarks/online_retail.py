"""Recommendation quality on real transactions: UCI Online Retail, the system against tuned simple baselines.

The protocol (issue 36; the same on every row, the system's included):

* **Data**: ``benchmarks/data/online-retail/online_retail.csv.gz`` (its README: source, licence, credit), cleaned
  with the rules of the reader config ``configs/examples/online-retail.yaml``: cancellations (``InvoiceNo``
  starting with ``C``), guest orders (blank ``CustomerID``), ``Quantity <= 0``, ``UnitPrice <= 0`` and
  non-product codes (``StockCode`` not starting with five digits: postage, fees, manual entries) are dropped.
  ``InvoiceDate`` is read as it is written (UK local time, no zone), as the reader does.
* **Test window**: from 2011-11-09 to the end of the log (2011-12-09). The test shoppers bought in the window
  and before it; each one's truth is the distinct products they bought in the window (binary relevance). Every
  row ranks 10 products for each test shopper from what happened before 2011-11-09 only, and is scored with
  NDCG@10, Recall@10 and HitRate@10 (:mod:`shoprank.recsys.metrics`). Nothing is left out of a list: a product
  the shopper already bought counts when they buy it again (this shop's shoppers do, again and again).
* **Validation window**: the same one month earlier (history before 2011-10-09, truth from 2011-10-09 to
  2011-11-08). Every baseline's hyperparameters are chosen there by NDCG@10, then the baseline is refitted on
  everything before 2011-11-09 and scored on the test window once.
* **Intervals**: each row's means with a 95% bootstrap interval over shoppers, and the system's per-shopper
  NDCG@10 difference from each baseline (paired: the same resampled shoppers).

The baselines (their grids below; what each chose is printed):

* **popularity**: the most bought products over all the history, counted in purchase lines (``events``) or in
  distinct shoppers (``shoppers``), whichever validates better;
* **recent popularity**: the same over the last ``days`` before the cut-off;
* **own most-bought**: the shopper's products by the number of their orders that hold them, ties to the latest
  bought; a shopper with fewer than 10 products gets the list filled with the tuned recent popularity;
* **TIFU-KNN** (Hu et al. 2020, simplified: one decay per order, no groups): the shopper's vector is the mean
  of their orders' product vectors weighted ``decay ** age`` (age 0: their last order), blended with the mean
  vector of their ``k`` nearest shoppers (cosine) as ``alpha * own + (1 - alpha) * neighbours``; filled as above;
* **EASE** (Steck 2019) and ``implicit``'s **ALS**, on the binary shoppers x products matrix of the history,
  with the shopper's own products kept or left out (``exclude_seen``) as validation says.

**The system row** (``--system``): ``jobs/pipeline.py`` on the reader config with ``preprocess.split_dates``
(validation from 2011-10-09, test from 2011-11-09: the ranker learns from events before the test window only),
then the run loaded as a Serve variant replica loads it (:func:`~shoprank.recsys.context.load_context`, the
run's ranker, :class:`~shoprank.recsys.answer.VariantPipeline`: the request path Serve's variant calls) with
the event log of a server started at the cut-off (every event before 2011-11-09, none after; checked shopper
by shopper against the cleaned data), and asked for 10 recommendations per test shopper at the cut-off.

**Any slice** (the same protocol): ``--data`` another file of the same columns (the pipeline reads it too:
``source.files.events.path``), ``--validation-from`` and ``--test-from`` the windows' first days (the pipeline's
``preprocess.split_dates``, set by the benchmark), ``--until`` the test window's end (its first day out; default:
the end of the log). ``--until`` shortens the truth only: every row, the system's included, ranks from the
history before ``--test-from``.

    .venv/bin/python benchmarks/online_retail.py                  # the baselines (about 3 minutes on 2 CPUs)
    .venv/bin/python benchmarks/online_retail.py --system         # and the system (runs the pipeline)
    .venv/bin/python benchmarks/online_retail.py --system --config my.yaml --set encoder.train.epochs=1
    .venv/bin/python benchmarks/online_retail.py --data two-months.csv.gz --validation-from 2011-10-12 \
        --test-from 2011-10-26 --system --set run.root=/tmp/runs

Prints one table and one JSON line. Needs ``implicit`` (``pip install implicit``, 0.7.x) for the ALS row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "token")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.sparse as sp  # noqa: E402

from shoprank.recsys.metrics import bootstrap_mean, hit_rate_at_k, ndcg_at_k, recall_at_k  # noqa: E402

from baselines import K, REPO, ease_weights, fit_als, run_pipeline, top_k, user_matrix  # noqa: E402

DATA = REPO / "benchmarks" / "data" / "online-retail" / "online_retail.csv.gz"
READER_CONFIG = "configs/examples/online-retail.yaml"
VALIDATION_FROM = date(2011, 10, 9)
TEST_FROM = date(2011, 11, 9)
METRICS = ("ndcg@10", "recall@10", "hit_rate@10")
SYSTEM = "the system (pipeline run, Serve's request path)"

POPULARITY_GRID = [{"count": c} for c in ("events", "shoppers")]
RECENT_GRID = [{"count": c, "days": d} for c in ("events", "shoppers") for d in (7, 14, 30, 60, 90)]
TIFU_GRID = [{"decay": d, "k": k, "alpha": a}
             for d in (0.7, 0.8, 0.9, 1.0) for k in (50, 100, 300) for a in (0.2, 0.4, 0.6, 0.8, 1.0)]
EASE_GRID = [{"l2": l2, "exclude_seen": e} for l2 in (30.0, 100.0, 300.0, 1000.0, 3000.0) for e in (False, True)]
ALS_GRID = [{"factors": f, "regularization": r, "alpha": a, "exclude_seen": e}
            for f in (32, 64, 128) for r in (0.1, 1.0, 10.0) for a in (1.0, 5.0, 20.0) for e in (False, True)]


@dataclass(frozen=True)
class Slice:
    """The data file and the windows' first days: what the baselines' windows and the system's pipeline
    (``source.files.events.path``, ``preprocess.split_dates``) are both given, so every row sees the same split."""

    data: Path
    validation_from: date
    test_from: date
    until: date | None
    """The test window's first day out (None: the end of the log)."""

    @property
    def data_name(self) -> str:
        """The data file as the pipeline (run from the repository's root) and the JSON line name it: relative to
        the repository inside it, as the reader config writes it (so a run of the default file keeps its ingest)."""
        path = self.data.resolve()
        return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)

    def pipeline_overrides(self) -> list[str]:
        """``--set`` values that point the pipeline at this file and split it at these days."""
        return [f"source.files.events.path={json.dumps(self.data_name)}",
                f"preprocess.split_dates={{validation: {self.validation_from}, test: {self.test_from}}}"]


def read_purchases(path: Path) -> pd.DataFrame:
    """The cleaned purchase lines (the reader config's row filters): ``shopper``, ``product``, ``order``, ``ts``.

    Ids are read as the CSV writes them (``CustomerID`` ``17850.0``), as the reader reads them."""
    raw = pd.read_csv(path, dtype={"InvoiceNo": str, "StockCode": str, "CustomerID": str},
                      usecols=["InvoiceNo", "StockCode", "Quantity", "InvoiceDate", "UnitPrice", "CustomerID"])
    kept = raw[~raw["InvoiceNo"].str.startswith("C") & raw["CustomerID"].notna() & (raw["Quantity"] > 0)
               & (raw["UnitPrice"] > 0) & raw["StockCode"].str.match(r"^[0-9]{5}")]
    return pd.DataFrame({"shopper": kept["CustomerID"].to_numpy(), "product": kept["StockCode"].to_numpy(),
                         "order": kept["InvoiceNo"].to_numpy(),
                         "ts": pd.to_datetime(kept["InvoiceDate"], format="%Y-%m-%d %H:%M:%S").to_numpy()})


@dataclass(eq=False)
class Task:
    """One window of the protocol: the history before ``cutoff``, the shoppers to rank for and their truth."""

    name: str
    cutoff: pd.Timestamp
    history: pd.DataFrame
    """The purchase lines before the cut-off: what every row may learn from."""
    shoppers: list[str]
    truth: list[set[str]]

    @cached_property
    def products(self) -> np.ndarray:
        """The products of the history, in sorted order: the columns of every matrix below."""
        return np.unique(self.history["product"].to_numpy())

    @cached_property
    def history_shoppers(self) -> np.ndarray:
        """The shoppers of the history, in sorted order: the rows of :meth:`matrix`."""
        return np.unique(self.history["shopper"].to_numpy())

    @cached_property
    def matrix(self) -> sp.csr_matrix:
        """Binary shoppers x products matrix of the history."""
        return user_matrix(self.history["shopper"].to_numpy(), self.columns(self.history["product"]),
                           len(self.products))

    @cached_property
    def rows(self) -> np.ndarray:
        """The row of :meth:`matrix` of each shopper to rank for (each one has a history)."""
        return np.searchsorted(self.history_shoppers, self.shoppers)

    def columns(self, products: pd.Series) -> np.ndarray:
        return np.searchsorted(self.products, products.to_numpy())

    def popularity(self, count: str, days: float | None = None) -> np.ndarray:
        """Product columns by purchase lines (``events``) or distinct shoppers, over the last ``days`` before the
        cut-off (None: all the history), most first; products never bought then are not listed."""
        lines = self.history if days is None else self.history[self.history["ts"] >= self.cutoff - pd.Timedelta(days=days)]
        if count == "shoppers":
            lines = lines.drop_duplicates(["shopper", "product"])
        counts = np.bincount(self.columns(lines["product"]), minlength=len(self.products))
        return np.argsort(-counts, kind="stable")[: int((counts > 0).sum())]


def window(purchases: pd.DataFrame, name: str, start: date, end: date | None) -> Task:
    """The task of the window from ``start`` to ``end`` (None: the end of the log), history everything before."""
    cutoff = pd.Timestamp(start)
    history = purchases[purchases["ts"] < cutoff]
    later = purchases[(purchases["ts"] >= cutoff) & ((purchases["ts"] < pd.Timestamp(end)) if end else True)]
    later = later[later["shopper"].isin(set(history["shopper"]))]
    truth = later.groupby("shopper")["product"].agg(set)
    return Task(name, cutoff, history, truth.index.tolist(), truth.tolist())


Ranked = list[list[str]]
"""Per shopper of a task, in its order: the products recommended, best first."""


def listed(task: Task, columns: np.ndarray) -> Ranked:
    return [[task.products[c] for c in row] for row in columns]


def filled(personal: list[np.ndarray], fallback: np.ndarray) -> np.ndarray:
    """Each shopper's columns topped up to :data:`K` from ``fallback`` (without repeating one)."""
    out = np.empty((len(personal), K), np.int64)
    for i, own in enumerate(personal):
        own = own[:K]
        extra = fallback[~np.isin(fallback, own)][: K - len(own)]
        out[i] = np.concatenate([own, extra])
    return out


def score_top(scores: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """The :data:`K` best columns of each row of ``scores`` among the positive ones, filled from ``fallback``."""
    best = top_k(scores, None)
    return filled([row[scores[i, row] > 0] for i, row in enumerate(best)], fallback)


def popularity(task: Task, params: dict[str, Any]) -> Ranked:
    return listed(task, np.tile(task.popularity(params["count"])[:K], (len(task.shoppers), 1)))


def recent_popularity(task: Task, params: dict[str, Any]) -> Ranked:
    return listed(task, np.tile(task.popularity(params["count"], params["days"])[:K], (len(task.shoppers), 1)))


def own_most_bought(task: Task, params: dict[str, Any]) -> Ranked:
    """The shopper's products by orders holding them, ties to the latest bought; filled with recent popularity."""
    own = task.history[task.history["shopper"].isin(set(task.shoppers))]
    per_product = own.groupby(["shopper", "product"]).agg(orders=("order", "nunique"), last=("ts", "max")).reset_index()
    per_product = per_product.sort_values(["shopper", "orders", "last"], ascending=[True, False, False], kind="stable")
    ranked = {s: task.columns(g["product"]) for s, g in per_product.groupby("shopper", sort=False)}
    fallback = task.popularity(params["count"], params["days"])
    return listed(task, filled([ranked[s] for s in task.shoppers], fallback))


def decayed_vectors(task: Task, decay: float) -> sp.csr_matrix:
    """TIFU-KNN's shopper vectors: each order's binary product vector weighted ``decay ** age`` (age 0: the
    shopper's latest order), averaged with those weights; a row per history shopper."""
    orders = task.history.drop_duplicates(["order", "product"])
    order_ts = orders.groupby(["shopper", "order"])["ts"].min().reset_index()
    order_ts["age"] = order_ts.groupby("shopper")["ts"].rank(method="first", ascending=False) - 1
    order_ts["weight"] = decay ** order_ts["age"]
    order_ts["weight"] /= order_ts.groupby("shopper")["weight"].transform("sum")
    lines = orders.merge(order_ts[["order", "weight"]], on="order")
    rows = np.searchsorted(task.history_shoppers, lines["shopper"].to_numpy())
    return sp.csr_matrix((lines["weight"].to_numpy(), (rows, task.columns(lines["product"]))),
                         shape=(len(task.history_shoppers), len(task.products)))


@lru_cache(maxsize=1)
def tifu_scores(task: Task, decay: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each shopper's own decayed vector and the mean of their ``k`` nearest shoppers' (cosine, themselves out);
    kept for the next call (the grid tries every ``alpha`` of one ``decay`` and ``k`` in a row)."""
    vectors = decayed_vectors(task, decay)
    norms = np.sqrt(np.asarray(vectors.multiply(vectors).sum(axis=1))).ravel()
    unit = sp.diags(1.0 / np.maximum(norms, 1e-12)) @ vectors
    similarity = (unit[task.rows] @ unit.T).toarray()
    similarity[np.arange(len(task.rows)), task.rows] = -np.inf
    nearest = np.argpartition(-similarity, k, axis=1)[:, :k]
    pick = sp.csr_matrix((np.full(nearest.size, 1.0 / k), (np.repeat(np.arange(len(task.rows)), k), nearest.ravel())),
                         shape=(len(task.rows), vectors.shape[0]))
    return vectors[task.rows].toarray(), (pick @ vectors).toarray()


def tifu_knn(task: Task, params: dict[str, Any]) -> Ranked:
    own, neighbours = tifu_scores(task, params["decay"], params["k"])
    fallback = task.popularity(params["count"], params["days"])
    return listed(task, score_top(params["alpha"] * own + (1 - params["alpha"]) * neighbours, fallback))


@lru_cache(maxsize=1)
def task_ease_weights(task: Task, l2: float) -> np.ndarray:
    """EASE's weights on the task's history, kept for the next call (the grid tries both ``exclude_seen``)."""
    return ease_weights(task.matrix, l2)


def ease(task: Task, params: dict[str, Any]) -> Ranked:
    history = task.matrix[task.rows]
    scores = history @ task_ease_weights(task, params["l2"])
    return listed(task, top_k(scores, history if params["exclude_seen"] else None))


@lru_cache(maxsize=1)
def task_als(task: Task, factors: int, regularization: float, alpha: float) -> Any:
    """ALS fitted on the task's history, kept for the next call (the grid tries both ``exclude_seen``)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):
        return fit_als(task.matrix, {"factors": factors, "regularization": regularization, "alpha": alpha})


def als(task: Task, params: dict[str, Any]) -> Ranked:
    model = task_als(task, params["factors"], params["regularization"], params["alpha"])
    ranked, _ = model.recommend(task.rows, task.matrix[task.rows], N=K, filter_already_liked_items=params["exclude_seen"])
    return listed(task, ranked)


@dataclass
class Baseline:
    """A baseline's row label, ranking, grid of hyperparameters (tuned on validation), and which earlier
    baseline's choice it inherits (the repeat baselines' fill: recent popularity's)."""

    label: str
    rank: Callable[[Task, dict[str, Any]], Ranked]
    grid: list[dict[str, Any]]
    inherits: str | None = None


BASELINES: dict[str, Baseline] = {
    "popularity": Baseline("popularity", popularity, POPULARITY_GRID),
    "recent": Baseline("recent popularity", recent_popularity, RECENT_GRID),
    "own": Baseline("own most-bought (filled: recent popularity)", own_most_bought, [{}], "recent"),
    "tifu": Baseline("TIFU-KNN (decayed repeat + neighbours)", tifu_knn, TIFU_GRID, "recent"),
    "ease": Baseline("EASE", ease, EASE_GRID),
    "als": Baseline("implicit ALS", als, ALS_GRID),
}


def per_shopper(task: Task, ranked: Ranked) -> dict[str, np.ndarray]:
    """Each metric of each shopper's list against their truth."""
    metrics = {"ndcg@10": ndcg_at_k, "recall@10": recall_at_k, "hit_rate@10": hit_rate_at_k}
    return {name: np.array([fn(r, {p: 1 for p in truth}, K) for r, truth in zip(ranked, task.truth)])
            for name, fn in metrics.items()}


def tuned(baseline: Baseline, validation: Task, inherited: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """The grid point with the best validation NDCG@10 (the first of equals), and that NDCG@10."""
    scores = [per_shopper(validation, baseline.rank(validation, {**inherited, **p}))["ndcg@10"].mean()
              for p in baseline.grid]
    best = int(np.argmax(scores))
    return {**inherited, **baseline.grid[best]}, float(scores[best])


def run_baselines(validation: Task, test: Task, names: list[str]) -> Iterator[tuple[str, Ranked, dict[str, Any]]]:
    """The baselines ``names`` (keys of :data:`BASELINES`, and the ones they inherit from) in table order, each
    tuned on ``validation`` then run on ``test``: its label, test lists and what it chose."""
    wanted = set(names) | {BASELINES[n].inherits for n in names if BASELINES[n].inherits}
    chosen: dict[str, dict[str, Any]] = {}
    for name, baseline in BASELINES.items():
        if name not in wanted:
            continue
        start_s = time.perf_counter()
        params, validation_ndcg = tuned(baseline, validation, chosen.get(baseline.inherits, {}))
        chosen[name] = params
        ranked = baseline.rank(test, params)
        yield baseline.label, ranked, {"params": params, "validation_ndcg@10": round(validation_ndcg, 4),
                                       "grid": len(baseline.grid), "seconds": round(time.perf_counter() - start_s, 1)}


def baseline_names(text: str) -> list[str]:
    """``--baselines``' comma-separated keys, each checked."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BASELINES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown baseline(s) {unknown or text!r}: choose among {', '.join(BASELINES)}")
    return names


def system_ranked(config_arg: str, overrides: list[str], part: Slice, purchases: pd.DataFrame, test: Task,
                  pipeline: bool) -> tuple[Ranked, dict[str, Any]]:
    """The system's lists for the test shoppers: the pipeline run on ``config_arg`` with ``part``'s file and split
    days (``overrides`` after them; ``pipeline``: run it first), loaded as a Serve variant replica loads it, with
    the event log of a server started at the cut-off, asked through the variant's request path
    (:class:`~shoprank.recsys.answer.VariantPipeline`) in process."""
    from shoprank.config import load_config
    from shoprank.privacy import serving_pseudonyms
    from shoprank.recsys.answer import VariantPipeline
    from shoprank.recsys.booster import load_ranker
    from shoprank.recsys.context import load_context
    from shoprank.recsys.messages import Asked
    from shoprank.store.run import Run

    overrides = [*part.pipeline_overrides(), *overrides]
    if pipeline:
        run_pipeline(config_arg, overrides)
    config = load_config(config_arg, overrides)
    split_dates = config.preprocess.split_dates
    if split_dates is None or (split_dates.validation, split_dates.test) != (part.validation_from, part.test_from):
        raise SystemExit(f"{config_arg}: preprocess.split_dates must be {{validation: {part.validation_from}, test: "
                         f"{part.test_from}}} (the windows' first days), so the pipeline validates and learns as the "
                         f"baselines do; --set made it {split_dates}")
    run = Run.for_config(config)
    cutoff_s = test.cutoff.tz_localize("UTC").timestamp()
    context = load_context(config, run, history_until_s=cutoff_s, encoder=False)
    variant = VariantPipeline(context, "ranker", load_ranker(run.local_path("ranker", "model")))
    users = [serving_pseudonyms(config, [run.uri()]).of(s) for s in test.shoppers]
    checked = history_check(context.events.histories, context.catalogue.stats.product_ids, users, purchases, test,
                            cutoff_s)
    answered = variant.answer_many([Asked(u, [], None, K, cutoff_s) for u in users])
    return [[item.product_id for item in a.items] for a in answered], {
        "run": run.uri(), "config": config_arg, "history_events_limit": config.features.history_events,
        "mean_history_events_seen": round(float(np.mean([a.history_events for a in answered])), 1), **checked}


def history_check(histories: dict[str, Any], product_ids: list[str], users: list[str], purchases: pd.DataFrame,
                  test: Task, cutoff_s: float) -> dict[str, int]:
    """Raise unless every test shopper's event log in the run holds exactly their purchases of the cleaned data
    before the cut-off (as distinct product and time pairs, of the run's catalogue's products): no test-window
    event leaks into the history, and none before the cut-off is missing."""
    catalogue = set(product_ids)
    before = test.history[test.history["product"].isin(catalogue)]
    expected = {s: set(zip(g["product"], g["ts"].dt.tz_localize("UTC").map(pd.Timestamp.timestamp)))
                for s, g in before.groupby("shopper")}
    differ = 0
    for shopper, user in zip(test.shoppers, users):
        known = histories.get(user)
        logged = set() if known is None else {(product_ids[r], float(t)) for r, t in zip(known.product_rows, known.ts_s)}
        if any(t >= cutoff_s for _, t in logged) or logged != expected.get(shopper, set()):
            differ += 1
    if differ:
        raise SystemExit(f"{differ} of {len(users)} test shoppers' event logs in the run differ from their purchases "
                         "before the cut-off in the cleaned data: the run was not made from this data with these "
                         "row filters and ids")
    return {"histories_checked": len(users), "products_outside_catalogue_after_cutoff":
            int((~purchases[purchases["ts"] >= test.cutoff]["product"].isin(catalogue)).sum())}


def day(text: str) -> date:
    """A window's day on the command line (YYYY-MM-DD), checked."""
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day (YYYY-MM-DD)") from None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the Online Retail CSV (gzip), or a slice of it")
    parser.add_argument("--validation-from", type=day, default=VALIDATION_FROM,
                        help=f"the validation window's first day (default {VALIDATION_FROM})")
    parser.add_argument("--test-from", type=day, default=TEST_FROM,
                        help=f"the test window's first day, the validation window's first day out "
                        f"(default {TEST_FROM})")
    parser.add_argument("--until", type=day, help="the test window's first day out (default: the end of the log)")
    parser.add_argument("--baselines", type=baseline_names, default=list(BASELINES),
                        help=f"comma-separated, among {','.join(BASELINES)} (default: all; one that fills from "
                        "another brings it along)")
    parser.add_argument("--system", action="store_true", help="also the system's row (a pipeline run)")
    parser.add_argument("--config", default=READER_CONFIG, help="the system's pipeline config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="pipeline config override")
    parser.add_argument("--no-pipeline", action="store_true", help="use the config's run as it is")
    parser.add_argument("--json", help="also write the JSON line to this file")
    args = parser.parse_args()
    part = Slice(args.data, args.validation_from, args.test_from, args.until)
    if not part.validation_from < part.test_from < (part.until or date.max):
        parser.error(f"the days must follow each other: --validation-from {part.validation_from} < --test-from "
                     f"{part.test_from} < --until {part.until}")
    if not args.data.exists():
        raise SystemExit(f"{args.data}: no such file (the Online Retail copy, benchmarks/data/online-retail/)")
    purchases = read_purchases(args.data)
    validation = window(purchases, "validation", part.validation_from, part.test_from)
    test = window(purchases, "test", part.test_from, part.until)
    for task in (validation, test):
        if not task.shoppers:
            raise SystemExit(f"{args.data}: no shopper bought in the {task.name} window and before it: choose "
                             "other days (--validation-from, --test-from, --until)")
    rows: dict[str, dict[str, np.ndarray]] = {}
    chosen: dict[str, Any] = {}
    for name, ranked, detail in run_baselines(validation, test, args.baselines):
        rows[name], chosen[name] = per_shopper(test, ranked), detail
        print(f"{name}: {rows[name]['ndcg@10'].mean():.4f}, chose {detail['params']} ({detail['seconds']} s)",
              flush=True)
    if args.system:
        ranked, chosen[SYSTEM] = system_ranked(args.config, args.set, part, purchases, test, not args.no_pipeline)
        rows[SYSTEM] = per_shopper(test, ranked)
    figures = report(part, purchases, validation, test, rows)
    figures["chosen"] = chosen
    line = json.dumps(figures, sort_keys=True, default=str)
    if args.json:
        Path(args.json).write_text(line + "\n")
    print(line, flush=True)
    return 0


def counts(purchases: pd.DataFrame, validation: Task, test: Task) -> dict[str, int]:
    """The protocol's counts: the cleaned data, and each window's shoppers and truth."""
    return {"purchase_lines": len(purchases), "shoppers": purchases["shopper"].nunique(),
            "products": purchases["product"].nunique(), "orders": purchases["order"].nunique(),
            "validation_shoppers": len(validation.shoppers), "test_shoppers": len(test.shoppers),
            "test_truth_products": sum(len(t) for t in test.truth),
            "test_history_lines": len(test.history), "test_history_products": len(test.products)}


def report(part: Slice, purchases: pd.DataFrame, validation: Task, test: Task,
           rows: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """Print the table (each row's means with 95% intervals; the system's paired NDCG@10 difference from each
    baseline); return the figures for the JSON line."""
    figures: dict[str, Any] = {"data": part.data_name, "counts": counts(purchases, validation, test),
                               "rows": {}, "system_minus": {}}
    print(f"\nOnline Retail, test window {part.test_from} to {part.until or 'the end'}: "
          f"{len(test.shoppers):,} shoppers "
          f"({sum(len(t) for t in test.truth):,} products bought), 95% bootstrap intervals over shoppers")
    width = max(len(n) for n in rows) + 2
    print(f"{'row':<{width}}" + "".join(f"{m:>24}" for m in METRICS) + "   system - row (NDCG@10)")
    for name, values in rows.items():
        intervals = {m: bootstrap_mean(values[m]) for m in METRICS}
        figures["rows"][name] = {m: {"mean": round(v[0], 4), "ci95": [round(v[1], 4), round(v[2], 4)]}
                                 for m, v in intervals.items()} | {"shoppers": len(values["ndcg@10"])}
        text = f"{name:<{width}}" + "".join(f"{v[0]:>8.4f} [{v[1]:.3f}, {v[2]:.3f}]" for v in intervals.values())
        if SYSTEM in rows and name != SYSTEM:
            mean, low, high = bootstrap_mean(rows[SYSTEM]["ndcg@10"] - values["ndcg@10"])
            figures["system_minus"][name] = {"mean": round(mean, 4), "ci95": [round(low, 4), round(high, 4)]}
            text += f"   {mean:+.4f} [{low:+.4f}, {high:+.4f}]"
        print(text)
    return figures


if __name__ == "__main__":
    sys.exit(main())
