"""Tests of shoprank.recsys.metrics.

NDCG and AUC are checked against scikit-learn on the same inputs (random,
seeded cases); the rest against small cases computed by hand, with the
arithmetic written out so a reader can verify each expected value.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import ndcg_score, roc_auc_score

from shoprank.recsys.metrics import (
    auc,
    catalog_coverage,
    hit_rate_at_k,
    mean_metrics,
    ndcg_at_k,
    recall_at_k,
    reciprocal_rank,
)

LOG2_3 = math.log2(3)  # discount denominator at rank 2
# rank r is discounted by 1 / log2(r + 1): rank 1 -> 1, rank 2 -> 1/log2(3), rank 3 -> 1/2


# --------------------------------------------------------------------------- helpers


def _random_graded_case(rng: np.random.Generator) -> tuple[list[str], dict[str, int], np.ndarray, np.ndarray, int]:
    """One query with judged items only, tie-free scores, in both our form and sklearn's.

    sklearn's ideal DCG uses every label of the row, ours every judged label;
    the row is exactly the judged items, so both ideals agree. Our ranked list
    is the judged items by descending score, possibly truncated, but never to
    fewer than k items, so sklearn's top k (taken over the full row) is the
    same as ours.
    """
    n = int(rng.integers(2, 25))
    items = [f"p{i}" for i in range(n)]
    labels = rng.integers(0, 5, size=n)  # grades 0..4, all-zero rows possible for small n
    scores = rng.permutation(n).astype(np.float64) + rng.random()  # distinct: no ties
    k = int(rng.integers(1, n + 4))  # sometimes k > n
    order = np.argsort(-scores, kind="stable")
    ranked = [items[i] for i in order]
    cut = int(rng.integers(min(k, n), n + 1))
    ranked = ranked[:cut]
    relevance = {item: int(label) for item, label in zip(items, labels)}
    return ranked, relevance, labels, scores, k


# --------------------------------------------------------------------------- NDCG vs sklearn


def test_ndcg_linear_matches_sklearn_on_random_cases() -> None:
    rng = np.random.default_rng(20240611)
    for _ in range(150):
        ranked, relevance, labels, scores, k = _random_graded_case(rng)
        ours = ndcg_at_k(ranked, relevance, k, gain="linear")
        theirs = ndcg_score(labels[None, :], scores[None, :], k=k)
        assert ours == pytest.approx(theirs, abs=1e-9), (ranked, relevance, k)


def test_ndcg_exponential_matches_sklearn_on_transformed_labels() -> None:
    # Exponential gain with label l is linear gain with label 2**l - 1, and the
    # transform keeps the ideal order, so sklearn on 2**l - 1 is the reference.
    rng = np.random.default_rng(7)
    for _ in range(150):
        ranked, relevance, labels, scores, k = _random_graded_case(rng)
        ours = ndcg_at_k(ranked, relevance, k)  # default gain is exponential
        theirs = ndcg_score((2.0**labels - 1.0)[None, :], scores[None, :], k=k)
        assert ours == pytest.approx(theirs, abs=1e-9), (ranked, relevance, k)


def test_ndcg_mean_over_batch_matches_sklearn_matrix() -> None:
    # sklearn's matrix form averages rows; so must the mean of our per-query values.
    rng = np.random.default_rng(3)
    n_queries, n_items, k = 50, 12, 5
    y_true = rng.integers(0, 4, size=(n_queries, n_items))
    y_score = np.stack([rng.permutation(n_items) for _ in range(n_queries)]).astype(float)
    items = [f"p{i}" for i in range(n_items)]
    ours = []
    for labels, scores in zip(y_true, y_score):
        ranked = [items[i] for i in np.argsort(-scores)]
        ours.append(ndcg_at_k(ranked, dict(zip(items, labels.tolist())), k, gain="linear"))
    assert np.mean(ours) == pytest.approx(ndcg_score(y_true, y_score, k=k), abs=1e-9)


# --------------------------------------------------------------------------- NDCG by hand


def test_ndcg_exponential_by_hand() -> None:
    relevance = {"a": 3, "b": 2, "c": 0, "d": 1}
    ranked = ["c", "a", "x", "b"]  # x is unjudged -> gain 0
    # DCG@3: c gain 0 at rank 1, a gain 2**3-1 = 7 at rank 2, x gain 0 at rank 3
    dcg = 7 / LOG2_3
    # ideal top 3 labels 3, 2, 1 -> gains 7, 3, 1
    idcg = 7 + 3 / LOG2_3 + 1 / 2
    assert ndcg_at_k(ranked, relevance, 3) == pytest.approx(dcg / idcg, abs=1e-12)
    assert ndcg_at_k(ranked, relevance, 3) == pytest.approx(0.470202, abs=1e-6)
    # linear gain on the same case: DCG 3/log2(3); ideal 3 + 2/log2(3) + 1/2
    assert ndcg_at_k(ranked, relevance, 3, gain="linear") == pytest.approx(
        (3 / LOG2_3) / (3 + 2 / LOG2_3 + 0.5), abs=1e-12
    )


def test_ndcg_exponential_and_linear_differ_and_agree_on_binary() -> None:
    graded = {"a": 1, "b": 3}
    # a (1) first, b (3) second: exponential punishes the swap more than linear does
    exp = ndcg_at_k(["a", "b"], graded, 2)
    lin = ndcg_at_k(["a", "b"], graded, 2, gain="linear")
    assert exp == pytest.approx((1 + 7 / LOG2_3) / (7 + 1 / LOG2_3), abs=1e-12)
    assert lin == pytest.approx((1 + 3 / LOG2_3) / (3 + 1 / LOG2_3), abs=1e-12)
    assert exp < lin
    binary = {"a": 1, "b": 0, "c": 1}
    assert ndcg_at_k(["b", "a", "c"], binary, 3) == pytest.approx(
        ndcg_at_k(["b", "a", "c"], binary, 3, gain="linear"), abs=1e-15
    )


def test_ndcg_ideal_uses_all_judged_labels_even_if_not_retrieved() -> None:
    relevance = {"a": 1, "b": 3}
    # only a is retrieved; b (never ranked) still sets the ideal
    assert ndcg_at_k(["a"], relevance, 2) == pytest.approx(1 / (7 + 1 / LOG2_3), abs=1e-12)


def test_ndcg_perfect_zero_and_edge_cases() -> None:
    relevance = {"a": 2, "b": 1, "c": 0}
    assert ndcg_at_k(["a", "b", "c"], relevance, 3) == pytest.approx(1.0)
    assert ndcg_at_k(["a", "b"], relevance, 10) == pytest.approx(1.0)  # k beyond list
    assert ndcg_at_k(["c", "x"], relevance, 2) == 0.0
    assert ndcg_at_k([], relevance, 5) == 0.0
    # ideal DCG 0: no positive label, or nothing judged -> 0.0, not NaN
    assert ndcg_at_k(["a", "b"], {"a": 0, "b": 0}, 2) == 0.0
    assert ndcg_at_k(["a", "b"], {}, 2) == 0.0


def test_ndcg_repeated_item_earns_credit_once() -> None:
    relevance = {"a": 3, "b": 3}
    # a at ranks 1..3 counts only at rank 1: DCG 7, ideal 7 + 7/log2(3)
    value = ndcg_at_k(["a", "a", "a"], relevance, 3)
    assert value == pytest.approx(7 / (7 + 7 / LOG2_3), abs=1e-12)
    assert value < 1.0


def test_ndcg_rejects_bad_gain_and_negative_labels() -> None:
    with pytest.raises(ValueError, match="gain must be"):
        ndcg_at_k(["a"], {"a": 1}, 1, gain="log")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="labels must be >= 0.*'b'"):
        ndcg_at_k(["a"], {"a": 1, "b": -1}, 1)


# --------------------------------------------------------------------------- recall, MRR, hit rate


def test_recall_at_k_by_hand() -> None:
    ranked = ["a", "x", "b", "y", "c"]
    assert recall_at_k(ranked, {"a", "b", "c", "d"}, 3) == pytest.approx(2 / 4)  # a, b of 4
    assert recall_at_k(ranked, {"a", "b", "c", "d"}, 5) == pytest.approx(3 / 4)
    assert recall_at_k(ranked, {"a", "b", "c", "d"}, 1) == pytest.approx(1 / 4)
    # mapping: only labels > 0 are relevant, so x (label 0) is neither found nor counted
    assert recall_at_k(ranked, {"a": 2, "x": 0, "c": 1}, 2) == pytest.approx(1 / 2)
    assert recall_at_k(ranked, {"a": 2, "x": 0, "c": 1}, 50) == pytest.approx(1.0)
    # no relevant item at all -> 0.0 by convention
    assert recall_at_k(ranked, set(), 3) == 0.0
    assert recall_at_k(ranked, {"a": 0, "x": 0}, 3) == 0.0
    # a repeated hit counts once
    assert recall_at_k(["a", "a"], ["a", "b"], 2) == pytest.approx(1 / 2)


def test_reciprocal_rank_by_hand() -> None:
    ranked = ["x", "y", "b", "a"]
    assert reciprocal_rank(ranked, {"a", "b"}) == pytest.approx(1 / 3)
    assert reciprocal_rank(ranked, {"a": 1, "b": 0}) == pytest.approx(1 / 4)  # b has label 0
    assert reciprocal_rank(ranked, {"a", "b"}, k=3) == pytest.approx(1 / 3)
    assert reciprocal_rank(ranked, {"a", "b"}, k=2) == 0.0  # first hit beyond the cutoff
    assert reciprocal_rank(ranked, {"z"}) == 0.0
    assert reciprocal_rank(["a"], {"a"}) == 1.0
    # a repeated non-relevant item still occupies its position
    assert reciprocal_rank(["x", "x", "a"], {"a"}) == pytest.approx(1 / 3)


def test_hit_rate_by_hand() -> None:
    ranked = ["x", "y", "a"]
    assert hit_rate_at_k(ranked, {"a"}, 3) == 1.0
    assert hit_rate_at_k(ranked, {"a"}, 2) == 0.0
    assert hit_rate_at_k(ranked, {"a": 0, "y": 1}, 2) == 1.0
    assert hit_rate_at_k(ranked, {"a": 0}, 3) == 0.0
    assert hit_rate_at_k([], {"a"}, 3) == 0.0


def test_relevant_as_bare_string_is_rejected() -> None:
    with pytest.raises(TypeError, match="not a str"):
        recall_at_k(["a"], "a", 1)


def test_metrics_accept_numpy_rankings() -> None:
    ranked = np.array(["x", "a", "b"])
    assert recall_at_k(ranked, {"a", "b"}, 2) == pytest.approx(0.5)
    assert ndcg_at_k(ranked, {"a": 1}, 2) == pytest.approx(1 / LOG2_3)
    assert mean_metrics({"q": ranked}, {"q": {"a": 1}}, k=2)["mrr"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- k validation


@pytest.mark.parametrize(
    "call",
    [
        lambda k: recall_at_k(["a"], {"a"}, k),
        lambda k: ndcg_at_k(["a"], {"a": 1}, k),
        lambda k: reciprocal_rank(["a"], {"a"}, k),
        lambda k: hit_rate_at_k(["a"], {"a"}, k),
        lambda k: catalog_coverage([["a"]], 3, k),
        lambda k: mean_metrics({"q": ["a"]}, {"q": {"a": 1}}, k),
    ],
    ids=["recall", "ndcg", "rr", "hit_rate", "coverage", "mean_metrics"],
)
@pytest.mark.parametrize("bad_k", [0, -1, 2.5, True])
def test_bad_k_raises_value_error_naming_k(call, bad_k) -> None:
    with pytest.raises(ValueError, match=r"^k must be an integer >= 1, got "):
        call(bad_k)


def test_k_zero_message_is_exact() -> None:
    with pytest.raises(ValueError) as excinfo:
        recall_at_k(["a"], {"a"}, 0)
    assert str(excinfo.value) == "k must be an integer >= 1, got 0"


# --------------------------------------------------------------------------- AUC


def test_auc_by_hand() -> None:
    # pairs (pos, neg): (0.35, 0.1) win, (0.35, 0.4) loss, (0.8, *) two wins -> 3/4
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # a tie is half a pair
    # pos 1 vs negs (1, 0): 0.5 + 1; pos 2 vs negs: 1 + 1 -> 3.5 / 4
    assert auc([0, 1, 0, 1], [1, 1, 0, 2]) == pytest.approx(0.875)
    assert auc([1, 1, 0], [0.1, 0.2, 0.9]) == 0.0
    assert auc(np.array([True, False]), np.array([2.0, 1.0])) == 1.0


def test_auc_matches_sklearn_with_heavy_ties() -> None:
    rng = np.random.default_rng(11)
    for _ in range(60):
        n = int(rng.integers(2, 200))
        labels = rng.integers(0, 2, size=n)
        labels[0], labels[1] = 0, 1  # both classes present
        scores = rng.integers(0, 5, size=n).astype(float)  # few distinct values: many ties
        assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        cont = rng.normal(size=n)
        assert auc(labels.tolist(), cont.tolist()) == pytest.approx(roc_auc_score(labels, cont), abs=1e-12)


def test_auc_single_class_raises() -> None:
    with pytest.raises(ValueError, match=r"only one class present.*only class 1"):
        auc([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(ValueError, match=r"only one class present.*only class 0"):
        auc([0, 0], [0.2, 0.5])
    with pytest.raises(ValueError, match=r"only one class present.*no labels"):
        auc([], [])


def test_auc_input_validation() -> None:
    with pytest.raises(ValueError, match="same length"):
        auc([0, 1], [0.1])
    with pytest.raises(ValueError, match="0/1"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        auc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="1-D"):
        auc([[0, 1]], [[0.1, 0.2]])


# --------------------------------------------------------------------------- coverage


def test_catalog_coverage_by_hand() -> None:
    lists = [["a", "b", "c"], ["b", "d"], ["e"]]
    assert catalog_coverage(lists, 10, k=2) == pytest.approx(4 / 10)  # a, b, d, e
    assert catalog_coverage(lists, 10) == pytest.approx(5 / 10)  # plus c
    assert catalog_coverage(iter(lists), 5) == 1.0  # any iterable, consumed once
    assert catalog_coverage([], 4) == 0.0


def test_catalog_coverage_validation() -> None:
    with pytest.raises(ValueError, match="catalog_size must be an integer >= 1"):
        catalog_coverage([["a"]], 0)
    with pytest.raises(ValueError, match="3 distinct items but catalog_size is 2"):
        catalog_coverage([["a", "b", "c"]], 2)


# --------------------------------------------------------------------------- mean_metrics


def test_mean_metrics_by_hand() -> None:
    qrels = {
        "q1": {"a": 2, "b": 1, "c": 0},
        "q2": {"d": 1},
        "q3": {"e": 3},  # judged but no ranked list -> 0 on everything
    }
    runs = {
        "q1": ["c", "a", "z", "b"],
        "q2": ["x", "y", "d"],
        "unjudged": ["a", "b"],  # not in qrels -> ignored
    }
    got = mean_metrics(runs, qrels, k=2)
    assert set(got) == {"recall@2", "ndcg@2", "mrr", "hit_rate@2"}
    # q1: top2 [c, a] -> recall 1/2, hit 1, first hit at rank 2 -> rr 1/2,
    #     ndcg@2 = (3/log2 3) / (3 + 1/log2 3) with gains 2**2-1 = 3 and 2**1-1 = 1
    # q2: top2 [x, y] -> recall 0, hit 0, ndcg 0; rr over the whole list: d at rank 3 -> 1/3
    # q3: all 0
    q1_ndcg = (3 / LOG2_3) / (3 + 1 / LOG2_3)
    assert got["recall@2"] == pytest.approx(0.5 / 3)
    assert got["ndcg@2"] == pytest.approx(q1_ndcg / 3)
    assert got["mrr"] == pytest.approx((1 / 2 + 1 / 3) / 3)
    assert got["hit_rate@2"] == pytest.approx(1 / 3)


def test_mean_metrics_agrees_with_per_query_functions() -> None:
    rng = np.random.default_rng(5)
    items = [f"p{i}" for i in range(30)]
    qrels = {}
    runs = {}
    for q in range(40):
        judged = rng.choice(items, size=8, replace=False)
        qrels[f"q{q}"] = {str(i): int(label) for i, label in zip(judged, rng.integers(0, 4, size=8))}
        if q % 7:  # some queries have no run
            runs[f"q{q}"] = [str(i) for i in rng.permutation(items)[:15]]
    got = mean_metrics(runs, qrels, k=5)
    expect = {"recall@5": [], "ndcg@5": [], "mrr": [], "hit_rate@5": []}
    for q, judged in qrels.items():
        ranked = runs.get(q, [])
        expect["recall@5"].append(recall_at_k(ranked, judged, 5))
        expect["ndcg@5"].append(ndcg_at_k(ranked, judged, 5))
        expect["mrr"].append(reciprocal_rank(ranked, judged))
        expect["hit_rate@5"].append(hit_rate_at_k(ranked, judged, 5))
    for key, values in expect.items():
        assert got[key] == pytest.approx(float(np.mean(values)), abs=1e-12), key
    assert got["hit_rate@5"] > 0  # the case is not degenerate


def test_mean_metrics_default_k_and_empty_qrels() -> None:
    got = mean_metrics({"q": ["a"]}, {"q": {"a": 1}})
    assert got == {"recall@10": 1.0, "ndcg@10": 1.0, "mrr": 1.0, "hit_rate@10": 1.0}
    with pytest.raises(ValueError, match="qrels is empty"):
        mean_metrics({"q": ["a"]}, {})
