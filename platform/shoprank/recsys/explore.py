"""A fair first chance for products added while serving: exploration slots filled by Thompson sampling.

A product put into the live catalogue (:attr:`Catalogue.added_at_s` set) has no behaviour in the run's data: no
popularity, no CTR, no co-engagement, no item-item weight. The ranker, trained on behaviour, puts it below every
product shoppers already engaged with, so it is never shown, so it never gets the clicks that would lift it: a
cold start that never ends. :class:`Exploration` breaks it on purpose, and boundedly:

* **Eligible**: alive, live-added (never in the run's data: a run product has the features the ranker reads, so
  exploring it would only overrule the ranker), shown fewer than ``serve.explore.max_impressions`` times, and not
  left out for this shopper (hidden, or excluded by the policy's rule, e.g. already bought).
* **Pool** per request, at most ``pool``: the eligible products retrieval already proposed, then the ``nearest``
  eligible ones to the query's or shopper's vector, then those of the shopper's favourite categories (a shopper
  without history: every eligible one), so what is explored still fits the request.
* **Draw**: each pooled product's click rate ``theta ~ Beta(a0 + clicks, b0 + impressions - clicks)``, the prior
  centred on the run's pooled CTR with the weight of ``prior_impressions`` impressions. A product that earns clicks
  draws high more often and keeps its slots until its cap; a dull one loses them after a few dozen impressions.
* **Slots**: the best draws take ``positions`` (1-based) of the list, at most ``recommend_slots`` of a
  recommendation and ``search_slots`` of a search (0 by default); the ranked list shifts down around them and is
  cut at k. Such an item is ``Ranked.explored``; its score is its draw (its one contribution says so).
* **Reproducible**: the draw is seeded by the request's id, so one request is answered the same way twice.

Exposure (:class:`ExposureCounts`) is what the variant replica last read from the event store: impressions from the
impressions table, clicks from the events table, of live-added products only. Replicas read the same store, so
they agree within a poll.

It runs in :func:`shoprank.recsys.answer.answer_many` only when a replica passes an :class:`Exploration`; the
offline evaluation passes none and ranks exactly as before.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from shoprank.config import ExploreConfig
from shoprank.recsys.context import RankingContext
from shoprank.recsys.messages import Ranked
from shoprank.recsys.retrieval import favourite_categories
from shoprank.recsys.types import Candidates, History

if TYPE_CHECKING:
    from shoprank.store.events import EventStore

log = logging.getLogger(__name__)

EXPLORATION = "exploration (a draw of its click rate)"
"""The one contribution of an explored item: its score is its Thompson draw, not the ranker's."""


class ExposureCounts:
    """Impressions and clicks per product as this replica last read them; safe to update from a poll thread while
    requests read it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._impressions: dict[str, int] = {}
        self._clicks: dict[str, int] = {}

    def add(self, impressions: Mapping[str, int], clicks: Mapping[str, int]) -> None:
        """Count more impressions and clicks (what the store holds since the last read)."""
        with self._lock:
            for product_id, n in impressions.items():
                self._impressions[product_id] = self._impressions.get(product_id, 0) + int(n)
            for product_id, n in clicks.items():
                self._clicks[product_id] = self._clicks.get(product_id, 0) + int(n)

    def of(self, product_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(impressions, clicks) of each of ``product_ids``; clicks never above impressions (a click whose
        impression was not stored yet waits for it)."""
        with self._lock:
            shown = np.array([self._impressions.get(p, 0) for p in product_ids], np.float64)
            clicked = np.array([self._clicks.get(p, 0) for p in product_ids], np.float64)
        return shown, np.minimum(clicked, shown)


class ExposureFollower:
    """A replica's :class:`ExposureCounts` kept up to date from the event store: every impression and click stored
    since the last read (:meth:`EventStore.exposure`), on a daemon thread while the replica serves. The first read
    counts everything the store holds, so a replica started later knows what the others showed."""

    def __init__(self, store: EventStore, counts: ExposureCounts) -> None:
        self.store = store
        self.counts = counts
        self.after_impression = self.after_event = 0

    def catch_up(self) -> None:
        impressions, clicks, self.after_impression, self.after_event = self.store.exposure(self.after_impression,
                                                                                          self.after_event)
        self.counts.add(impressions, clicks)

    def start(self, interval_s: float) -> threading.Thread:
        """Catch up now, then every ``interval_s`` on a daemon thread (a failed read is logged and retried)."""
        self.catch_up()
        thread = threading.Thread(target=self._follow, args=(interval_s,), daemon=True, name="exposure-follower")
        thread.start()
        return thread

    def _follow(self, interval_s: float) -> None:
        while True:
            time.sleep(interval_s)
            try:
                self.catch_up()
            except Exception:  # the store away for a moment: the counts wait, exploration goes on with them
                log.exception("reading impressions and clicks failed; exploration keeps the counts it has")


