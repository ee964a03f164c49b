"""One variant's answer path, free of Ray: query encoding -> retrieval -> ranking, and live events.

:func:`answer_many` answers a batch of requests (:class:`Asked`) from their query
vectors: the one implementation that Serve's per-variant deployment
(:class:`shoprank.serving.variant_deployments.Variant`, a batch of concurrent requests) and
:class:`VariantPipeline` (one process: tests, the benchmark's in-process baseline) both call.

* :class:`Retrieval` holds a run's :class:`RankingContext` (catalogue, index, BM25,
  the run's event log). A user's history is the run's events before the request
  followed by the events received live since (:meth:`Retrieval.history`), so an
  event shows in the very next answer. What the user hid ("not interested": the run's
  hides and the live ones, :meth:`Retrieval.blocked`) no source may propose, in a
  search or a recommendation alike.
* :class:`Ranking` turns candidates into the features the offline rows were built
  with (:func:`shoprank.recsys.features.compute_features`) and orders them: by the
  XGBoost ranker (strategy ``ranker``), or, for the strategies that need no trained
  ranker, by a sum of terms (:data:`SCORE_TERMS`): ``retrieval`` by
  ``cosine + 0.01 * bm25 + w * popularity``, ``content`` by ``cosine`` alone,
  ``collaborative`` by ``cf_score + 0.01 * bm25 + w * popularity`` (the item-item score
  in the encoder's place). Which candidates each strategy ranks is retrieval's
  (:data:`shoprank.recsys.retrieval.STRATEGY_SOURCES`).
  Several requests are scored in one ``predict`` call (:meth:`Ranking.rank_many`), and
  the items shown are explained in one more: each score's parts (the ranker's SHAP
  values, ``pred_contribs``; the baseline's terms), which add up to the score, so a card
  says what moved an item up rather than listing raw feature values.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import xgboost

from shoprank.config import Config
from shoprank.data.schema import NEGATIVE_EVENT_TYPES
from shoprank.recsys.booster import predict
from shoprank.recsys.context import RankingContext
from shoprank.recsys.diversity import NO_GROUP, BrandsNamed, Diversity
from shoprank.recsys.explore import Exploration
from shoprank.recsys.features import COLUMN, FEATURES, compute_features
from shoprank.recsys.live import LiveCatalogue
from shoprank.recsys.messages import BASE, OTHER, Answered, Asked, LiveEvent, Ranked, Strategy
from shoprank.recsys.retrieval import STRATEGY_SOURCES, retrieve
from shoprank.data.text import normalize_query
from shoprank.recsys.types import Candidates, History, Listing, ProductStats
from shoprank.store.events import CatalogueChange


POPULARITY_WEIGHT = None
"""Stands for ``serve.baseline_popularity_weight`` in :data:`SCORE_TERMS`."""
SCORE_TERMS: dict[str, tuple[tuple[str, float | None], ...]] = {
    "retrieval": (("cosine", 1.0), ("bm25", 0.01), ("popularity", POPULARITY_WEIGHT)),
    "content": (("cosine", 1.0),),
    "collaborative": (("cf_score", 1.0), ("bm25", 0.01), ("popularity", POPULARITY_WEIGHT)),
}
"""Each strategy without a trained ranker: its score's terms, (feature, weight), which its answers' contributions
name. Ties go to the more popular product (:meth:`Ranking._scored`)."""


@dataclass
class Retrieved:
    """What retrieval hands to ranking for one request."""

    candidates: Candidates
    history: History
    now_s: float
    query: str | None
    blocked: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """The catalogue rows the user hid (:meth:`Retrieval.blocked`): nothing placed after retrieval may show them."""

    @property
    def is_search(self) -> bool:
        return self.query is not None


class Retrieval:
    """Candidates of a search or a recommendation, with the user's history as of the request."""

    def __init__(self, context: RankingContext) -> None:
        self.context = context

    def history(self, user_id: str | None, live: list[LiveEvent], now_s: float) -> History:
        """The run's events of ``user_id`` before ``now_s``, then the ``live`` ones (all already received)."""
        limit = self.context.config.features.history_events
        past = self.context.events.history(user_id, now_s, limit)
        row_of = self.context.catalogue.stats.row_of
        known = [(row_of[p], t, ts) for p, t, ts in live if p in row_of]
        if not known:
            return past
        rows, types, ts = zip(*known)
        return past.followed_by(History(np.array(rows, np.int64), list(types), np.array(ts, np.float64)), limit)

    def blocked(self, user_id: str | None, hidden: Iterable[tuple[str, str]], now_s: float) -> np.ndarray:
        """The catalogue rows ``user_id`` hid, sorted: their hides in the run's events before ``now_s``, then
        ``hidden`` ((event_type, product_id) received live). ``not_interested`` hides the product;
        ``not_interested_brand`` every product of its brand group and ``not_interested_category`` every product of
        its category, each as the catalogue holds it now (the product alone when it has no brand, or no category).
        A hide of a product the catalogue does not hold hides nothing."""
        stats = self.context.catalogue.stats
        row_of = stats.row_of
        hides = self.context.events.hidden(user_id, now_s)
        hides += [(kind, row_of[product]) for kind, product in hidden if product in row_of]
        if not hides:
            return np.zeros(0, np.int64)
        parts = [np.array([row for _, row in hides], np.int64)]
        for kind, row in hides:
            if kind == "not_interested_brand" and stats.has_brand[row]:
                parts.append(np.flatnonzero(stats.brand_group == stats.brand_group[row]))
            elif kind == "not_interested_category" and stats.has_category[row]:
                parts.append(np.flatnonzero(stats.category == stats.category[row]))
        return np.unique(np.concatenate(parts)).astype(np.int64)

    def shown(self, items: list[Ranked]) -> list[Ranked]:
        """``items`` with what the catalogue they were ranked with shows of each (a change put a moment ago
        included)."""
        listing = self.context.catalogue.listing
        if listing is not None:
            row_of = self.context.catalogue.stats.row_of
            for item in items:
                item.shown = listing.shown(row_of[item.product_id])
        return items

    def retrieve(self, user_id: str | None, live: list[LiveEvent], query: str | None, query_vector: np.ndarray | None,
                 now_s: float, hidden: Iterable[tuple[str, str]] = (), strategy: Strategy = "ranker") -> Retrieved:
        """The request's candidates from ``strategy``'s sources; ``hidden``: the user's hides received live
        (``Asked.hidden``), which with the run's own no source proposes."""
        history = self.history(user_id, live, now_s)
        blocked = self.blocked(user_id, hidden, now_s)
        return Retrieved(retrieve(self.context, history, query, query_vector, now_s, blocked=blocked,
                                  strategy=strategy), history, now_s, query, blocked)


