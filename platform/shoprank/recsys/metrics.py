"""Offline ranking metrics: one small, dependency-light implementation for every stage.

Retrieval, re-ranking and the final evaluation report all score their output
with these functions, so a number in one stage's manifest means the same thing
as the same number in another's. They are written in plain numpy (no sklearn,
no torch) because they run inside Ray workers and training loops where an
extra heavy import, or a library whose defaults change between versions, is a
liability; ``tests/test_metrics.py`` pins them against scikit-learn instead.

Conventions shared by every function:

* A ranking is a sequence of item ids, best first. Rank positions are 1-based.
* Relevance is either a collection of relevant ids or a mapping id -> graded
  label (e.g. ESCI: Exact 3, Substitute 2, Complement 1, Irrelevant 0). With a
  mapping, an item is *relevant* when its label is > 0; items missing from the
  mapping are unjudged and count as irrelevant (label 0), the usual pooled-
  judgment assumption.
* An id repeated in a ranking earns credit only at its first position. A
  ranker that returns duplicates is buggy, and letting the copy score again
  would push NDCG above 1 and reward the bug.
* A cutoff ``k`` must be an integer >= 1; anything else raises ``ValueError``
  naming ``k``, since a silent ``k=0`` would report a perfect-looking 0.0
  everywhere and hide the mistake.
* When a query has nothing relevant, the metric is 0.0 rather than NaN or an
  error, so that means over many queries stay finite. Callers that want to
  exclude such queries from an average must filter them out beforehand.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Literal

import numpy as np

__all__ = [
    "auc",
    "bootstrap_mean",
    "catalog_coverage",
    "hit_rate_at_k",
    "mean_metrics",
    "ndcg_at_k",
    "recall_at_k",
    "reciprocal_rank",
]

Relevant = Mapping[str, int] | Collection[str]
"""Relevant ids, or graded labels where an id is relevant when its label is > 0."""


def _check_k(k: int, name: str = "k") -> int:
    """Return ``k`` as an int, or raise ValueError unless it is an integer >= 1."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= 1, got {k!r}")
    if k < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {k}")
    return int(k)


def _relevant_set(relevant: Relevant) -> set[str]:
    """The ids that count as relevant: all of a collection, or labels > 0 of a mapping."""
    if isinstance(relevant, str):
        # A bare string is a Collection[str] of its characters; that is never what is meant.
        raise TypeError("relevant must be a collection of ids or a mapping id -> label, not a str")
    if isinstance(relevant, Mapping):
        return {item for item, label in relevant.items() if label > 0}
    return set(relevant)


def _top_k_unique(ranked: Sequence[str], k: int | None) -> list[str | None]:
    """The first ``k`` positions of ``ranked`` (all when k is None), repeats masked.

    A repeated id is replaced by ``None`` (which matches no id) rather than
    removed, so later items keep their positions: index i is always rank i + 1.
    """
    head = list(ranked) if k is None else list(ranked[:k])
    seen: set[str] = set()
    out: list[str | None] = []
    for item in head:
        if item in seen:
            out.append(None)
        else:
            seen.add(item)
            out.append(item)
    return out


def recall_at_k(ranked: Sequence[str], relevant: Relevant, k: int) -> float:
    """Fraction of the relevant items that appear in the top ``k`` of ``ranked``.

    Recall is the metric of candidate generation: a re-ranker can only reorder
    what retrieval returned, so what matters is how much of the relevant set
    made it into the first ``k`` at all, regardless of order.

    Returns 0.0 when there is no relevant item. Recall is undefined there
    (0/0); 0.0 keeps averages finite and does not reward a query that has
    nothing to find. Note that such queries therefore pull a mean down.
    """
    k = _check_k(k)
    rel = _relevant_set(relevant)
    if not rel:
        return 0.0
    found = sum(1 for item in _top_k_unique(ranked, k) if item in rel)
    return found / len(rel)


