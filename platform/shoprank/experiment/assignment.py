"""Assigning users to variants: a salted hash, stable per user and experiment.

``assign(user, experiment, split)`` hashes ``experiment:user`` (the experiment name
is the salt) to a point in [0, 1) and walks the configured split. The same user
gets the same variant for as long as the experiment and split stay the same, on
every replica and after every restart, with no state to store; a new experiment
name reshuffles everyone independently of the last one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping


def unit_interval(key: str) -> float:
    """A uniform point in [0, 1) from a string (first 8 bytes of its SHA-256)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def assign(user_id: str, experiment: str, split: Mapping[str, float]) -> str:
    """The variant of ``user_id``; ``split`` maps variant -> share (shares are normalised)."""
    if not split or any(share < 0 for share in split.values()) or sum(split.values()) <= 0:
        raise ValueError(f"split must give each variant a non-negative share, summing to more than 0: {dict(split)}")
    point = unit_interval(f"{experiment}:{user_id}") * sum(split.values())
    edge = 0.0
    for variant, share in split.items():
        edge += share
        if point < edge:
            return variant
    return next(reversed(list(split)))
