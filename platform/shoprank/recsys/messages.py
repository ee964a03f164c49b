"""What crosses between the Serve deployments: a request as a variant receives it, and its answer.

Apart from :mod:`shoprank.recsys.answer`, which computes them, so that the replicas that only pass them
on (the HTTP ingress) unpickle them without importing PyTorch, transformers and the ranker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Strategy = Literal["ranker", "retrieval", "content", "collaborative"]
"""Where a variant's candidates come from and how it orders them (:data:`shoprank.recsys.retrieval.STRATEGY_SOURCES`):
``ranker`` (hybrid: every candidate source, ordered by the XGBoost ranker), ``retrieval`` (every source, ordered by
``cosine + 0.01 * bm25 + w * popularity``, no trained ranker), ``content`` (the encoder alone: its nearest products
to the query or the shopper's history embedding, by cosine) and ``collaborative`` (behaviour alone: the item-item
model's products for the shopper's engaged ones; a search's BM25 matches re-ordered by the same item-item score)."""
LiveEvent = tuple[str, str, float]
"""(product_id, event_type, ts_s): an event received after the run's data."""
OTHER, BASE = "other features", "base"
"""The last two names of an item's contributions: the features beyond the largest ones together, and the ranker's
bias (its score of an average candidate)."""


@dataclass
class Ranked:
    """One product of an answer: the score that ordered it and what made that score.

    ``contributions`` are the score's parts, largest first: the features that moved it most (the ranker's
    SHAP values, or the baseline's terms), then ``other features`` (the rest together) and ``base`` (the
    ranker's score of an average candidate); they add up to ``score``. A feature without a value for this
    product (a rate over nothing) is named ``<feature> (no value)``: its part is what the model makes of
    the missing value.
    """

    product_id: str
    score: float
    contributions: dict[str, float]
    shown: dict | None = None
    """The product as the answering replica's live catalogue holds it (title, category, brand, price): a change
    put a moment ago shows in the answer that ranked with it; None: the run's row."""
    explored: bool = False
    """Placed by the exploration policy (a slot for a product with little exposure), not by its score."""


@dataclass
class Asked:
    """One search (``query``) or recommendation as a variant answers it; ``live``: the user's events received since
    the run's data (the variant replica fills them in from its user cache)."""

    user_id: str | None
    live: list[LiveEvent]
    query: str | None
    k: int
    now_s: float
    hidden: tuple[tuple[str, str], ...] = ()
    """(event_type, product_id) of each "not interested" the user sent live (the variant replica fills them in)."""
    request_id: str = ""
    """The answer's id: seeds the exploration draw, so one request is answered the same way twice."""


@dataclass
class Answered:
    """A request's top ``k``, and how many events of the user's history it saw (none: not personal)."""

    items: list[Ranked]
    history_events: int
    replica: str = ""
    """The Serve replica that answered (the ``x-shoprank-replica`` header): which one saw what, when debugging."""