class Ranking:
    """Features and order of retrieved candidates, by the ranker or the retrieval baseline."""

    def __init__(self, stats: ProductStats, strategy: Strategy, booster: xgboost.Booster | None,
                 popularity_weight: float = 0.02, explained_features: int = 4,
                 diversity: Diversity = Diversity(), listing: Listing | None = None) -> None:
        if strategy not in STRATEGY_SOURCES:
            raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGY_SOURCES)}")
        if strategy == "ranker" and booster is None:
            raise ValueError("the ranker strategy needs a booster")
        self.stats = stats
        self.strategy = strategy
        self.booster = booster
        self.popularity_weight = popularity_weight
        self.explained_features = explained_features
        self.diversity = diversity
        self.listing = listing
        """The products' shown rows (titles): a search that names a product's title exactly gets it first."""
        self._brands_named = BrandsNamed(stats.brand_names)
        self._brands_known = len(stats.brand_names)

    @property
    def brands_named(self) -> BrandsNamed:
        """Which brands a query names, over the brands the catalogue knows now (a live catalogue's list grows)."""
        if self._brands_known != len(self.stats.brand_names):
            self._brands_named = BrandsNamed(self.stats.brand_names)
            self._brands_known = len(self.stats.brand_names)
        return self._brands_named

    @classmethod
    def served(cls, config: Config, stats: ProductStats, strategy: Strategy, booster: xgboost.Booster | None,
               diversity: Diversity, listing: Listing | None = None) -> "Ranking":
        """The ranking a variant replica serves ``strategy`` with under ``config``: the one constructor Serve's
        replicas and the offline evaluation share, so the evaluation orders and cuts its lists the way Serve
        does (the same booster, diversity re-ranking and ties); ``diversity``: :meth:`Diversity.of` the run."""
        return cls(stats, strategy, booster, config.serve.baseline_popularity_weight,
                   config.serve.explained_features, diversity, listing)

    def rank_many(self, requests: list[Retrieved], ks: list[int]) -> list[list[Ranked]]:
        """Each request's top ``k`` after the diversity re-ranking (:mod:`shoprank.recsys.diversity`); the ranker
        scores all requests' candidates in one call, and explains the chosen ones in one more."""
        stacked, scores, every_part, bounds, orders = self._scored(requests)
        chosen = [a + self._top(self.diversity, r, order, scores[a:b], k)
                  for r, order, a, b, k in zip(requests, orders, bounds[:-1], bounds[1:], ks)]
        rows = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
        parts = every_part[rows] if every_part is not None else self._parts(stacked[rows])
        candidate_rows = np.concatenate([r.candidates.rows for r in requests]) if requests else np.zeros(0, np.int64)
        ids = self.stats.product_ids
        ranked = [Ranked(ids[candidate_rows[row]], float(scores[row]), self._explained(stacked[row], part))
                  for row, part in zip(rows, parts)]
        ends = np.cumsum([len(c) for c in chosen])
        return [ranked[end - len(c):end] for c, end in zip(chosen, ends)]

    def tops_under(self, requests: list[Retrieved], k: int, trials: list[Diversity]) -> list[list[list[str]]]:
        """Each request's top ``k`` product ids under each of ``trials`` (one list of answers per trial), the
        candidates scored once: the evaluate stage's choice of a strength on the validation split."""
        _, scores, _, bounds, orders = self._scored(requests)
        ids = self.stats.product_ids
        return [[[ids[r.candidates.rows[i]] for i in self._top(trial, r, order, scores[a:b], k)]
                 for r, order, a, b in zip(requests, orders, bounds[:-1], bounds[1:])] for trial in trials]

    def _scored(self, requests: list[Retrieved]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray,
                                                          list[np.ndarray]]:
        """The stacked features of every request's candidates, their scores, the baseline's parts of each score
        (None for the ranker, which explains only the chosen ones), each request's bounds in the stack, and each
        request's candidate positions best first (ties: the more popular)."""
        features = [compute_features(r.candidates, r.history, r.now_s, self.stats, r.is_search) for r in requests]
        stacked = np.concatenate(features) if features else np.zeros((0, len(COLUMN)), np.float32)
        every_part = self._parts(stacked) if self.strategy != "ranker" else None
        scores = every_part.sum(axis=1) if every_part is not None else (
            predict(self.booster, stacked) if len(stacked) else np.zeros(0, np.float32))
        bounds = np.cumsum([0] + [len(f) for f in features])
        orders = [np.lexsort((-f[:, COLUMN["popularity"]], -scores[a:b]))
                  for f, a, b in zip(features, bounds[:-1], bounds[1:])]
        return stacked, scores, every_part, bounds, orders

    def _top(self, diversity: Diversity, request: Retrieved, order: np.ndarray, scores: np.ndarray,
             k: int) -> np.ndarray:
        """``request``'s top ``k`` candidate positions under ``diversity``."""
        rows = request.candidates.rows
        # a product without a category is in no category group (as one without a brand is in no brand group)
        category = np.where(self.stats.has_category[rows], self.stats.category[rows], NO_GROUP)
        chosen = diversity.top(order, scores, k, self.stats.brand_group[rows], category, request.is_search,
                               self.brands_named(request.query))
        return self._exact_titles_first(request, chosen, k)

    def _exact_titles_first(self, request: Retrieved, chosen: np.ndarray, k: int) -> np.ndarray:
        """``chosen`` with the candidates whose title is the search's query (normalised alike) first: a shopper who
        types a product's name is looking for that product. The ranker cannot know that of a product put into the
        live catalogue a moment ago (no behaviour: it ranks below every product shoppers engaged with), and for any
        other product it is the answer the shopper expects whatever its popularity."""
        if not request.is_search or self.listing is None or request.query is None:
            return chosen
        query = normalize_query(request.query)
        titles = self.listing.title
        exact = [i for i, row in enumerate(request.candidates.rows.tolist()) if titles[row] == query]
        if not exact:
            return chosen
        rest = [int(i) for i in chosen if int(i) not in exact]
        return np.array((exact + rest)[:k], dtype=np.int64)


    def _parts(self, features: np.ndarray) -> np.ndarray:
        """Each row's score split into one part per feature and a last one, the base: the ranker's SHAP values
        (``pred_contribs``, one call), or the strategy's terms (:data:`SCORE_TERMS`; a missing value counts 0)."""
        if self.strategy == "ranker":
            if not len(features):
                return np.zeros((0, len(COLUMN) + 1), np.float32)
            matrix = xgboost.DMatrix(features, missing=np.nan)
            return self.booster.predict(matrix, pred_contribs=True, validate_features=False)
        parts = np.zeros((len(features), len(COLUMN) + 1), np.float32)
        for name, weight in SCORE_TERMS[self.strategy]:
            weight = self.popularity_weight if weight is POPULARITY_WEIGHT else weight
            parts[:, COLUMN[name]] = weight * np.nan_to_num(features[:, COLUMN[name]])
        return parts

    def _explained(self, values: np.ndarray, parts: np.ndarray) -> dict[str, float]:
        """The largest parts by size, named (a feature without a value says so), then the rest and the base."""
        by_feature = parts[:-1]
        largest = [i for i in np.argsort(-np.abs(by_feature), kind="stable")[: self.explained_features]
                   if by_feature[i] != 0.0]
        named = {(FEATURES[i] if not np.isnan(values[i]) else f"{FEATURES[i]} (no value)"):
                 float(by_feature[i]) for i in largest}
        rest = float(by_feature.sum() - by_feature[largest].sum())
        if rest:
            named[OTHER] = rest
        if parts[-1]:
            named[BASE] = float(parts[-1])
        return named


