"""User embeddings: one function of a user's recent history, offline and online alike.

A user's embedding is the normalised, weighted mean of the embeddings of the
products they interacted with. Each interaction weighs its engagement (a view
0.25, a click 1, an add to cart 2, a purchase 3) times its recency,
``0.5 ** (age_days / half_life_days)`` with the age measured back from the user's
latest event, so the newest strong signals dominate and old browsing fades. The
batch job and the serving path call this same function, so a user's embedding
does not depend on where it was computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EVENT_WEIGHTS: dict[str, float] = {"view": 0.25, "click": 1.0, "add_to_cart": 2.0, "purchase": 3.0}


def user_embedding(
    product_embeddings: np.ndarray,
    event_types: Sequence[str],
    ages_days: Sequence[float],
    half_life_days: float,
) -> np.ndarray | None:
    """The user's embedding from aligned history rows; None when there is no history. ``event_types`` are
    behaviour (:data:`EVENT_WEIGHTS`' keys): a "not interested" says what not to show, not what the shopper is
    like, and every history is built without them (the run's ``user_histories``, ``EventLog``, the user cache)."""
    if len(event_types) == 0:
        return None
    weights = np.array([EVENT_WEIGHTS[t] for t in event_types]) * 0.5 ** (np.asarray(ages_days) / half_life_days)
    vector = (weights[:, None] * product_embeddings).sum(axis=0)
    norm = np.linalg.norm(vector)
    return (vector / norm).astype(np.float32) if norm > 0 else None
