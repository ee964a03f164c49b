"""One variant's answer path, free of Ray: query encoder -> retrieval -> ranker, and live events.

:class:`VariantPipeline` holds a run's :class:`RankingContext` (encoder, catalogue,
index, BM25, event log) and, for the ``ranker`` strategy, its booster. It answers
searches and recommendations as of a time, and :meth:`VariantPipeline.observe`
records an event so the very next answer for that user reflects it. The features
come from :func:`shoprank.ranker.dataset.rank_inputs`, the function the offline
training rows came from.

Strategies: ``ranker`` orders candidates by the XGBoost ranker; ``retrieval``
orders them by encoder similarity (plus BM25 for searches), popularity breaking
ties: the baseline that needs no trained ranker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import xgboost

from shoprank.ranker.context import RankingContext
from shoprank.ranker.dataset import rank_inputs
from shoprank.ranker.features import COLUMN
from shoprank.ranker.train import predict

Strategy = Literal["ranker", "retrieval"]
EXPLAINED = ("cosine", "bm25", "popularity", "ctr", "category_affinity", "brand_affinity")
"""Per-item scores returned with every answer, beside the score that ordered it."""


@dataclass
class Ranked:
    product_id: str
    score: float
    scores: dict[str, float]


class VariantPipeline:
    """Search and recommend for one variant (see the module docstring)."""

    def __init__(self, context: RankingContext, strategy: Strategy, booster: xgboost.Booster | None = None) -> None:
        if strategy == "ranker" and booster is None:
            raise ValueError("the ranker strategy needs a booster")
        self.context = context
        self.strategy = strategy
        self.booster = booster

    def search(self, query: str, user_id: str | None, k: int, now_s: float) -> list[Ranked]:
        vector = self.context.encode_queries([query])[0]
        return self._answer(user_id, query, vector, k, now_s)

    def recommend(self, user_id: str | None, k: int, now_s: float) -> list[Ranked]:
        return self._answer(user_id, None, None, k, now_s)

    def observe(self, user_id: str, product_id: str, event_type: str, ts_s: float) -> None:
        """Add a live event to the user's history (events of one user arrive in time order)."""
        row = self.context.catalogue.stats.row_of[product_id]
        self.context.events.append(user_id, row, event_type, ts_s)

    def _answer(self, user_id: str | None, query: str | None, vector: np.ndarray | None, k: int,
                now_s: float) -> list[Ranked]:
        inputs = rank_inputs(self.context, user_id, query, vector, now_s)
        features = inputs.features
        if self.strategy == "ranker":
            scores = predict(self.booster, features)
        else:
            scores = features[:, COLUMN["cosine"]] + 0.01 * features[:, COLUMN["bm25"]]
        tie_break = features[:, COLUMN["popularity"]]
        order = np.lexsort((-tie_break, -scores))[:k]
        ids = self.context.catalogue.stats.product_ids
        return [
            Ranked(ids[inputs.candidates.rows[i]], float(scores[i]),
                   {name: float(features[i, COLUMN[name]]) for name in EXPLAINED})
            for i in order
        ]


def describe(ranked: list[Ranked]) -> list[dict[str, Any]]:
    """JSON-ready items: rank, product, the score that ordered it and the scores behind it."""
    return [{"rank": i + 1, "product_id": r.product_id, "score": r.score, "scores": r.scores}
            for i, r in enumerate(ranked)]