def answer_many(retrieval: Retrieval, ranking: Ranking, asked: list[Asked],
                vectors: dict[str, np.ndarray], exploration: Exploration | None = None) -> list[Answered]:
    """Each request retrieved, then all of them ranked in one :meth:`Ranking.rank_many` call; ``vectors`` holds each
    query's embedding (encoded together beforehand). With an ``exploration`` (a Serve replica's), its slots then
    go to live-added products (:mod:`shoprank.recsys.explore`); without one (the offline evaluation) the ranked
    lists are the answers."""
    retrieved = [retrieval.retrieve(a.user_id, a.live, a.query, vectors.get(a.query) if a.query is not None else None,
                                    a.now_s, a.hidden, ranking.strategy) for a in asked]
    ranked = ranking.rank_many(retrieved, [a.k for a in asked])
    if exploration is not None:
        ranked = [_explored(exploration, retrieval, a, r, items, vectors)
                  for a, r, items in zip(asked, retrieved, ranked)]
    return [Answered(retrieval.shown(items), len(r.history)) for items, r in zip(ranked, retrieved)]


def _explored(exploration: Exploration, retrieval: Retrieval, asked: Asked, retrieved: Retrieved, items: list[Ranked],
              vectors: dict[str, np.ndarray]) -> list[Ranked]:
    """``items`` with ``exploration``'s slots filled for this request: near its query or its shopper's vector, never
    a product the shopper hid or the policy leaves out of their recommendations; the draw seeded by the request's id
    (a request without one: by who asked what, when)."""
    catalogue = retrieval.context.catalogue
    if retrieved.is_search:
        vector = vectors.get(asked.query)
        left_out = np.zeros(0, np.int64)
    else:
        half_life = retrieval.context.config.embed.user_half_life_days
        vector = catalogue.user_vector(retrieved.history, asked.now_s, half_life)
        left_out = catalogue.excluded_rows(retrieved.history)
    seed = asked.request_id or f"{asked.user_id}|{asked.query}|{asked.now_s}"
    # retrieved.blocked: every hide of this shopper, the run's and the live ones, brands and categories resolved
    return exploration.apply(items, asked.k, is_search=retrieved.is_search, candidates=retrieved.candidates,
                             history=retrieved.history, vector=vector, blocked=np.union1d(left_out, retrieved.blocked),
                             seed=seed)


