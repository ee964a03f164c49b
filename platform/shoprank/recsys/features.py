"""Ranking features: one implementation, called offline (Ray Data) and online (Serve).

:func:`compute_features` turns one request (a user's history *before* the request
time, the request time, and the retrieved candidates) into a feature matrix. The
offline job calls it for every training request inside ``map_batches``; the
serving ranker calls it for each live request. Both give identical values for the
same inputs, which a test checks.

Product statistics (:class:`ProductStats`) come only from events before the
ranker's cut-off (``features.history_fraction`` of the training period); a user's
features only from that user's events strictly before the request time. A "not
interested" is none of them: it is no engagement and no view in the statistics, and
histories hold behaviour only (the hides are exclusions, :class:`~shoprank.recsys.context.EventLog`).

| feature | meaning |
| --- | --- |
| ``cosine`` | encoder similarity of the query (search) or the user embedding (recommendation) and the product |
| ``bm25`` | BM25 score of the query against the product text (0 for recommendations) |
| ``from_dense`` | 1 when the encoder retrieval proposed the candidate |
| ``from_lexical`` | 1 when BM25 proposed it |
| ``from_coengaged`` | 1 when it was co-engaged with one of the user's recent products |
| ``from_popular`` | 1 when it came from the popular items of the user's categories (or trending) |
| ``from_collaborative`` | 1 when the item-item model (EASE) proposed it from the user's engaged products |
| ``from_repeat`` | 1 when the repeat source proposed it (the user's own purchases) |
| ``retrieval_position`` | best 1-based rank of the candidate in any source |
| ``cf_score`` | item-item model score: the sum of the candidate's weights from every product the user engaged with (0 without) |
| ``cf_recent`` | the same from the engaged products of the user's latest visit only (:meth:`History.last_visit`: what they were after just now) |
| ``cf_relative`` | ``cf_score`` over the largest absolute ``cf_score`` among the request's candidates (0 when all are 0) |
| ``popularity`` | log(1 + engagements) of the product before the cut-off |
| ``popularity_shoppers`` | log(1 + distinct shoppers who engaged with it) before the cut-off |
| ``recent_events`` | log(1 + engagements) in the ``retrieval.trending_days`` before the request, on the data's clock (:class:`~shoprank.recsys.retrieval.RecentPopularity`) |
| ``recent_shoppers`` | log(1 + distinct shoppers) in that window |
| ``repeat_rate`` | share of the product's buyers before the cut-off who bought it again on another occasion; missing without buyers |
| ``ctr`` | clicks / views, smoothed towards the log's mean with ``ctr_prior_views`` views; missing (NaN) for a product without views |
| ``conversion`` | share of the users who engaged with the product (click, cart or purchase) who bought it, smoothed the same way; missing without engaged users |
| ``log_price`` | log(1 + price) |
| ``price_vs_user`` | log price minus the median log price of the user's engaged products (0 without history) |
| ``price_in_category`` | log price minus the median log price of the product's category (cheap or premium for what it is) |
| ``price_position_vs_user`` | ``price_in_category`` minus its median over the user's engaged products: a budget shopper's premium item scores high |
| ``category_affinity`` | share of the user's weighted history in the product's category |
| ``department_affinity`` | the same for the category's parent (``Home > Kitchen`` of ``Home > Kitchen > Cookware``) |
| ``brand_affinity`` | share of the user's weighted history on the product's brand |
| ``engaged_category_share`` | share of the user's clicks, carts and purchases in the product's category (views are what the shop chose to show; engagements are what the user chose) |
| ``engaged_brand_share`` | the same for the product's brand |
| ``category_recency_days`` | days since the user's last event in the product's category (365 when never) |
| ``unseen_rank_in_category`` | 0-based popularity rank of the product in its category among the products the user has not met yet: the best new thing of a category, once its bestsellers are already theirs |
| ``user_product_events`` | the user's earlier events on this very product (a re-visit, or something already bought) |
| ``user_purchases`` | the user's earlier purchases of this product |
| ``user_engagements`` | their earlier clicks, carts and purchases of it |
| ``days_since_purchase`` | days since their last purchase of it; missing when never |
| ``days_since_engaged`` | days since their last engagement with it; missing when never |
| ``repurchase_interval_days`` | their typical re-purchase interval of it: (last - first purchase) / (occasions - 1), occasions being distinct purchase times; missing when bought on one occasion or never |
| ``purchase_due_ratio`` | ``days_since_purchase`` / ``repurchase_interval_days``: about 1 when a regular purchase is due; missing with either |
| ``repeat_score`` | the repeat source's recency-decayed count of the user's purchases of it (0 for a search) |
| ``history_length`` | number of events in the user's history |
| ``is_search`` | 1 for a search request, 0 for a recommendation |

Rates are never a ratio over a zero count: a log without impressions (a ratings-style
export of clicks and purchases) has no click-through rate, so ``ctr`` is missing
there, and XGBoost learns where missing values go instead of reading a made-up
number (a zero denominator once gave every product a ``ctr`` in the thousands).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from shoprank.data.schema import ENGAGEMENT_TYPES
from shoprank.encoder.users import EVENT_WEIGHTS
from shoprank.recsys.diversity import group_codes
from shoprank.recsys.types import SOURCES, Candidates, History, ProductStats

FEATURE_SCHEMA_VERSION = 6
"""Bumped whenever a feature is added, removed, reordered or changes meaning."""

FEATURES = [
    "cosine", "bm25", "from_dense", "from_lexical", "from_coengaged", "from_popular", "from_collaborative",
    "from_repeat", "retrieval_position", "cf_score", "cf_recent", "cf_relative",
    "popularity", "popularity_shoppers", "recent_events", "recent_shoppers", "repeat_rate",
    "ctr", "conversion", "log_price", "price_vs_user",
    "price_in_category", "price_position_vs_user", "category_affinity", "department_affinity", "brand_affinity",
    "engaged_category_share", "engaged_brand_share", "category_recency_days", "unseen_rank_in_category",
    "user_product_events", "user_purchases", "user_engagements", "days_since_purchase", "days_since_engaged",
    "repurchase_interval_days", "purchase_due_ratio", "repeat_score", "history_length", "is_search",
]

COLUMN = {name: i for i, name in enumerate(FEATURES)}
"""Feature name -> column of the matrix :func:`compute_features` returns."""

ENGAGEMENT = np.array(sorted(ENGAGEMENT_TYPES), dtype=object)
"""``ENGAGEMENT_TYPES`` as an array, for ``np.isin`` over event types."""
NEVER_DAYS = 365.0
DAY = 86_400.0


def product_stats(products: pa.Table, events: pa.Table, cutoff_s: float, prior_views: float) -> ProductStats:
    """Statistics from ``events`` strictly before ``cutoff_s`` (epoch seconds).

    ``events`` needs ``product_id``, ``event_type``, ``ts`` and ``user_id`` (conversion
    counts users, not events: in a ratings-style log a purchase is its own row, not the
    end of a click's funnel).
    """
    ids = products.column("product_id").to_pylist()
    row_of = {p: i for i, p in enumerate(ids)}
    ts_s = epoch_seconds(events.column("ts"))
    before = ts_s < cutoff_s
    kinds = np.asarray(events.column("event_type").to_numpy(zero_copy_only=False))[before]
    rows = np.array([row_of.get(p, -1) for p in np.asarray(events.column("product_id").to_numpy(zero_copy_only=False))[before]],
                    dtype=np.int64)
    users = np.asarray(events.column("user_id").to_numpy(zero_copy_only=False))[before]
    known = rows >= 0
    rows, kinds, users, ts_s = rows[known], kinds[known], users[known], ts_s[before][known]
    n = len(ids)

    def count(kind: str) -> np.ndarray:
        return np.bincount(rows[kinds == kind], minlength=n).astype(np.float64)

    def distinct_users(mask: np.ndarray) -> np.ndarray:
        pairs = pd.DataFrame({"row": rows[mask], "user": users[mask]}).drop_duplicates()
        return np.bincount(pairs["row"].to_numpy(np.int64), minlength=n).astype(np.float64)

    views, clicks, carts, purchases = count("view"), count("click"), count("add_to_cart"), count("purchase")
    engaged = np.isin(kinds, ENGAGEMENT)  # a "not interested" is no engagement (nor a view: no CTR trial)
    categories = products.column("category").to_pylist()
    brands = products.column("brand").to_pylist()
    category = _codes(categories)
    brand_group, brand_names = group_codes(brands)
    log_price = np.log1p(products.column("price").to_numpy())
    has_category = np.array([bool(c) for c in categories])
    median_in_category = pd.Series(log_price).groupby(category).transform("median").to_numpy()
    return ProductStats(
        product_ids=ids,
        category=category,
        department=_codes([department_of(c) for c in categories]),
        brand=_codes(brands),
        brand_group=brand_group,
        brand_names=brand_names,
        log_price=log_price,
        price_in_category=np.where(has_category, log_price - median_in_category, np.nan),
        popularity=np.log1p(clicks + carts + purchases),
        popularity_shoppers=np.log1p(distinct_users(engaged)),
        repeat_rate=repeat_rate(rows[kinds == "purchase"], users[kinds == "purchase"], ts_s[kinds == "purchase"], n),
        ctr=smoothed_rate(clicks, views, prior_views),
        conversion=smoothed_rate(distinct_users(kinds == "purchase"), distinct_users(engaged), prior_views),
        cutoff_s=cutoff_s,
        has_category=has_category,
        has_brand=np.array([bool(b) for b in brands]),
    )


def repeat_rate(rows: np.ndarray, users: np.ndarray, ts_s: np.ndarray, n: int) -> np.ndarray:
    """Per product (``n`` rows), the share of its buyers who bought it on more than one occasion (distinct
    purchase times: one order's repeated lines are one occasion); NaN for a product nobody bought."""
    occasions = pd.DataFrame({"row": rows, "user": users, "ts": ts_s}).drop_duplicates()
    per_buyer = occasions.groupby(["row", "user"]).size().reset_index(name="times")
    buyers = np.bincount(per_buyer["row"].to_numpy(np.int64), minlength=n).astype(np.float64)
    again = np.bincount(per_buyer["row"].to_numpy(np.int64), (per_buyer["times"] > 1).to_numpy(np.float64),
                        minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(buyers > 0, again / buyers, np.nan)


def smoothed_rate(hits: np.ndarray, trials: np.ndarray, prior_trials: float) -> np.ndarray:
    """``hits / trials`` per product, smoothed towards the pooled rate with ``prior_trials`` pseudo-trials.

    Missing (NaN) where a product has no trial: there is nothing to divide by, and a
    made-up value (the prior alone, or hits over zero) would tell the ranker something
    the log does not say. Hits beyond trials (clicks whose impressions were not
    logged) are capped, so a rate stays within [0, 1].
    """
    hits = np.minimum(hits, trials)
    tried = trials > 0
    if not tried.any():
        return np.full(len(trials), np.nan)
    pooled = hits[tried].sum() / trials[tried].sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = (hits + prior_trials * pooled) / (trials + prior_trials)
    return np.where(tried, rate, np.nan)


def epoch_seconds(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Timestamps as float epoch seconds (microsecond precision, as stored)."""
    return pc.cast(pc.cast(column, pa.timestamp("us")), pa.int64()).to_numpy(zero_copy_only=False) / 1e6


def department_of(category: str | None) -> str:
    """The parent of a category path (the path itself when it has one level)."""
    parts = [p.strip() for p in (category or "").split(">")]
    return " > ".join(parts[:-1]) if len(parts) > 1 else parts[0]


def _codes(values: list[str | None]) -> np.ndarray:
    """Dense integer codes of string values (stable: sorted order)."""
    code = {v: i for i, v in enumerate(sorted({v or "" for v in values}))}
    return np.array([code[v or ""] for v in values], dtype=np.int64)


def compute_features(
    candidates: Candidates, history: History, now_s: float, stats: ProductStats, is_search: bool
) -> np.ndarray:
    """The feature matrix (candidates x :data:`FEATURES`, float32) of one request."""
    rows = candidates.rows
    n = len(rows)
    out = np.zeros((n, len(FEATURES)), dtype=np.float32)
    if not n:  # e.g. a shopper who already bought everything a recommendation could propose
        return out
    out[:, COLUMN["cosine"]] = candidates.cosine
    out[:, COLUMN["bm25"]] = candidates.bm25
    for bit, source in enumerate(SOURCES):
        out[:, COLUMN[f"from_{source}"]] = (candidates.sources >> bit) & 1
    out[:, COLUMN["retrieval_position"]] = candidates.position
    if candidates.cf_score is not None:
        out[:, COLUMN["cf_score"]] = candidates.cf_score
        out[:, COLUMN["cf_recent"]] = candidates.cf_recent
        scale = np.abs(candidates.cf_score).max()
        if scale > 0:
            out[:, COLUMN["cf_relative"]] = candidates.cf_score / scale
    if candidates.repeat_score is not None:
        out[:, COLUMN["repeat_score"]] = candidates.repeat_score
    if candidates.recent_events is not None:
        out[:, COLUMN["recent_events"]] = np.log1p(candidates.recent_events)
        out[:, COLUMN["recent_shoppers"]] = np.log1p(candidates.recent_shoppers)
    out[:, COLUMN["popularity"]] = stats.popularity[rows]
    out[:, COLUMN["popularity_shoppers"]] = stats.popularity_shoppers[rows]
    out[:, COLUMN["repeat_rate"]] = stats.repeat_rate[rows]
    out[:, COLUMN["ctr"]] = stats.ctr[rows]
    out[:, COLUMN["conversion"]] = stats.conversion[rows]
    out[:, COLUMN["log_price"]] = stats.log_price[rows]
    out[:, COLUMN["price_in_category"]] = stats.price_in_category[rows]
    out[:, COLUMN["history_length"]] = len(history)
    out[:, COLUMN["is_search"]] = float(is_search)
    out[:, COLUMN["category_recency_days"]] = NEVER_DAYS
    out[:, COLUMN["unseen_rank_in_category"]] = _unseen_rank(stats, rows, history.product_rows)
    if len(history):
        weights = np.array([EVENT_WEIGHTS[t] for t in history.event_types])
        total = weights.sum()
        seen_categories = stats.category[history.product_rows]
        seen_brands = stats.brand[history.product_rows]
        category_weight = np.bincount(seen_categories, weights, minlength=stats.category.max() + 1) / total
        brand_weight = np.bincount(seen_brands, weights, minlength=stats.brand.max() + 1) / total
        out[:, COLUMN["category_affinity"]] = category_weight[stats.category[rows]]
        department_weight = np.bincount(stats.department[history.product_rows], weights,
                                        minlength=stats.department.max() + 1) / total
        out[:, COLUMN["department_affinity"]] = department_weight[stats.department[rows]]
        out[:, COLUMN["brand_affinity"]] = brand_weight[stats.brand[rows]]
        engaged = [i for i, t in enumerate(history.event_types) if t in ENGAGEMENT_TYPES]
        if engaged:
            engaged_rows = history.product_rows[engaged]
            out[:, COLUMN["engaged_category_share"]] = _share(stats.category[engaged_rows], stats.category[rows])
            out[:, COLUMN["engaged_brand_share"]] = _share(stats.brand[engaged_rows], stats.brand[rows])
        band = history.product_rows[engaged] if engaged else history.product_rows
        out[:, COLUMN["price_vs_user"]] = stats.log_price[rows] - np.median(stats.log_price[band])
        out[:, COLUMN["price_position_vs_user"]] = stats.price_in_category[rows] - _median_known(
            stats.price_in_category[band])
        last_seen = np.full(stats.category.max() + 1, -np.inf)
        np.maximum.at(last_seen, seen_categories, history.ts_s)
        days = (now_s - last_seen[stats.category[rows]]) / DAY
        out[:, COLUMN["category_recency_days"]] = np.where(np.isfinite(days), np.minimum(days, NEVER_DAYS), NEVER_DAYS)
        out[:, COLUMN["user_product_events"]] = np.bincount(history.product_rows, minlength=len(stats.product_ids))[rows]
    _own_history(out, rows, history, now_s, len(stats.product_ids))
    out[np.ix_(~stats.has_category[rows], CATEGORY_COLUMNS)] = np.nan
    out[np.ix_(~stats.has_brand[rows], BRAND_COLUMNS)] = np.nan
    return out


def _own_history(out: np.ndarray, rows: np.ndarray, history: History, now_s: float, size: int) -> None:
    """The user's own purchases and engagements of each candidate: counts, recency, re-purchase rhythm.
    Missing (NaN), not a made-up number, where the user never did it or bought it on one occasion only."""
    kinds = np.array(history.event_types, dtype=object)
    for name, mask in (("purchase", kinds == "purchase"), ("engaged", np.isin(kinds, ENGAGEMENT))):
        own, ts = history.product_rows[mask], history.ts_s[mask]
        latest = np.full(size, -np.inf)
        np.maximum.at(latest, own, ts)
        out[:, COLUMN["user_purchases" if name == "purchase" else "user_engagements"]] = np.bincount(
            own, minlength=size)[rows]
        days = (now_s - latest[rows]) / DAY
        out[:, COLUMN[f"days_since_{name}"]] = np.where(np.isfinite(days), days, np.nan)
    bought = kinds == "purchase"
    interval = np.full(size, np.nan)
    if bought.any():
        # occasions: distinct (product, time) pairs, sorted by product then time (one order's lines are one)
        occasions = np.unique(np.stack([history.product_rows[bought].astype(np.float64), history.ts_s[bought]]), axis=1)
        products, first, count = np.unique(occasions[0].astype(np.int64), return_index=True, return_counts=True)
        last = occasions[1][first + count - 1]
        again = count > 1
        interval[products[again]] = (last - occasions[1][first])[again] / (count[again] - 1) / DAY
    out[:, COLUMN["repurchase_interval_days"]] = interval[rows]
    with np.errstate(invalid="ignore", divide="ignore"):
        due = out[:, COLUMN["days_since_purchase"]] / out[:, COLUMN["repurchase_interval_days"]]
    out[:, COLUMN["purchase_due_ratio"]] = np.where(np.isfinite(due), due, np.nan)


CATEGORY_FEATURES: tuple[str, ...] = (
    "price_in_category", "price_position_vs_user", "category_affinity", "department_affinity",
    "engaged_category_share", "category_recency_days", "unseen_rank_in_category",
)
"""Features of a product's category: missing (NaN, which XGBoost routes as missing) for a product without one."""

BRAND_FEATURES: tuple[str, ...] = ("brand_affinity", "engaged_brand_share")
"""Features of a product's brand: missing for a product without one."""

CATEGORY_COLUMNS = [COLUMN[name] for name in CATEGORY_FEATURES]
BRAND_COLUMNS = [COLUMN[name] for name in BRAND_FEATURES]


def _median_known(values: np.ndarray) -> float:
    """The median of the values that are not missing (NaN when none is: a product without a category)."""
    known = values[~np.isnan(values)]
    return float(np.median(known)) if len(known) else np.nan


def _unseen_rank(stats: ProductStats, rows: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Each candidate's rank in its category less the ``seen`` products of that category ranked above it."""
    size = len(stats.product_ids)
    seen = np.unique(seen)
    keys = np.sort(stats.category[seen] * size + stats.rank_in_category[seen])
    own = stats.category[rows] * size + stats.rank_in_category[rows]
    ahead = np.searchsorted(keys, own, side="left") - np.searchsorted(keys, stats.category[rows] * size, side="left")
    return stats.rank_in_category[rows] - ahead


def _share(seen: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """The fraction of ``seen`` codes equal to each candidate's code."""
    counts = np.bincount(seen, minlength=int(max(seen.max(), candidates.max())) + 1)
    return counts[candidates] / len(seen)
