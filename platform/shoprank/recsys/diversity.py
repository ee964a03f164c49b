"""The diversity re-ranking applied after ranking, the same online (Serve) and offline (the evaluation).

A ranker scores each product alone, so five shoes of one brand can fill the top five
of "running shoes for women" when that brand's shoes all look alike to it. After
ranking, the top ``k`` is chosen by maximal marginal relevance (MMR, Carbonell and
Goldstein 1998): one product at a time, the candidate with the highest

    score / spread - strength * max(similarity to each product already taken)

where ``spread`` is the standard deviation of the request's candidate scores (so a
strength means the same for a ranker's margins, a cosine or a popularity count), and
the similarity of two products is the share of their groups they have in common: the
brand on a search (its query names its category itself), brand and category leaf on a
recommendation. A brand the search names is exempt ("nike running shoes" wants Nike),
and a product without a brand (or category) shares that group with none. Strength 0 is
the ranker's own order; unlike a hard cap, a product that scores far above the next
still comes first even when its brand is already shown.

The strength is chosen per task on the validation split by the evaluate stage
(:func:`shoprank.evaluation.offline.choose_strength`: the strongest setting of
:data:`STRENGTHS` whose NDCG@10 stays within ``policy.diversity.ndcg_tolerance`` of the
undiversified list), recorded in the run (:data:`DIVERSITY`), and read back by Serve
(:meth:`DiversityDecision.load`), so offline figures and live answers share it.
``policy.diversity.max_per_brand``/``max_per_category`` remain as optional hard caps (off
by default), applied to the re-ranked order: the best of those skipped fill the rest
when the candidates cannot fill ``k`` under them (a full answer beats a diverse short one).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from shoprank.config import Config
from shoprank.errors import ShopRankError
from shoprank.store.run import Run

NO_GROUP = -1
"""A group code that no limit or similarity applies to (a product without a brand)."""
Task = Literal["search", "recommend"]
TASKS: tuple[Task, ...] = ("search", "recommend")
STRENGTHS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
"""The strengths the evaluate stage tries on the validation split (in score standard deviations per unit of
similarity): at 3 a product of a brand already shown comes next only when it scores 3 deviations above the best
of a new brand, about what hard caps do."""
DIVERSITY = ("evaluation", "diversity.json")
"""Where the run records the chosen strength per task (:class:`DiversityDecision`)."""


def group_codes(values: Sequence[str | None]) -> tuple[np.ndarray, list[str]]:
    """Dense integer codes of ``values`` (:data:`NO_GROUP` for a missing or blank one), and the value of each code."""
    known = sorted({v for v in values if v and v.strip()})
    code = {v: i for i, v in enumerate(known)}
    return np.array([code.get(v, NO_GROUP) if v else NO_GROUP for v in values], dtype=np.int64), known


class BrandsNamed:
    """Which brands a query names (whole words, any case): diversity leaves them out."""

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
    """The re-ranking per answer: MMR strength per task (0: the ranker's order), optional hard caps (None: none)."""

    strength: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TASKS, 0.0))
    max_per_brand: int | None = None
    max_per_category: int | None = None

    @classmethod
    def of(cls, config: Config, run: Run | None = None) -> Diversity:
        """``config``'s caps with its strength: the fixed ``policy.diversity.strength``, or under ``auto`` the one the
        evaluate stage chose on ``run``'s validation split (:class:`DiversityDecision`; without a run: none)."""
        setting = config.policy.diversity
        if setting.strength != "auto":
            strength = dict.fromkeys(TASKS, float(setting.strength))
        elif run is not None:
            strength = DiversityDecision.load(run).strength
        else:
            strength = dict.fromkeys(TASKS, 0.0)
        return cls(strength, setting.max_per_brand, setting.max_per_category)

    def at(self, strength: float) -> Diversity:
        """The same caps at one strength for every task (the evaluate stage's trials)."""
        return replace(self, strength=dict.fromkeys(TASKS, strength))

    def groups(self, brand: np.ndarray, category: np.ndarray, is_search: bool,
               named: Sequence[int] = ()) -> list[np.ndarray]:
        """The group codes two candidates are compared on (codes aligned with them); ``named``: the brand codes the
        search names, in no group."""
        if len(named):
            brand = np.where(np.isin(brand, named), NO_GROUP, brand)
        return [brand] if is_search else [brand, category]

    def limits(self, groups: list[np.ndarray], is_search: bool) -> list[tuple[np.ndarray, int]]:
        """The hard caps as (group codes, limit) pairs over :meth:`groups`' codes; categories only on
        recommendations."""
        caps = [self.max_per_brand] if is_search else [self.max_per_brand, self.max_per_category]
        return [(codes, cap) for codes, cap in zip(groups, caps) if cap]

    def top(self, order: np.ndarray, scores: np.ndarray, k: int, brand: np.ndarray, category: np.ndarray,
            is_search: bool, named: Sequence[int] = ()) -> np.ndarray:
        """The first ``k`` of ``order`` (candidate positions, best first; ``scores``, ``brand``, ``category`` aligned
        with positions) after the re-ranking and the caps."""
        groups = self.groups(brand, category, is_search, named)
        strength = self.strength["search" if is_search else "recommend"]
        reranked = mmr(np.asarray(order, dtype=np.int64), np.asarray(scores, dtype=np.float64), k, groups, strength)
        return diversified(reranked, k, self.limits(groups, is_search))