def ndcg_at_k(
    ranked: Sequence[str],
    relevance: Mapping[str, int],
    k: int,
    gain: Literal["exponential", "linear"] = "exponential",
) -> float:
    """Normalised discounted cumulative gain of the top ``k`` with graded labels.

    DCG@k = sum over ranks r = 1..k of gain(label of item at r) / log2(r + 1),
    and NDCG divides by the DCG of the ideal ordering, so 1.0 means no
    reordering of the judged items could do better.

    Gains are exponential (2^label - 1) by default because graded labels are
    ordinal, not proportional: in shopping search an Exact match (3) is worth
    far more than a Substitute (2), which in turn beats a Complement (1).
    Exponential gain makes putting the single best item first dominate, which
    matches how users buy; it is also the form used by the LETOR/MSLR
    benchmarks and by LambdaMART objectives (e.g. XGBoost's ``rank:ndcg``), so
    offline numbers line up with the training loss. ``gain="linear"`` uses the
    label itself (as ``sklearn.metrics.ndcg_score`` does); the two coincide for
    binary labels.

    The ideal DCG is computed from *all* judged labels of the query, not only
    from those the ranking retrieved, so a ranking that misses a highly
    relevant item is penalised for it. Unjudged items have gain 0. Returns 0.0
    when the ideal DCG is 0 (no item has a positive label): NDCG is undefined
    there, and 0.0 keeps averages finite.

    Raises ValueError for a negative label (its gain would be negative and
    NDCG could leave [0, 1]) or an unknown ``gain``.
    """
    k = _check_k(k)
    if gain not in ("exponential", "linear"):
        raise ValueError(f"gain must be 'exponential' or 'linear', got {gain!r}")
    labels = np.fromiter(relevance.values(), dtype=np.float64, count=len(relevance))
    if labels.size and labels.min() < 0:
        bad = next(item for item, label in relevance.items() if label < 0)
        raise ValueError(f"relevance labels must be >= 0, got {relevance[bad]!r} for {bad!r}")

    def to_gain(values: np.ndarray) -> np.ndarray:
        return np.exp2(values) - 1.0 if gain == "exponential" else values

    # Discounts 1 / log2(r + 1) for ranks r = 1..k, shared by DCG and ideal DCG.
    discounts = 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))

    ideal_labels = np.sort(labels)[::-1][:k]
    ideal_dcg = float(to_gain(ideal_labels) @ discounts[: ideal_labels.size])
    if ideal_dcg <= 0.0:
        return 0.0

    top = _top_k_unique(ranked, k)
    got = np.array([relevance.get(item, 0) if item is not None else 0 for item in top], dtype=np.float64)
    dcg = float(to_gain(got) @ discounts[: got.size])
    return dcg / ideal_dcg


def reciprocal_rank(ranked: Sequence[str], relevant: Relevant, k: int | None = None) -> float:
    """1 / rank of the first relevant item in ``ranked`` (within the top ``k`` if given), else 0.

    Reciprocal rank models a user who wants one good result and stops at the
    first: it rewards moving that result up, with most of the credit in the top
    few positions. Averaged over queries it is MRR. 0.0 when nothing relevant
    is found (including when there is no relevant item at all).
    """
    if k is not None:
        k = _check_k(k)
    rel = _relevant_set(relevant)
    for rank, item in enumerate(_top_k_unique(ranked, k), start=1):
        if item in rel:
            return 1.0 / rank
    return 0.0


def hit_rate_at_k(ranked: Sequence[str], relevant: Relevant, k: int) -> float:
    """1.0 if any relevant item appears in the top ``k`` of ``ranked``, else 0.0.

    The coarsest success signal ("did the shopper see at least one right
    product on the first page?"). For a single held-out item, as in
    next-purchase recommendation, it equals recall@k.
    """
    k = _check_k(k)
    rel = _relevant_set(relevant)
    return 1.0 if any(item in rel for item in _top_k_unique(ranked, k)) else 0.0


def auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Binary ROC AUC: the probability that a random positive outscores a random negative.

    Used for pointwise models such as click or purchase classifiers, where the
    question is how well the score separates the classes regardless of any
    threshold. Computed with the Mann–Whitney U statistic on ranks of the
    scores, O(n log n), with tied scores given their average rank: a tie
    between a positive and a negative counts as half a correct pair, exactly
    the area under the ROC curve's diagonal segment through the tie.

    ``labels`` must be 0/1 (or booleans) and ``scores`` finite, both 1-D and of
    the same length. Raises ValueError otherwise, and when only one class is
    present, since AUC compares positives with negatives and is undefined
    without both.
    """
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"labels and scores must have the same length, got {y.size} and {s.size}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite (no NaN or inf)")
    if y.dtype != np.bool_:
        if not np.all(np.isin(y, (0, 1))):
            raise ValueError(f"labels must be 0/1, got values {np.unique(y)[:10].tolist()}")
    positive = y.astype(bool)
    n_pos = int(positive.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        present = "no labels" if y.size == 0 else f"only class {1 if n_pos else 0}"
        raise ValueError(
            f"AUC is undefined with only one class present: need both positive (1) and "
            f"negative (0) labels, got {present} ({y.size} samples)"
        )
    # Average 1-based ranks: a run of c tied scores ending at cumulative count m
    # occupies ranks m - c + 1 .. m, whose mean is m - (c - 1) / 2.
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = avg_rank[inverse.reshape(-1)]
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def catalog_coverage(
    recommendation_lists: Iterable[Sequence[str]],
    catalog_size: int,
    k: int | None = None,
) -> float:
    """Share of the catalog that appears in the top ``k`` of at least one list.

    Accuracy metrics alone favour recommending the same bestsellers to
    everyone; coverage exposes that. A model with similar NDCG but far higher
    coverage surfaces more of the assortment (long-tail sales, fewer
    never-shown products). ``k=None`` uses whole lists.

    Raises ValueError when ``catalog_size`` < 1 or when the lists contain more
    distinct ids than ``catalog_size``, which means the size is wrong (or the
    lists contain ids outside the catalog) and the share would exceed 1.
    """
    if k is not None:
        k = _check_k(k)
    size = _check_k(catalog_size, name="catalog_size")
    shown: set[str] = set()
    for items in recommendation_lists:
        shown.update(items if k is None else items[:k])
    if len(shown) > size:
        raise ValueError(
            f"recommendation lists contain {len(shown)} distinct items but catalog_size is {size}"
        )
    return len(shown) / size


def mean_metrics(
    runs: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Mapping[str, int]],
    k: int = 10,
) -> dict[str, float]:
    """Mean recall@k, NDCG@k (exponential gain), MRR and hit rate@k over the queries in ``qrels``.

    ``runs`` maps query id -> ranked item ids; ``qrels`` maps query id -> {item
    id: graded label}. The average is taken over the queries in ``qrels``, the
    judged set, not over ``runs``: a query the system returned nothing for
    scores 0 on every metric instead of silently dropping out (which would
    flatter a system that fails on hard queries), and run entries for unjudged
    queries are ignored. A judged query with no positive label also scores 0
    everywhere (see the module docstring); drop such queries from ``qrels``
    first if they should not count.

    MRR uses the whole ranked list (no cutoff), hence the key ``mrr`` without
    ``@k``; the other metrics are cut at ``k``.

    Returns ``{"recall@{k}": ..., "ndcg@{k}": ..., "mrr": ..., "hit_rate@{k}": ...}``.
    Raises ValueError when ``qrels`` is empty, since a mean of no queries is
    undefined.
    """
    k = _check_k(k)
    if not qrels:
        raise ValueError("qrels is empty: no judged queries to average over")
    n = len(qrels)
    scores = np.zeros((n, 4), dtype=np.float64)
    for row, (query_id, judged) in enumerate(qrels.items()):
        ranked = runs.get(query_id)
        if ranked is None or len(ranked) == 0:
            continue  # no ranked list: all metrics 0
        scores[row] = (
            recall_at_k(ranked, judged, k),
            ndcg_at_k(ranked, judged, k),
            reciprocal_rank(ranked, judged),
            hit_rate_at_k(ranked, judged, k),
        )
    means = scores.mean(axis=0)
    return {
        f"recall@{k}": float(means[0]),
        f"ndcg@{k}": float(means[1]),
        "mrr": float(means[2]),
        f"hit_rate@{k}": float(means[3]),
    }


BOOTSTRAP_RESAMPLES = 2_000


def bootstrap_mean(values: Sequence[float] | np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """The mean of per-shopper (or per-request) ``values`` and its 95% bootstrap interval: the units resampled with
    replacement :data:`BOOTSTRAP_RESAMPLES` times. Paired differences are the same call on the differences."""
    values = np.asarray(values, dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(values), (BOOTSTRAP_RESAMPLES, len(values)))
    low, high = np.quantile(values[draws].mean(axis=1), [0.025, 0.975])
    return float(values.mean()), float(low), float(high)
