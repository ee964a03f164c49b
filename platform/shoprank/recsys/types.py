"""The request path's types: a user's history, a request's candidates, the catalogue's product statistics.

Plain data shared by retrieval (:mod:`.retrieval`), the features (:mod:`.features`) and the
ranking context (:mod:`.context`): one definition, so a candidate means the same offline and online.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from shoprank.data.schema import ENGAGEMENT_TYPES

SOURCES = ("dense", "lexical", "coengaged", "popular", "collaborative", "repeat")
"""Candidate sources, as bits of :attr:`Candidates.sources` (bit i = ``SOURCES[i]``)."""

EXCLUSION = ("ranker", "exclusion.json")
"""Where the features stage records whether recommendations leave out what a shopper bought
(:class:`shoprank.recsys.context.ExclusionDecision`): every later reader of the run (the evaluation, Serve)
follows it."""

VISIT_GAP_S = 30 * 60.0
"""Events further apart than this belong to different visits for ``cf_recent``: fixed, like the readers'
default ``session_id.gap_minutes``, so the feature means the same whatever a file's sessions were cut by."""


@dataclass
class ProductStats:
    """Per product (aligned with the catalogue order): static attributes and pre-cut-off statistics."""

    product_ids: list[str]
    category: np.ndarray
    department: np.ndarray
    brand: np.ndarray
    brand_group: np.ndarray
    """The brand's code for the diversity rule: :data:`~shoprank.recsys.diversity.NO_GROUP` for a product without
    one (``brand`` gives those one shared code, a feature value)."""
    brand_names: list[str]
    """The brand of each ``brand_group`` code."""
    log_price: np.ndarray
    price_in_category: np.ndarray
    """Missing (NaN) for a product without a category: there is no category to compare with."""
    popularity: np.ndarray
    """log(1 + engagements)."""
    popularity_shoppers: np.ndarray
    """log(1 + distinct shoppers who engaged)."""
    repeat_rate: np.ndarray
    """Share of the product's buyers who bought it again (on another occasion); NaN without buyers."""
    ctr: np.ndarray
    conversion: np.ndarray
    cutoff_s: float
    """The cut-off (epoch seconds): no event at or after it is counted above."""
    has_category: np.ndarray
    """Whether each product has a category (``category`` gives those without one a shared code, which no
    category feature or source may treat as a category of its own)."""
    has_brand: np.ndarray
    """Whether each product has a brand (the same, for ``brand``)."""
    row_of: dict[str, int] = field(init=False)
    rank_in_category: np.ndarray = field(init=False)
    """0-based rank of each product by popularity within its category (ties: catalogue order)."""

    def __post_init__(self) -> None:
        self.row_of = {p: i for i, p in enumerate(self.product_ids)}
        self.rank_within_categories()

    def rank_within_categories(self, alive: np.ndarray | None = None) -> None:
        """Set :attr:`rank_in_category`; ``alive`` (a live catalogue's listed products, None: all) puts withdrawn
        products after every listed one of their category, so a listed product's rank is the one a catalogue built
        without the withdrawn ones gives it."""
        withdrawn = np.zeros(len(self.popularity), bool) if alive is None else ~alive
        order = np.lexsort((np.arange(len(self.popularity)), -self.popularity, withdrawn, self.category))
        starts = np.searchsorted(self.category[order], self.category[order], side="left")
        self.rank_in_category = np.empty(len(order), np.int64)
        self.rank_in_category[order] = np.arange(len(order)) - starts

    def price_within_categories(self, alive: np.ndarray) -> None:
        """Set :attr:`price_in_category` against the median log price of each category's listed (``alive``)
        products, as :func:`~shoprank.recsys.features.product_stats` sets it over a catalogue of those products."""
        median = pd.Series(self.log_price[alive]).groupby(self.category[alive]).median()
        of_row = median.reindex(self.category).to_numpy(np.float64)
        self.price_in_category = np.where(self.has_category, self.log_price - of_row, np.nan)

    def append_unseen(self, product_ids: list[str]) -> np.ndarray:
        """Rows for products no event of the run names (put live), with the statistics
        :func:`~shoprank.recsys.features.product_stats` gives such a product: no engagement (``log1p(0)``), and
        every rate missing, never a ratio over zero. Their attributes are set by :meth:`describe`; returns the
        new rows."""
        start, count = len(self.product_ids), len(product_ids)
        self.product_ids.extend(product_ids)
        self.row_of.update({p: start + i for i, p in enumerate(product_ids)})
        zeros, missing = np.zeros(count), np.full(count, np.nan)
        for name in ("popularity", "popularity_shoppers", "log_price", "price_in_category"):
            setattr(self, name, np.concatenate([getattr(self, name), zeros]))
        for name in ("repeat_rate", "ctr", "conversion"):
            setattr(self, name, np.concatenate([getattr(self, name), missing]))
        for name in ("category", "department", "brand", "brand_group"):
            setattr(self, name, np.concatenate([getattr(self, name), np.zeros(count, np.int64)]))
        for name in ("has_category", "has_brand"):
            setattr(self, name, np.concatenate([getattr(self, name), np.zeros(count, bool)]))
        self.rank_in_category = np.concatenate([self.rank_in_category, np.zeros(count, np.int64)])
        return np.arange(start, start + count)

    def describe(self, row: int, *, category: int, department: int, brand: int, brand_group: int, price: float,
                 has_category: bool, has_brand: bool) -> None:
        """Set row ``row``'s attributes (codes as :func:`~shoprank.recsys.features.product_stats` gives them);
        call :meth:`price_within_categories` and :meth:`rank_within_categories` after the last one."""
        self.category[row], self.department[row], self.brand[row] = category, department, brand
        self.brand_group[row] = brand_group
        self.log_price[row] = np.log1p(price)
        self.has_category[row], self.has_brand[row] = has_category, has_brand