def mmr(order: np.ndarray, scores: np.ndarray, k: int, groups: list[np.ndarray], strength: float) -> np.ndarray:
    """``order`` with its first ``k`` chosen by maximal marginal relevance (module docstring), the rest after them in
    their order. Ties go to the earlier position in ``order``, so strength 0 (or no group) is ``order`` itself."""
    if strength <= 0 or len(order) < 2 or not groups or all((codes[order] == NO_GROUP).all() for codes in groups):
        return order
    relevance = scores[order]
    spread = float(relevance.std())
    relevance = relevance / spread if spread > 0 else relevance
    codes = [g[order] for g in groups]
    similarity = np.zeros(len(order))
    free = np.ones(len(order), dtype=bool)
    chosen: list[int] = []
    for _ in range(min(k, len(order))):
        value = np.where(free, relevance - strength * similarity, -np.inf)
        best = int(np.argmax(value))
        chosen.append(best)
        free[best] = False
        shared = sum(((c == c[best]) & (c != NO_GROUP)).astype(np.float64) for c in codes) / len(codes)
        similarity = np.maximum(similarity, shared)
    return np.concatenate([order[chosen], order[free]])


def diversified(order: Sequence[int] | np.ndarray, k: int, limits: list[tuple[np.ndarray, int]]) -> np.ndarray:
    """The first ``k`` of ``order`` (candidate positions, best first) under the hard caps ``limits`` (the module
    docstring)."""
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


@dataclass(frozen=True)
class DiversityDecision:
    """The strength per task the evaluate stage chose on the validation split, and what each tried one scored."""

    strength: dict[str, float]
    tolerance: float
    trials: dict[str, list[dict[str, float]]]
    """Per task, each strength tried: its validation NDCG@10 and mean distinct brands and categories in the top 10."""
    reason: dict[str, str]

    def save(self, run: Run) -> None:
        run.write_json(asdict(self), *DIVERSITY)

    @classmethod
    def load(cls, run: Run) -> DiversityDecision:
        if not run.exists(*DIVERSITY):
            raise ShopRankError(f"{run.uri()}: no {'/'.join(DIVERSITY)} (policy.diversity.strength: auto is chosen by "
                                "the evaluate stage): run the pipeline on it again, or set a fixed strength")
        return cls(**run.read_json(*DIVERSITY))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class DiverseTop:
    """The re-ranking bound to a catalogue: each evaluated system's order cut to its top ``k`` the way Serve cuts it,
    and the intra-list diversity of a list."""

    def __init__(self, diversity: Diversity, products: pa.Table, queries: dict[str, str]) -> None:
        """``queries``: each search request's query (a request not in it is a recommendation)."""
        ids = products.column("product_id").to_pylist()
        self.diversity = diversity
        self.row_of = {p: i for i, p in enumerate(ids)}
        self.brand, brand_names = group_codes(products.column("brand").to_pylist())
        self.category, _ = group_codes(products.column("category").to_pylist())
        self.named = BrandsNamed(brand_names)
        self.queries = queries

    def top(self, request_id: str, ordered: list[str], scores: Sequence[float], k: int) -> list[str]:
        """``ordered`` (product ids, best first, with their ``scores``) cut to ``k`` under the re-ranking for
        ``request_id``."""
        rows = np.array([self.row_of[p] for p in ordered], dtype=np.int64)
        query = self.queries.get(request_id)
        chosen = self.diversity.top(np.arange(len(ordered)), np.asarray(scores, dtype=np.float64), k, self.brand[rows],
                                    self.category[rows], query is not None, self.named(query))
        return [ordered[i] for i in chosen]

    def distinct(self, shown: list[str]) -> tuple[int, int]:
        """How many brands and category leaves ``shown`` holds (a product without one adds none)."""
        rows = [self.row_of[p] for p in shown if p in self.row_of]
        return (len({int(self.brand[r]) for r in rows} - {NO_GROUP}),
                len({int(self.category[r]) for r in rows} - {NO_GROUP}))
