"""Candidate retrieval: what the ranker chooses from, for a search and for a recommendation.

* **Search**: the top N products by encoder similarity to the query (the run's FAISS
  index) plus the top N by BM25 (``bm25s``) over the same product texts, merged.
* **Recommendation**: the top N by similarity to the user's embedding, plus products
  co-engaged with the user's recent products, plus the N most popular products of
  each of the user's three favourite categories and of their favourite department
  (the categories' parent). A user without history (cold start) gets the most
  popular and the trending products.

Every candidate keeps its encoder cosine, BM25 score, the sources that proposed it
(bits of :data:`shoprank.ranker.features.SOURCES`) and its best position in any
source: the ranker's features start from these.
"""

from __future__ import annotations

from dataclasses import dataclass

import bm25s
import faiss
import numpy as np

from shoprank.ranker.features import SOURCES, Candidates, History, ProductStats
from shoprank.encoder.users import user_embedding

FAVOURITE_CATEGORIES = 3
RECENT_ITEMS = 10


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
    trending: np.ndarray
    """Catalogue rows by engagements in the last days before the cut-off, most first."""
    bm25_k1: float = 1.5
    bm25_b: float = 0.75

    def __post_init__(self) -> None:
        self.bm25 = bm25s.BM25(k1=self.bm25_k1, b=self.bm25_b)
        self.bm25.index(bm25s.tokenize(self.texts, stopwords="en", show_progress=False), show_progress=False)
        by_popularity = np.argsort(-self.stats.popularity, kind="stable")
        self.popular = by_popularity
        self.popular_in = {
            int(c): by_popularity[self.stats.category[by_popularity] == c] for c in np.unique(self.stats.category)
        }
        self.popular_in_department = {
            int(d): by_popularity[self.stats.department[by_popularity] == d] for d in np.unique(self.stats.department)
        }

    def bm25_scores(self, query: str) -> np.ndarray:
        """BM25 score of ``query`` against every product (catalogue order)."""
        tokens = bm25s.tokenize([query], stopwords="en", show_progress=False, return_ids=False)[0]
        if not tokens:
            return np.zeros(len(self.texts), np.float32)
        return self.bm25.get_scores(tokens).astype(np.float32)

    def nearest(self, vector: np.ndarray, n: int) -> np.ndarray:
        """Catalogue rows of the ``n`` products nearest to ``vector`` in the index."""
        _, found = self.index.search(vector.reshape(1, -1).astype(np.float32), n)
        return self.index_rows[found[0][found[0] >= 0]]

    def user_vector(self, history: History, now_s: float, half_life_days: float) -> np.ndarray | None:
        """The user's embedding at ``now_s`` (the function the embed stage uses for every user)."""
        if not len(history):
            return None
        ages = (now_s - history.ts_s) / 86_400.0
        return user_embedding(self.vectors[history.product_rows], history.event_types, ages, half_life_days)

    def search(self, query: str, query_vector: np.ndarray, n: int) -> Candidates:
        bm25 = self.bm25_scores(query)
        lexical = np.argsort(-bm25, kind="stable")[:n]
        lexical = lexical[bm25[lexical] > 0]
        lists = {"dense": self.nearest(query_vector, n), "lexical": lexical}
        return self._merge(lists, query_vector, bm25)

    def recommend(self, user_vector: np.ndarray | None, history: History, n: int) -> Candidates:
        lists: dict[str, np.ndarray] = {}
        if user_vector is not None:
            lists["dense"] = self.nearest(user_vector, n)
        if len(history):
            recent = list(dict.fromkeys(history.product_rows[::-1].tolist()))[:RECENT_ITEMS]
            neighbours = [self.coengaged.get(r, np.zeros(0, np.int64)) for r in recent]
            lists["coengaged"] = _interleave(neighbours, n)
            favourites = np.bincount(self.stats.category[history.product_rows]).argsort()[::-1][:FAVOURITE_CATEGORIES]
            department = int(np.bincount(self.stats.department[history.product_rows]).argmax())
            popular = [self.popular_in[int(c)][:n] for c in favourites] + [self.popular_in_department[department][:n]]
            lists["popular"] = _interleave(popular, n * len(popular))
        else:
            lists["popular"] = _interleave([self.popular[:n], self.trending[:n]], n)
        return self._merge(lists, user_vector, None)

    def _merge(self, lists: dict[str, np.ndarray], vector: np.ndarray | None, bm25: np.ndarray | None) -> Candidates:
        position: dict[int, int] = {}
        sources: dict[int, int] = {}
        for name, rows in lists.items():
            bit = 1 << SOURCES.index(name)
            for rank, row in enumerate(rows.tolist(), start=1):
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
        )


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
