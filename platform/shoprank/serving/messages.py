"""What crosses between the Serve deployments: a request as a variant receives it, and its answer.

Apart from :mod:`shoprank.serving.pipeline`, which computes them, so that the replicas that only pass them
on (the HTTP ingress) unpickle them without importing PyTorch, transformers and the ranker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Strategy = Literal["ranker", "retrieval"]
"""How a variant orders its candidates: the XGBoost ranker, or the retrieval baseline that needs none."""
LiveEvent = tuple[str, str, float]
"""(product_id, event_type, ts_s): an event received after the run's data."""


@dataclass
class Ranked:
    """One product of an answer: the score that ordered it and the per-item scores that explain it."""

    product_id: str
    score: float
    scores: dict[str, float]


@dataclass
class Asked:
    """One search (``query``) or recommendation as a variant receives it: the user's live events come with it."""

    user_id: str | None
    live: list[LiveEvent]
    query: str | None
    k: int
    now_s: float


@dataclass
class Answered:
    """A request's top ``k``, and how many events of the user's history it saw (none: not personal)."""

    items: list[Ranked]
    history_events: int