def pooled_ctr(context: RankingContext) -> float | None:
    """Clicks per view over the run's event log (the prior's centre); None when the log has no views (a ratings
    export, or judgments only: no CTR to centre on)."""
    views = clicks = 0
    for history in context.events.histories.values():
        types = history.event_types
        views += types.count("view")
        clicks += types.count("click")
    return min(clicks / views, 1.0) if views else None


class Exploration:
    """The exploration policy of one variant replica (see the module docstring)."""

    def __init__(self, config: ExploreConfig, context: RankingContext, counts: ExposureCounts) -> None:
        self.config = config
        self.context = context
        self.counts = counts
        ctr = pooled_ctr(context)
        # Beta(1, 1), flat, where the log says nothing about click rates
        self.prior = (1.0, 1.0) if ctr is None else (max(config.prior_impressions * ctr, 1e-3),
                                                      max(config.prior_impressions * (1.0 - ctr), 1e-3))

    def slots(self, is_search: bool) -> list[int]:
        """The 1-based positions exploration may fill in a search's or a recommendation's list."""
        n = self.config.search_slots if is_search else self.config.recommend_slots
        return self.config.positions[:n]

    def eligible(self, blocked: np.ndarray | None) -> np.ndarray:
        """Catalogue rows that may be explored now: alive, live-added, under the impression cap, not ``blocked``."""
        catalogue = self.context.catalogue
        rows = np.flatnonzero(catalogue.alive & ~np.isnan(catalogue.added_at_s))
        if blocked is not None and len(blocked):
            rows = np.setdiff1d(rows, blocked)
        if not len(rows):
            return rows
        shown, _ = self.counts.of([catalogue.stats.product_ids[r] for r in rows])
        return rows[shown < self.config.max_impressions]

    def pool(self, eligible: np.ndarray, candidates: Candidates, history: History,
             vector: np.ndarray | None) -> np.ndarray:
        """The eligible rows this request draws from, at most ``pool``: retrieved first, then nearest to ``vector``,
        then of the shopper's favourite categories (every eligible one for a shopper without history)."""
        catalogue = self.context.catalogue
        parts = [candidates.rows[np.isin(candidates.rows, eligible)]]
        if vector is not None and self.config.nearest:
            similarity = catalogue.vectors[eligible] @ vector
            parts.append(eligible[np.argsort(-similarity, kind="stable")[: self.config.nearest]])
        stats = catalogue.stats
        categorised = history.product_rows[stats.has_category[history.product_rows]]
        if len(categorised):
            favourites = favourite_categories(stats, categorised)
            parts.append(eligible[stats.has_category[eligible] & np.isin(stats.category[eligible], favourites)])
        elif not len(history):
            parts.append(eligible)
        return np.array(list(dict.fromkeys(np.concatenate(parts).tolist()))[: self.config.pool], np.int64)

    def draw(self, rows: np.ndarray, seed: str) -> np.ndarray:
        """A Thompson draw of each row's click rate, from a generator seeded by ``seed`` (the request's id)."""
        ids = self.context.catalogue.stats.product_ids
        shown, clicked = self.counts.of([ids[r] for r in rows])
        a0, b0 = self.prior
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "little"))
        return rng.beta(a0 + clicked, b0 + shown - clicked)

    def apply(self, ranked: list[Ranked], k: int, *, is_search: bool, candidates: Candidates, history: History,
              vector: np.ndarray | None, blocked: np.ndarray | None, seed: str) -> list[Ranked]:
        """``ranked`` (a request's top ``k``) with the best draws at the slots' positions, or unchanged when the
        request has no slot or nothing is eligible. ``vector``: the query's or shopper's embedding (None: no
        nearest products); ``blocked``: catalogue rows this shopper must not be shown; ``seed``: the request's id."""
        positions = [p for p in self.slots(is_search) if p <= k]
        if not positions:
            return ranked
        eligible = self.eligible(blocked)
        if not len(eligible):
            return ranked
        ids = self.context.catalogue.stats.product_ids
        listed = {item.product_id for item in ranked}
        pool = np.array([r for r in self.pool(eligible, candidates, history, vector) if ids[r] not in listed],
                        np.int64)
        if not len(pool):
            return ranked
        theta = self.draw(pool, seed)
        best = np.argsort(-theta, kind="stable")[: len(positions)]
        out = list(ranked)
        for position, i in zip(positions, best):
            explored = Ranked(ids[pool[i]], float(theta[i]), {EXPLORATION: float(theta[i])}, explored=True)
            out.insert(min(position - 1, len(out)), explored)
        return out[:k]
