"""Candidate retrieval: what the ranker chooses from, for a search and for a recommendation.

* **Search**: the top N products by encoder similarity to the query (the run's FAISS
  index) plus the top N by BM25 (``bm25s``) over the same product texts, merged.
* **Recommendation**: the top N by similarity to the user's embedding, plus products
  co-engaged with the user's recent products, plus the N most popular products of
  each of the user's three favourite categories and of their favourite department
  (the categories' parent), plus the top N of the item-item model
  (:class:`ItemItem`, EASE) given the products the user engaged with, plus the
  **repeat** source: the user's own purchased products (``retrieval.repeat_event_types``),
  by a recency-decayed count (each event weighs ``0.5 ** (age / repeat_half_life_days)``,
  in the spirit of TIFU-KNN's personal frequency), for shops whose regulars buy the same
  products again. A user without history (cold start) gets the most popular and the
  trending products.
* **Popularity on the data's clock**: "popular" counts the engagements before the
  statistics' cut-off; "trending" (:class:`RecentPopularity`) those of the
  ``retrieval.trending_days`` before the request, its window ending at the request's
  time but never after the log's last event, so a server whose clock runs far past the
  data (a wall clock) sees the log's last days, not an empty window. Both are ordered by
  distinct shoppers (``retrieval.popularity_by``) or by engagements.
  Products the user already bought (``policy.exclude.purchased``), and those of the
  event types in ``policy.exclude.seen``, within the history the ranker reads (the user's
  last ``features.history_events`` events), are left out of every source: this is the
  one place that rule lives, so the offline rows, the offline evaluation and Serve
  all follow it.

**Strategies** (a variant's ``strategy``, :data:`STRATEGY_SOURCES`): ``ranker`` and ``retrieval`` take every
source above; ``content`` the encoder's alone (the dense source, for a search and a recommendation alike) and
``collaborative`` behaviour alone (a recommendation: the item-item model's products; a search: BM25's matches, the
encoder unused, scored with the shopper's item-item weights so the ordering can follow what they engaged with).
Either falls back to the popular and trending products, as a cold start does, where its own source has nothing
to go on: ``content`` for a shopper without history (no user vector), ``collaborative`` for one whose engaged
products have no item-item weight.

Every candidate keeps its encoder cosine, BM25 score, item-item scores, the
sources that proposed it (bits of :data:`shoprank.recsys.types.SOURCES`) and its
best position in any source: the ranker's features start from these.
:func:`retrieve` picks the search's or the recommendation's sources for a request, and
:func:`rank_inputs` adds the request's features: the offline rows' path, whose two
parts Serve's :mod:`shoprank.recsys.answer` calls apart (it ranks a batch at once).

Why an item-item model: behaviour alone (a ratings-style log, no text signal the
encoder was trained for, no impressions) says most about a shopper through what
similar shoppers engaged with. EASE (Steck, 2019, "Embarrassingly Shallow
Autoencoders") is the closed-form, one-hyperparameter model that is the usual
strong baseline there; fitted on the events before the ranker's cut-off it is one
object, read the same way by the offline rows and by Serve, and scoring a live
history is a sparse row sum, so a new event counts in the very next answer.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

import bm25s
import faiss
import numpy as np
import scipy.sparse as sp
from scipy.linalg import lapack
from threadpoolctl import threadpool_limits

from shoprank.config import EmbedConfig
from shoprank.encoder.index import build_index
from shoprank.encoder.users import user_embedding
from shoprank.recsys.features import compute_features
from shoprank.recsys.messages import Strategy
from shoprank.recsys.types import SOURCES, Candidates, History, Listing, ProductStats

if TYPE_CHECKING:  # the context holds a catalogue: a runtime import would run in a circle
    from shoprank.recsys.context import RankingContext

FAVOURITE_CATEGORIES = 3
RECENT_ITEMS = 10
DAY_S = 86_400.0
HOUR_S = 3_600.0
RECENT_WINDOWS_CACHED = 1024
"""Windows of :class:`RecentPopularity` kept per process (two float32 vectors of the catalogue's size each)."""
FULL_RECOMMEND = ("dense", "coengaged", "popular", "collaborative", "repeat")
STRATEGY_SOURCES: dict[str, dict[str, tuple[str, ...]]] = {
    "ranker": {"search": ("dense", "lexical"), "recommend": FULL_RECOMMEND},
    "retrieval": {"search": ("dense", "lexical"), "recommend": FULL_RECOMMEND},
    "content": {"search": ("dense",), "recommend": ("dense",)},
    "collaborative": {"search": ("lexical",), "recommend": ("collaborative",)},
}
"""Strategy -> task -> the candidate sources (:data:`~shoprank.recsys.types.SOURCES`) its candidates come from.
``content`` and ``collaborative`` recommendations fall back to ``popular`` (the popular and trending products) where
their own source has nothing to go on (see the module docstring)."""


@dataclass
class ItemItem:
    """Item-item weights: ``weights[i, j]`` is how much engaging with product i says about product j."""

    weights: sp.csr_matrix
    """Catalogue rows x catalogue rows, the strongest few weights of each row kept."""

    @classmethod
    def empty(cls, n: int) -> "ItemItem":
        return cls(sp.csr_matrix((n, n), dtype=np.float32))

    def scores(self, rows: np.ndarray) -> np.ndarray:
        """Every product's score (catalogue order) from the distinct products ``rows``."""
        if not len(rows):
            return np.zeros(self.weights.shape[1], np.float32)
        return np.asarray(self.weights[np.unique(rows)].sum(axis=0), dtype=np.float32).ravel()


def spd_inverse(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a symmetric positive definite matrix (a Gram matrix plus ``l2 I``) through its Cholesky
    factor: a third of the work of ``np.linalg.inv``'s LU solve (5,000 x 5,000 on one thread: 4.9 s against 9.5 s),
    which every process that loads a run's ranking context pays."""
    factor, info = lapack.dpotrf(matrix, lower=False, clean=False)
    if info == 0:
        inverse, info = lapack.dpotri(factor, lower=False)
    if info != 0:
        raise np.linalg.LinAlgError(f"not symmetric positive definite (LAPACK info {info})")
    return np.triu(inverse) + np.triu(inverse, 1).T  # dpotri fills the upper triangle only


def fit_item_item(users: np.ndarray, rows: np.ndarray, n: int, l2: float, max_items: int,
                  neighbours: int) -> ItemItem:
    """EASE on the binary user x product matrix of ``(users, rows)`` pairs (catalogue rows < ``n``).

    ``B = -P / diag(P)`` with ``P = (X'X + l2 I)^-1`` and a zero diagonal, over the
    ``max_items`` products with most distinct users (the inverse is dense, so this
    bounds its cost); each row keeps its ``neighbours`` weights largest in absolute
    value (the negative ones matter: "bought a tent, so not another tent").
    """
    if not len(rows):
        return ItemItem.empty(n)
    user_codes = np.unique(users, return_inverse=True)[1]
    matrix = sp.csr_matrix((np.ones(len(rows), np.float32), (user_codes, rows)), shape=(user_codes.max() + 1, n))
    matrix.data[:] = 1.0  # duplicates summed: one user, one product, one count
    support = np.asarray(matrix.sum(axis=0)).ravel()
    kept = np.argsort(-support, kind="stable")[: min(max_items, int((support > 0).sum()))]
    sub = matrix[:, kept]
    gram = (sub.T @ sub).toarray().astype(np.float64)
    gram[np.diag_indices_from(gram)] += l2
    with threadpool_limits(1):  # the same bits in every process: Ray's workers run BLAS on one thread
        precision = spd_inverse(gram)
    weights = precision / -np.diag(precision)[None, :]
    np.fill_diagonal(weights, 0.0)
    k = min(neighbours, len(kept) - 1)
    if k <= 0:
        return ItemItem.empty(n)
    top = np.argpartition(-np.abs(weights), k - 1, axis=1)[:, :k]
    values = np.take_along_axis(weights, top, axis=1)
    return ItemItem(sp.csr_matrix(
        (values.ravel().astype(np.float32), (np.repeat(kept, k), kept[top].ravel())), shape=(n, n)
    ))


class RecentPopularity:
    """Each product's engagements and distinct shoppers in the ``days`` before a time, on the data's clock.

    The window ends at the start of the hour of ``min(now_s, last event + 1 hour)``: never after the request
    (no event at or after it counts, so an offline request sees only its past), and never past the log, so a
    clock far ahead of the data (Serve's wall clock) gives the log's last days instead of nothing. Whole hours,
    so the requests of one hour share one cached window.
    """

    def __init__(self, ts_s: np.ndarray, rows: np.ndarray, users: np.ndarray, size: int, days: float) -> None:
        order = np.argsort(ts_s, kind="stable")
        self.ts_s = ts_s[order]
        self.rows = rows[order]
        self.users = np.unique(users, return_inverse=True)[1][order].astype(np.int64) if len(users) else rows[:0]
        self.size = size
        self.span_s = days * DAY_S
        self.last_s = float(self.ts_s[-1]) if len(self.ts_s) else -np.inf
        self._window = lru_cache(maxsize=RECENT_WINDOWS_CACHED)(self._counts)

    @classmethod
    def empty(cls, size: int, days: float) -> "RecentPopularity":
        none = np.zeros(0, np.int64)
        return cls(none.astype(np.float64), none, none, size, days)

    def resize(self, size: int) -> None:
        """Count over ``size`` catalogue rows (products put live have no engagement yet)."""
        self.size = size
        self._window.cache_clear()

    def window_end(self, now_s: float) -> float:
        """Where the window before ``now_s`` ends (see the class docstring)."""
        return float(np.floor(min(now_s, self.last_s + HOUR_S) / HOUR_S) * HOUR_S)

    def at(self, now_s: float) -> tuple[np.ndarray, np.ndarray]:
        """(engagements, distinct shoppers) per catalogue row in the window before ``now_s``."""
        return self._window(self.window_end(now_s))

    def _counts(self, end_s: float) -> tuple[np.ndarray, np.ndarray]:
        start, stop = np.searchsorted(self.ts_s, [end_s - self.span_s, end_s], side="left")
        rows, users = self.rows[start:stop], self.users[start:stop]
        events = np.bincount(rows, minlength=self.size).astype(np.float32)
        shoppers = np.bincount(np.unique(users * self.size + rows) % self.size, minlength=self.size)
        return events, shoppers.astype(np.float32)


class DeltaLexical:
    """BM25 over the products put live (their new text), scored with the main index's corpus statistics.

    Not a second ``bm25s`` index: its document frequencies and mean length over a handful of documents would make
    its scores incomparable with the main index's. Each delta document is scored as ``bm25s`` scores a document
    of the main corpus (its default, Lucene's: ``idf = log(1 + (N - df + 0.5) / (df + 0.5))``, ``tfc = tf /
    (k1 * (1 - b + b * l_d / l_avg) + tf)``) with the main corpus's ``N``, ``df`` and ``l_avg``, so a live product
    and a run product compete on one scale. A word the main corpus never saw (a new product's brand-new name)
    has ``df`` 0: it is found here alone, as ``bm25s`` ignores query words outside its vocabulary.
    """

    def __init__(self, main: bm25s.BM25, corpus: bm25s.tokenization.Tokenized) -> None:
        """Over ``main``, the index of ``corpus``: its document frequencies are its score matrix's entries per word
        (a column per word, an entry per document that has it), so nothing is counted again."""
        self.vocabulary: dict[str, int] = main.vocab_dict
        self.frequency = np.diff(main.scores["indptr"])
        """Documents of the main corpus that have each word (by ``vocabulary`` id)."""
        self.documents = int(main.scores["num_docs"])
        self.mean_length = float(np.mean([len(ids) for ids in corpus.ids])) if len(corpus.ids) else 0.0
        self.k1, self.b = main.k1, main.b
        self.terms: dict[int, tuple[dict[str, int], int]] = {}
        """Catalogue row -> (term frequency of each word, length) of its live text."""

    def document_frequency(self, word: str) -> int:
        i = self.vocabulary.get(word)
        return int(self.frequency[i]) if i is not None and i < len(self.frequency) else 0

    def put(self, row: int, text: str) -> None:
        words = bm25s.tokenize([text], stopwords="en", show_progress=False, return_ids=False)[0]
        counts: dict[str, int] = {}
        for word in words:
            counts[word] = counts.get(word, 0) + 1
        self.terms[row] = (counts, len(words))

    def remove(self, row: int) -> None:
        self.terms.pop(row, None)

    def scores(self, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(catalogue rows, BM25 score of ``words``) of every delta document."""
        rows = np.fromiter(self.terms, np.int64, len(self.terms))
        scores = np.zeros(len(rows), np.float32)
        frequency = {word: self.document_frequency(word) for word in set(words)}
        idf = {word: np.float32(math.log(1 + (self.documents - df + 0.5) / (df + 0.5))) for word, df in frequency.items()}
        for i, (counts, length) in enumerate(self.terms.values()):
            norm = self.k1 * ((1 - self.b) + self.b * length / self.mean_length) if self.mean_length else self.k1
            for word in words:  # a repeated query word counts each time, as in bm25s
                tf = counts.get(word, 0)
                if tf:
                    scores[i] += np.float32(float(idf[word]) * tf / (norm + tf))
        return rows, scores


@dataclass
class MainIndices:
    """The main FAISS and BM25 indices over some catalogue rows (:meth:`Catalogue.compacted`)."""

    rows: np.ndarray
    """The catalogue row of each index entry and BM25 document."""
    index: faiss.Index
    bm25: bm25s.BM25
    lexical: DeltaLexical
    """An empty delta BM25 over these documents' statistics."""


def main_indices(rows: np.ndarray, vectors: np.ndarray, texts: list[str], index_config: EmbedConfig, k1: float,
                 b: float) -> MainIndices:
    """Main indices over ``rows`` (their ``vectors`` and ``texts``): FAISS as the embed stage builds it, BM25 as a
    catalogue's is."""
    corpus = bm25s.tokenize(texts, stopwords="en", show_progress=False)
    bm25 = bm25s.BM25(k1=k1, b=b)
    bm25.index(corpus, show_progress=False)
    return MainIndices(rows, build_index(vectors, index_config), bm25, DeltaLexical(bm25, corpus))


@dataclass
class Catalogue:
    """Everything retrieval needs about the products, aligned with the catalogue order."""

    stats: ProductStats
    vectors: np.ndarray
    index: faiss.Index
    index_rows: np.ndarray
    """Catalogue row of each FAISS row."""
    texts: list[str]
    coengaged: dict[int, np.ndarray]
    """Catalogue row -> co-engaged catalogue rows, most frequent first."""
    recent: RecentPopularity
    """Engagements and shoppers per product in the last days before a request: the trending source and the
    recent popularity features."""
    item_item: ItemItem
    excluded_types: Collection[str]
    """A recommendation leaves out the products of the user's events of these types."""
    judged_relevant: np.ndarray | None = None
    """Per product, how many training queries judged it relevant: it orders popular products whose
    engagements tie, which is all of them in a run without behaviour (judged queries only), so that
    such a run's recommendations are the products shoppers' queries most often want, not the first
    rows of the catalogue."""
    bm25_k1: float = 1.5
    bm25_b: float = 0.75
    popularity_by: str = "shoppers"
    """``retrieval.popularity_by``: distinct shoppers or engagements order the popular and trending sources."""
    repeat_types: Collection[str] = ("purchase",)
    """``retrieval.repeat_event_types``: the events whose products the repeat source proposes."""
    repeat_half_life_days: float = 60.0
    listing: Listing | None = None
    """What answers show of each product (None: the ingress shows its own copy of the run's rows)."""
    alive: np.ndarray = field(init=False)
    """Per row: listed (False: deleted through the catalogue change log; no source proposes it, its statistics
    stay readable for the histories that name it)."""
    added_at_s: np.ndarray = field(init=False)
    """Per row: when the change log put it (the change's time); NaN for the run's products."""
    stale_in_main: np.ndarray = field(init=False)
    """Per row: its vector and text are not (or no more) those of the main FAISS and BM25 indices: the delta
    indices hold them."""
    delta_index: faiss.IndexIDMap2 = field(init=False)
    """The vectors of the rows put live (ids: catalogue rows), searched beside the main index."""
    delta_lexical: DeltaLexical = field(init=False)

    def __post_init__(self) -> None:
        self.bm25 = bm25s.BM25(k1=self.bm25_k1, b=self.bm25_b)
        corpus = bm25s.tokenize(self.texts, stopwords="en", show_progress=False)
        self.bm25.index(corpus, show_progress=False)
        self.delta_lexical = DeltaLexical(self.bm25, corpus)
        self.lexical_rows = np.arange(len(self.texts))
        """The catalogue row of each document of the main BM25 index."""
        self._touched: set[int] | None = None
        """Rows changed since the snapshot a compaction builds from (None: no compaction under way)."""
        n = len(self.stats.product_ids)
        self.alive = np.ones(n, bool)
        self.added_at_s = np.full(n, np.nan)
        self.stale_in_main = np.zeros(n, bool)
        self.withdrawn = np.zeros(0, np.int64)
        """The rows not :attr:`alive`, for the sources' exclusions."""
        self.delta_index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.vectors.shape[1]))
        self.order_by_popularity()

    def order_by_popularity(self) -> None:
        """The popular sources' orders (listed products only): at load, and after live changes."""
        judged = np.zeros(len(self.stats.popularity)) if self.judged_relevant is None else self.judged_relevant
        keys = (-judged, -self.stats.popularity, -self.stats.popularity_shoppers)  # the last key sorts first
        by_popularity = np.lexsort(keys if self.popularity_by == "shoppers" else keys[:2])
        by_popularity = by_popularity[self.alive[by_popularity]]
        self.popular = by_popularity
        self.popular_in = {
            int(c): by_popularity[self.stats.category[by_popularity] == c] for c in np.unique(self.stats.category)
        }
        self.popular_in_department = {
            int(d): by_popularity[self.stats.department[by_popularity] == d] for d in np.unique(self.stats.department)
        }

    def extend(self, added_at_s: np.ndarray) -> None:
        """Room for products put live at ``added_at_s`` (their statistics' rows already appended). Every
        catalogue-length structure grows: an unseen product has no co-engagement, item-item weight, recent
        engagement or judgment, and no vector in the main index (:meth:`put` gives it one in the delta index)."""
        start, count = len(self.alive), len(added_at_s)
        self.alive = np.concatenate([self.alive, np.ones(count, bool)])
        self.added_at_s = np.concatenate([self.added_at_s, added_at_s])
        self.stale_in_main = np.concatenate([self.stale_in_main, np.ones(count, bool)])
        self.vectors = np.concatenate([self.vectors, np.zeros((count, self.vectors.shape[1]), self.vectors.dtype)])
        self.texts.extend([""] * count)
        size = start + count
        self.item_item.weights.resize((size, size))
        self.recent.resize(size)
        if self.judged_relevant is not None:
            self.judged_relevant = np.concatenate([self.judged_relevant, np.zeros(count)])

    def put(self, row: int, text: str, vector: np.ndarray | None) -> None:
        """List row ``row`` with ``text`` and ``vector`` (None: its text is unchanged, and so is its vector)."""
        if self._touched is not None:
            self._touched.add(row)
        self.alive[row] = True
        if vector is not None:
            self.vectors[row] = vector
            self.stale_in_main[row] = True
        if self.stale_in_main[row]:
            self.delta_index.remove_ids(np.array([row], np.int64))
            self.delta_index.add_with_ids(self.vectors[row:row + 1].astype(np.float32), np.array([row], np.int64))
            self.texts[row] = text
            self.delta_lexical.put(row, text)

    def withdraw(self, row: int) -> None:
        """Unlist row ``row``: no source proposes it again."""
        if self._touched is not None:
            self._touched.add(row)
        self.alive[row] = False
        self.delta_index.remove_ids(np.array([row], np.int64))
        self.delta_lexical.remove(row)

    def outdated(self) -> int:
        """Rows the main indices hold wrongly or not at all: changed or put live, or withdrawn but still indexed.
        Past ``serve.catalogue_compact_rows`` of them, :meth:`compacted` indices replace the main ones."""
        return int((self.stale_in_main & self.alive).sum()) + int((~self.alive[self.index_rows]).sum())

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(listed rows, their vectors, their texts) for :func:`main_indices`, built apart (the caller holds the
        readers' lock here only); changes from now on are remembered for :meth:`compacted`."""
        rows = np.flatnonzero(self.alive)
        self._touched = set()
        return rows, self.vectors[rows].copy(), [self.texts[r] for r in rows]

    def compacted(self, built: MainIndices) -> None:
        """Swap ``built`` in as the main indices (the caller holds the readers' lock): the rows changed since its
        snapshot stay in the delta indices, every other listed row is the main indices' again."""
        touched = np.array(sorted(self._touched or ()), np.int64)
        self._touched = None
        self.index, self.index_rows, self.bm25, self.lexical_rows = built.index, built.rows, built.bm25, built.rows
        self.delta_lexical = built.lexical
        # a row the new main indices leave out (unlisted at the snapshot) is stale there: put back, even with its
        # text unchanged, it goes to the delta indices, or no search would find it
        self.stale_in_main[:] = True
        self.stale_in_main[built.rows] = False
        self.stale_in_main[touched] = True
        self.delta_index.reset()
        for row in touched[self.alive[touched]]:
            self.put(int(row), self.texts[row], None)

    def forget_snapshot(self) -> None:
        """A compaction that failed: stop remembering changes for it."""
        self._touched = None

    def settle(self) -> None:
        """After a batch of :meth:`put` and :meth:`withdraw`: the exclusions and the popular orders."""
        self.withdrawn = np.flatnonzero(~self.alive)
        self.order_by_popularity()

    def bm25_scores(self, query: str) -> np.ndarray:
        """BM25 score of ``query`` against every product (catalogue order): the main index's, then the delta's
        (:class:`DeltaLexical`) for the rows put live; 0 for a withdrawn product."""
        tokens = bm25s.tokenize([query], stopwords="en", show_progress=False, return_ids=False)[0]
        scores = np.zeros(len(self.texts), np.float32)
        if not tokens:
            return scores
        scores[self.lexical_rows] = self.bm25.get_scores(tokens)
        if self.delta_lexical.terms or len(self.withdrawn):
            scores[self.stale_in_main] = 0.0
            rows, delta = self.delta_lexical.scores(tokens)
            scores[rows] = delta
            scores[self.withdrawn] = 0.0
        return scores

    def nearest(self, vector: np.ndarray, n: int, excluded: np.ndarray | None = None) -> np.ndarray:
        """Catalogue rows of the ``n`` listed products nearest to ``vector``, ``excluded`` rows left out: the main
        index asked for as many more as it holds outdated or withdrawn rows, merged by inner product with the
        delta index of the rows put live. Works for any FAISS index (HNSW has no ``remove_ids``)."""
        extra = 0 if excluded is None else len(excluded)
        query = vector.reshape(1, -1).astype(np.float32)
        masked = self.outdated() if self.delta_index.ntotal or len(self.withdrawn) else 0
        similarity, found = self.index.search(query, n + extra + masked)
        kept = found[0] >= 0
        rows, similarity = self.index_rows[found[0][kept]], similarity[0][kept]
        if masked:
            current = self.alive[rows] & ~self.stale_in_main[rows]
            rows, similarity = rows[current], similarity[current]
        if self.delta_index.ntotal:
            delta_similarity, delta_rows = self.delta_index.search(query, min(n + extra, self.delta_index.ntotal))
            kept = delta_rows[0] >= 0
            rows = np.concatenate([rows, delta_rows[0][kept]])
            order = np.argsort(-np.concatenate([similarity, delta_similarity[0][kept]]), kind="stable")
            rows = rows[order]
        return _without(rows, excluded, n)

    def user_vector(self, history: History, now_s: float, half_life_days: float) -> np.ndarray | None:
        """The user's embedding at ``now_s`` (the function the embed stage uses for every user)."""
        if not len(history):
            return None
        ages = (now_s - history.ts_s) / 86_400.0
        return user_embedding(self.vectors[history.product_rows], history.event_types, ages, half_life_days)

    def search(self, query: str, query_vector: np.ndarray, n: int, now_s: float, *,
               dense_only: bool = False, blocked: np.ndarray | None = None) -> Candidates:
        """A search's candidates; ``dense_only``: the encoder's alone (the offline evaluation's retrieval rows);
        ``blocked``: catalogue rows no source may propose (what the shopper hid)."""
        lists = {"dense": self.nearest(query_vector, n, blocked)}
        if dense_only:
            return self._merge(lists, query_vector, None, blocked=blocked)
        bm25, lists["lexical"] = self._lexical(query, n, blocked)
        return self._merge(lists, query_vector, bm25, recent=self.recent.at(now_s), blocked=blocked)

    def _lexical(self, query: str, n: int, blocked: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(BM25 score of every product, the top ``n`` rows with a score above 0, ``blocked`` ones left out)."""
        bm25 = self.bm25_scores(query)  # 0 for the withdrawn products
        ranked_by_bm25 = bm25 if blocked is None or not len(blocked) else _zeroed(bm25, blocked)
        lexical = np.argsort(-ranked_by_bm25, kind="stable")[:n]
        return bm25, lexical[ranked_by_bm25[lexical] > 0]

    def lexical_search(self, query: str, history: History, n: int, now_s: float, *,
                       blocked: np.ndarray | None = None) -> Candidates:
        """The ``collaborative`` strategy's search: BM25's matches alone (no encoder: their cosine is 0), each with
        the item-item score of the shopper's engaged products, which orders them with the BM25 score."""
        bm25, lexical = self._lexical(query, n, blocked)
        return self._merge({"lexical": lexical}, None, bm25, self.item_item.scores(history.engaged_rows()),
                           self.item_item.scores(history.last_visit().engaged_rows()), recent=self.recent.at(now_s),
                           blocked=blocked)

    def trending(self, now_s: float) -> np.ndarray:
        """Listed catalogue rows engaged in the window before ``now_s`` (:class:`RecentPopularity`), most first by
        ``popularity_by`` (ties: engagements, then catalogue order)."""
        events, shoppers = self.recent.at(now_s)
        order = np.lexsort((-events, -shoppers)) if self.popularity_by == "shoppers" else np.argsort(-events,
                                                                                                    kind="stable")
        engaged = order[: int((events > 0).sum())]
        return engaged[self.alive[engaged]]

    def repeat_scores(self, history: History, now_s: float) -> np.ndarray:
        """Each product's recency-decayed count of the user's events of ``repeat_types`` (catalogue order)."""
        mine = np.array([t in self.repeat_types for t in history.event_types], dtype=bool)
        decay = 0.5 ** ((now_s - history.ts_s[mine]) / DAY_S / self.repeat_half_life_days)
        return np.bincount(history.product_rows[mine], decay, minlength=len(self.stats.product_ids)).astype(np.float32)

    def recommend(self, user_vector: np.ndarray | None, history: History, n: int, now_s: float, *,
                  dense_only: bool = False, blocked: np.ndarray | None = None) -> Candidates:
        """A recommendation's candidates; ``dense_only``: the encoder's alone (the offline evaluation's);
        ``blocked``: catalogue rows no source may propose (what the shopper hid)."""
        lists: dict[str, np.ndarray] = {}
        excluded = self._left_out(history, blocked)
        if user_vector is not None:
            lists["dense"] = self.nearest(user_vector, n, excluded)
        if dense_only:
            return self._merge(lists, user_vector, None, blocked=blocked)
        repeat_score = self.repeat_scores(history, now_s)
        if len(history):
            recent = list(dict.fromkeys(history.product_rows[::-1].tolist()))[:RECENT_ITEMS]
            neighbours = [_without(self.coengaged.get(r, np.zeros(0, np.int64)), excluded) for r in recent]
            lists["coengaged"] = _interleave(neighbours, n)
            # A shopper's favourite categories among the products that have one; without any, the shop's
            # bestsellers (products without a category are no category of their own)
            categorised = history.product_rows[self.stats.has_category[history.product_rows]]
            if len(categorised):
                favourites = favourite_categories(self.stats, categorised)
                department = int(np.bincount(self.stats.department[categorised]).argmax())
                popular = [_without(self.popular_in[int(c)], excluded, n) for c in favourites]
                popular.append(_without(self.popular_in_department[department], excluded, n))
            else:
                popular = [_without(self.popular, excluded, n)]
            lists["popular"] = _interleave(popular, n * len(popular))
        else:
            lists["popular"] = self._cold_start(excluded, n, now_s)
        cf_score = self.item_item.scores(history.engaged_rows())
        cf_recent = self.item_item.scores(history.last_visit().engaged_rows())
        positive = np.flatnonzero(cf_score > 0)
        # new products only: what the user already saw comes back through the other sources if at all
        ranked = positive[np.argsort(-cf_score[positive], kind="stable")]
        lists["collaborative"] = _without(ranked, np.union1d(history.product_rows, excluded), n)
        mine = np.flatnonzero(repeat_score > 0)
        lists["repeat"] = _without(mine[np.argsort(-repeat_score[mine], kind="stable")], excluded, n)
        return self._merge(lists, user_vector, None, cf_score, cf_recent, repeat_score, self.recent.at(now_s),
                           blocked=blocked)

    def _left_out(self, history: History, blocked: np.ndarray | None) -> np.ndarray:
        """Rows no recommendation source may propose: the policy's exclusions, the hidden and the withdrawn ones
        (left out early, so that every source's list stays full)."""
        excluded = self.excluded_rows(history)
        if blocked is not None and len(blocked):
            excluded = np.union1d(excluded, blocked)
        if len(self.withdrawn):
            excluded = np.union1d(excluded, self.withdrawn)
        return excluded

    def _cold_start(self, excluded: np.ndarray, n: int, now_s: float) -> np.ndarray:
        """The popular and trending products, interleaved: a recommendation with nothing personal to go on."""
        return _interleave([_without(self.popular, excluded, n), _without(self.trending(now_s), excluded, n)], n)

    def popular_only(self, history: History, n: int, now_s: float, *, blocked: np.ndarray | None = None) -> Candidates:
        """The cold start's candidates alone (the ``popular`` source), for a strategy whose own source has nothing
        to go on for this shopper."""
        excluded = self._left_out(history, blocked)
        return self._merge({"popular": self._cold_start(excluded, n, now_s)}, None, None,
                           recent=self.recent.at(now_s), blocked=blocked)

    def collaborative(self, history: History, n: int, now_s: float, *,
                      blocked: np.ndarray | None = None) -> Candidates:
        """The ``collaborative`` strategy's recommendation: the item-item model's top ``n`` for the shopper's engaged
        products (those not in their history, as the full mix's collaborative source), no encoder (cosine 0); the
        popular and trending products when it proposes none (a shopper without engagements)."""
        excluded = self._left_out(history, blocked)
        cf_score = self.item_item.scores(history.engaged_rows())
        cf_recent = self.item_item.scores(history.last_visit().engaged_rows())
        positive = np.flatnonzero(cf_score > 0)
        ranked = positive[np.argsort(-cf_score[positive], kind="stable")]
        proposed = _without(ranked, np.union1d(history.product_rows, excluded), n)
        lists = {"collaborative": proposed} if len(proposed) else {"popular": self._cold_start(excluded, n, now_s)}
        return self._merge(lists, None, None, cf_score, cf_recent, recent=self.recent.at(now_s), blocked=blocked)

    def excluded_rows(self, history: History) -> np.ndarray:
        """Catalogue rows a recommendation for this history leaves out (see the module docstring)."""
        if not self.excluded_types:
            return np.zeros(0, np.int64)
        mask = [t in self.excluded_types for t in history.event_types]
        return np.unique(history.product_rows[mask])

    def _merge(self, lists: dict[str, np.ndarray], vector: np.ndarray | None, bm25: np.ndarray | None,
               cf_score: np.ndarray | None = None, cf_recent: np.ndarray | None = None,
               repeat_score: np.ndarray | None = None,
               recent: tuple[np.ndarray, np.ndarray] | None = None,
               blocked: np.ndarray | None = None) -> Candidates:
        """Every source's list as one set of candidates; the one place all sources pass, so a ``blocked`` or
        withdrawn row leaves here whichever source proposed it."""
        position: dict[int, int] = {}
        sources: dict[int, int] = {}
        left_out = set(self.withdrawn.tolist())
        if blocked is not None:
            left_out.update(blocked.tolist())
        for name, rows in lists.items():
            bit = 1 << SOURCES.index(name)
            for rank, row in enumerate(rows.tolist(), start=1):
                if row in left_out:
                    continue
                position[row] = min(position.get(row, rank), rank)
                sources[row] = sources.get(row, 0) | bit
        rows = np.array(list(position), dtype=np.int64)
        cosine = self.vectors[rows] @ vector if vector is not None else np.zeros(len(rows), np.float32)
        return Candidates(
            rows=rows,
            cosine=cosine.astype(np.float32),
            bm25=bm25[rows] if bm25 is not None else np.zeros(len(rows), np.float32),
            sources=np.array([sources[r] for r in rows], dtype=np.int64),
            position=np.array([position[r] for r in rows], dtype=np.float32),
            cf_score=cf_score[rows] if cf_score is not None else None,
            cf_recent=cf_recent[rows] if cf_recent is not None else None,
            repeat_score=repeat_score[rows] if repeat_score is not None else None,
            recent_events=recent[0][rows] if recent is not None else None,
            recent_shoppers=recent[1][rows] if recent is not None else None,
        )


def favourite_categories(stats: ProductStats, categorised: np.ndarray) -> np.ndarray:
    """The category codes a shopper engaged with most (at most ``FAVOURITE_CATEGORIES``), from the catalogue rows of
    their history that have a category: the recommend source's and exploration's notion of what they like."""
    return np.bincount(stats.category[categorised]).argsort()[::-1][:FAVOURITE_CATEGORIES]


def _without(rows: np.ndarray, excluded: np.ndarray | None, limit: int | None = None) -> np.ndarray:
    """The first ``limit`` (all: None) of ``rows`` (each row once) in their order, less the ``excluded`` ones.

    A set and a loop that stops at ``limit``, not ``np.isin``: the lists are short or only their head is
    kept, and ``np.isin`` sorted both arrays on every call (a tenth of a feature actor's time)."""
    if excluded is None or not len(excluded) or not len(rows):
        return rows[:limit]
    left_out = set(excluded.tolist())
    head = rows if limit is None else rows[: limit + len(left_out)]  # enough to keep ``limit`` of them
    kept: list[int] = []
    for row in head.tolist():
        if row not in left_out:
            kept.append(row)
            if len(kept) == limit:
                break
    return np.array(kept, dtype=rows.dtype)


def _zeroed(scores: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A copy of ``scores`` with ``rows`` set to 0."""
    out = scores.copy()
    out[rows] = 0.0
    return out


def _interleave(lists: list[np.ndarray], n: int) -> np.ndarray:
    """Round-robin over ranked lists, without repeats, at most ``n``."""
    out: dict[int, None] = {}
    for depth in range(max((len(x) for x in lists), default=0)):
        for ranked in lists:
            if depth < len(ranked):
                out.setdefault(int(ranked[depth]), None)
        if len(out) >= n:
            break
    return np.array(list(out)[:n], dtype=np.int64)


def retrieve(context: RankingContext, history: History, query: str | None, query_vector: np.ndarray | None,
             now_s: float, *, dense_only: bool = False, blocked: np.ndarray | None = None,
             strategy: Strategy = "ranker") -> Candidates:
    """A search's or a recommendation's candidates, for a user with ``history`` at ``now_s``, from the sources of
    ``strategy`` (:data:`STRATEGY_SOURCES`; ``dense_only``: the encoder's source alone, as ``content`` but with no
    cold-start fallback: the offline evaluation's dense rows; ``blocked``: catalogue rows no source may propose)."""
    config = context.config
    catalogue = context.catalogue
    n = config.retrieval.candidates_per_source
    if strategy not in STRATEGY_SOURCES:
        raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGY_SOURCES)}")
    if strategy == "collaborative":
        if query is not None:
            return catalogue.lexical_search(query, history, n, now_s, blocked=blocked)
        return catalogue.collaborative(history, n, now_s, blocked=blocked)
    dense_only = dense_only or strategy == "content"
    if query is not None:
        return catalogue.search(query, query_vector, n, now_s, dense_only=dense_only, blocked=blocked)
    vector = catalogue.user_vector(history, now_s, config.embed.user_half_life_days)
    if strategy == "content" and vector is None:  # no history, no user vector: what a cold start gets
        return catalogue.popular_only(history, n, now_s, blocked=blocked)
    return catalogue.recommend(vector, history, n, now_s, dense_only=dense_only, blocked=blocked)


@dataclass
class RankInputs:
    """One request's candidates and their feature matrix."""

    candidates: Candidates
    features: np.ndarray


def rank_inputs(
    context: RankingContext, user_id: str | None, query: str | None, query_vector: np.ndarray | None, now_s: float
) -> RankInputs:
    """Candidates and features of one request as of ``now_s``: the offline rows and the online ranker's."""
    history = context.events.history(user_id, now_s, context.config.features.history_events)
    candidates = retrieve(context, history, query, query_vector, now_s)
    features = compute_features(candidates, history, now_s, context.catalogue.stats, is_search=query is not None)
    return RankInputs(candidates, features)
