"""The diversity rule applied after ranking, the same online (Serve) and offline (the evaluation).

A ranker scores each product alone, so five shoes of one brand can fill the top five
of "running shoes for women" when that brand's shoes all look alike to it. After
ranking, the top ``k`` takes candidates in score order but at most
``policy.diversity.max_per_brand`` of one brand (default 2), and on recommendations at most
``policy.diversity.max_per_category`` of one category leaf (default 2; a search names its category
itself). A brand the search names is exempt ("nike running shoes" wants Nike), and
a product without a brand belongs to no brand group. When the candidates cannot fill
``k`` under the limits, the best of those skipped fill the rest, in score order: a
full answer is better than a diverse short one.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from shoprank.config import Config

NO_GROUP = -1
"""A group code that no limit applies to (a product without a brand)."""


def group_codes(values: Sequence[str | None]) -> tuple[np.ndarray, list[str]]:
    """Dense integer codes of ``values`` (:data:`NO_GROUP` for a missing or blank one), and the value of each code."""
    known = sorted({v for v in values if v and v.strip()})
    code = {v: i for i, v in enumerate(known)}
    return np.array([code.get(v, NO_GROUP) if v else NO_GROUP for v in values], dtype=np.int64), known


class BrandsNamed:
    """Which brands a query names (whole words, any case): the brand limit leaves them out."""

    def __init__(self, names: list[str]) -> None:
        self.code = {name.lower(): i for i, name in enumerate(names)}
        alternatives = "|".join(re.escape(name) for name in sorted(self.code, key=len, reverse=True))
        self.pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)") if self.code else None

    def __call__(self, query: str | None) -> list[int]:
        if not query or self.pattern is None:
            return []
        return [self.code[found] for found in self.pattern.findall(query.lower())]


@dataclass(frozen=True)
class Diversity:
    """The limits per answer; None: no limit."""

    max_per_brand: int | None = 2
    max_per_category: int | None = 2

    @classmethod
    def of(cls, config: Config) -> Diversity:
        return cls(config.policy.diversity.max_per_brand, config.policy.diversity.max_per_category)

    def limits(self, brand: np.ndarray, category: np.ndarray, is_search: bool,
               named: list[int] = ()) -> list[tuple[np.ndarray, int]]:
        """(group codes, limit) pairs for one request's candidates (codes aligned with them); ``named``: the brand
        codes the search names, exempt."""
        if len(named):
            brand = np.where(np.isin(brand, named), NO_GROUP, brand)
        found = [(brand, self.max_per_brand)] if self.max_per_brand else []
        if not is_search and self.max_per_category:
            found.append((category, self.max_per_category))
        return found


def diversified(order: Sequence[int] | np.ndarray, k: int, limits: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """The first ``k`` of ``order`` (candidate positions, best first) under ``limits`` (see the module docstring)."""
    order = np.asarray(order, dtype=np.int64)
    if not limits:
        return order[:k]
    taken: list[int] = []
    skipped: list[int] = []
    counts = [Counter() for _ in limits]
    for position in order:
        keys = [int(codes[position]) for codes, _ in limits]
        if all(key == NO_GROUP or count[key] < limit for key, count, (_, limit) in zip(keys, counts, limits)):
            taken.append(int(position))
            for key, count in zip(keys, counts):
                count[key] += 1
            if len(taken) == k:
                break
        else:
            skipped.append(int(position))
    else:
        taken += skipped[: k - len(taken)]
    return np.array(taken, dtype=np.int64)


class DiverseTop:
    """The rule bound to a catalogue: each evaluated system's order cut to its top ``k`` the way Serve cuts it."""

    def __init__(self, diversity: Diversity, products: pa.Table, queries: dict[str, str]) -> None:
        """``queries``: each search request's query (a request not in it is a recommendation)."""
        ids = products.column("product_id").to_pylist()
        self.diversity = diversity
        self.row_of = {p: i for i, p in enumerate(ids)}
        self.brand, brand_names = group_codes(products.column("brand").to_pylist())
        self.category, _ = group_codes(products.column("category").to_pylist())
        self.named = BrandsNamed(brand_names)
        self.queries = queries

    def top(self, request_id: str, ordered: list[str], k: int) -> list[str]:
        """``ordered`` (product ids, best first) cut to ``k`` under the limits for ``request_id``."""
        rows = np.array([self.row_of[p] for p in ordered], dtype=np.int64)
        query = self.queries.get(request_id)
        limits = self.diversity.limits(self.brand[rows], self.category[rows], query is not None, self.named(query))
        return [ordered[i] for i in diversified(np.arange(len(ordered)), k, limits)]