@dataclass
class Listing:
    """What an answer shows of each product (catalogue order): a live catalogue's change shows in the answer
    ranked with it, without waiting for anything else to learn of it."""

    title: list[str]
    category: list[str | None]
    brand: list[str | None]
    price: list[float]
    category_predicted: list[bool] = field(default_factory=list)
    """Whether the product's category is a prediction (ingest's, or a replica's for a product put live without one),
    not the catalogue's; a run preprocessed before the column existed has none predicted."""

    def __post_init__(self) -> None:
        if len(self.category_predicted) < len(self.title):
            self.category_predicted += [False] * (len(self.title) - len(self.category_predicted))

    @classmethod
    def of(cls, products: pa.Table) -> "Listing":
        predicted = (products.column("category_predicted").fill_null(False).to_pylist()
                     if "category_predicted" in products.column_names else [])
        return cls(*(products.column(name).to_pylist() for name in ("title", "category", "brand", "price")),
                   category_predicted=predicted)

    def shown(self, row: int) -> dict:
        """Row ``row`` as :attr:`shoprank.recsys.messages.Ranked.shown` carries it."""
        return {"title": self.title[row], "category": self.category[row], "brand": self.brand[row],
                "price": self.price[row], "category_predicted": self.category_predicted[row]}

    def put(self, row: int, title: str, category: str | None, brand: str | None, price: float,
            category_predicted: bool = False) -> None:
        """Set row ``row`` (the next row past the end: append it)."""
        if row == len(self.title):
            self.title.append(title), self.category.append(category), self.brand.append(brand)
            self.price.append(price), self.category_predicted.append(category_predicted)
        else:
            self.title[row], self.category[row], self.brand[row], self.price[row] = title, category, brand, price
            self.category_predicted[row] = category_predicted


@dataclass
class History:
    """A user's events strictly before the request, oldest first (the same object offline and online)."""

    product_rows: np.ndarray
    event_types: list[str]
    ts_s: np.ndarray

    @classmethod
    def empty(cls) -> "History":
        return cls(np.zeros(0, np.int64), [], np.zeros(0, np.float64))

    def before(self, ts_s: float, limit: int) -> "History":
        """The last ``limit`` events strictly before ``ts_s``."""
        keep = np.flatnonzero(self.ts_s < ts_s)[-limit:]
        return History(self.product_rows[keep], [self.event_types[i] for i in keep], self.ts_s[keep])

    def __len__(self) -> int:
        return len(self.product_rows)

    def last_visit(self) -> "History":
        """The events of the user's latest visit: the trailing run of events less than
        :data:`VISIT_GAP_S` apart (what the shopper was after most recently)."""
        if not len(self):
            return self
        gaps = np.diff(self.ts_s)
        start = int(np.flatnonzero(np.r_[True, gaps > VISIT_GAP_S])[-1])
        return History(self.product_rows[start:], self.event_types[start:], self.ts_s[start:])

    def engaged_rows(self) -> np.ndarray:
        """Product rows of the clicks, carts and purchases (views are what the shop chose to show)."""
        return self.product_rows[[t in ENGAGEMENT_TYPES for t in self.event_types]]

    def followed_by(self, later: "History", limit: int) -> "History":
        """This history, then ``later`` (events received since), in time order: the last ``limit``."""
        ts = np.concatenate([self.ts_s, later.ts_s])
        order = np.argsort(ts, kind="stable")[-limit:]
        types = self.event_types + later.event_types
        return History(np.concatenate([self.product_rows, later.product_rows])[order], [types[i] for i in order], ts[order])


@dataclass
class Candidates:
    """Retrieved products of one request, with what retrieval knew about each."""

    rows: np.ndarray
    cosine: np.ndarray
    bm25: np.ndarray
    sources: np.ndarray
    position: np.ndarray
    cf_score: np.ndarray | None = None
    """Item-item model score from all the user's engaged products; None for a search (retrieval computes it for
    recommendations only), whose cf features are then 0."""
    cf_recent: np.ndarray | None = None
    """The same from the engaged products of their latest visit only."""
    repeat_score: np.ndarray | None = None
    """The repeat source's score (the user's recency-decayed count of their purchases of it); None for a search."""
    recent_events: np.ndarray | None = None
    """Engagements with each candidate in the ``retrieval.trending_days`` before the request (data clock); None:
    not computed (features 0)."""
    recent_shoppers: np.ndarray | None = None
    """Distinct shoppers behind those engagements."""