@dataclass
class VariantPipeline:
    """Search and recommend for one variant in one process (see the module docstring)."""

    context: RankingContext
    strategy: Strategy
    booster: xgboost.Booster | None = None
    diversity: Diversity = field(default_factory=Diversity)
    """The re-ranking of the answers: :meth:`Diversity.of` the run to answer as its Serve app does (default: none)."""
    live: dict[str, list[LiveEvent]] = field(default_factory=lambda: defaultdict(list))
    hidden: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: defaultdict(list))
    """User -> (event_type, product_id) of each "not interested" observed (as a replica's user cache holds them)."""
    exploration: Exploration | None = None
    """Exploration slots for live-added products, as a Serve replica fills them (default: none, the offline path)."""
    catalogue_log: LiveCatalogue | None = field(default=None, init=False)
    """The catalogue change log applied so far (:meth:`apply_catalogue`; None: none yet)."""

    def __post_init__(self) -> None:
        self.retrieval = Retrieval(self.context)
        # Serve's own constructor: the popularity weight and explanations of the context's config, as a replica's
        self.ranking = Ranking.served(self.context.config, self.context.catalogue.stats, self.strategy, self.booster,
                                      self.diversity, self.context.catalogue.listing)

    def search(self, query: str, user_id: str | None, k: int, now_s: float) -> list[Ranked]:
        return self.answer_many([self._asked(user_id, query, k, now_s)])[0].items

    def recommend(self, user_id: str | None, k: int, now_s: float) -> list[Ranked]:
        return self.answer_many([self._asked(user_id, None, k, now_s)])[0].items

    def answer_many(self, asked: list[Asked]) -> list[Answered]:
        """Several requests at once: their queries encoded in one call, their candidates ranked in one."""
        queries = sorted({a.query for a in asked if a.query is not None})
        vectors = dict(zip(queries, self.context.encode_queries(queries))) if queries else {}
        return answer_many(self.retrieval, self.ranking, asked, vectors, self.exploration)

    def apply_catalogue(self, changes: Sequence[CatalogueChange]) -> dict[str, int]:
        """Apply catalogue change log entries (:class:`~shoprank.recsys.live.LiveCatalogue`), new texts embedded
        by this context's own encoder as a Serve replica embeds them; how many puts and deletes changed it."""
        if self.catalogue_log is None:
            self.catalogue_log = LiveCatalogue(self.context, self.context.embed_products)
        return self.catalogue_log.apply(changes)

    def observe(self, user_id: str, product_id: str, event_type: str, ts_s: float) -> None:
        """Record a live event: the next answer for ``user_id`` sees it (a "not interested" as a hide, apart from
        the behaviour, as a replica keeps it)."""
        if event_type in NEGATIVE_EVENT_TYPES:
            self.hidden[user_id].append((event_type, product_id))
        else:
            self.live[user_id].append((product_id, event_type, ts_s))

    def _asked(self, user_id: str | None, query: str | None, k: int, now_s: float) -> Asked:
        if not user_id:
            return Asked(user_id, [], query, k, now_s)
        return Asked(user_id, list(self.live.get(user_id, ())), query, k, now_s,
                     hidden=tuple(self.hidden.get(user_id, ())))
