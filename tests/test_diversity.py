"""The diversity re-ranking after ranking (:mod:`shoprank.recsys.diversity`), Ray-free: the same function cuts
Serve's answers (``tests/test_serving.py`` checks them over HTTP) and the offline evaluation's lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from shoprank.config import load_config
from shoprank.errors import ConfigError, ShopRankError
from shoprank.recsys.diversity import (
    NO_GROUP, BrandsNamed, DiverseTop, Diversity, DiversityDecision, diversified, group_codes, mmr,
)
from shoprank.store.run import Run


def test_hard_caps_take_at_most_the_limit_of_a_brand_in_order_and_no_brand_is_no_group() -> None:
    brand = np.array([0, 0, 0, 1, 1, NO_GROUP, NO_GROUP, NO_GROUP, 0, 2])
    assert diversified(range(10), 5, [(brand, 2)]).tolist() == [0, 1, 3, 4, 5]
    assert diversified(range(10), 8, [(brand, 2)]).tolist() == [0, 1, 3, 4, 5, 6, 7, 9]
    assert diversified([9, 8, 2, 3, 0], 3, [(brand, 1)]).tolist() == [9, 8, 3]


def test_an_answer_stays_full_when_the_candidates_cannot_be_diverse() -> None:
    one_brand = np.zeros(6, np.int64)
    assert diversified(range(6), 4, [(one_brand, 2)]).tolist() == [0, 1, 2, 3]  # the best skipped fill the rest
    assert diversified(range(6), 10, [(one_brand, 2)]).tolist() == [0, 1, 2, 3, 4, 5]
    scores = np.linspace(1, 0, 6)
    assert Diversity({"search": 5.0, "recommend": 5.0}).top(np.arange(6), scores, 4, one_brand, one_brand,
                                                            False).tolist() == [0, 1, 2, 3]


def test_hard_caps_limit_categories_on_recommendations_only_and_a_named_brand_is_exempt() -> None:
    brand = np.array([0, 0, 0, 1, 2, 3])
    category = np.array([5, 5, 5, 5, 6, 7])
    scores = np.linspace(1, 0, 6)
    rule = Diversity(max_per_brand=2, max_per_category=2)
    assert rule.top(np.arange(6), scores, 4, brand, category, is_search=True).tolist() == [0, 1, 3, 4]
    assert rule.top(np.arange(6), scores, 4, brand, category, is_search=False).tolist() == [0, 1, 4, 5]
    assert rule.top(np.arange(6), scores, 4, brand, category, is_search=True, named=[0]).tolist() == [0, 1, 2, 3]
    assert Diversity().top(np.arange(6), scores, 4, brand, category, False).tolist() == [0, 1, 2, 3]


def test_mmr_trades_score_for_new_brands_by_its_strength() -> None:
    brand = np.array([0, 0, 0, 1, 2])
    order = np.arange(5)
    scores = np.array([1.0, 0.95, 0.9, 0.85, 0.1])
    assert mmr(order, scores, 3, [brand], 0.0).tolist() == [0, 1, 2, 3, 4]  # strength 0: the ranker's order
    # spread (std) of the scores is about 0.33: a shown brand costs 0.1 * 0.33 at strength 0.1, less than the 0.1
    # that separates the second Acme from the first other brand, so it stays; at 0.5 (0.16) the other brand passes
    assert mmr(order, scores, 3, [brand], 0.1).tolist() == [0, 1, 2, 3, 4]
    assert mmr(order, scores, 3, [brand], 0.5).tolist() == [0, 3, 1, 2, 4]
    # a product far below the rest is not pulled up by any reasonable strength; a very strong one takes every brand
    assert mmr(order, scores, 3, [brand], 1.0).tolist()[:3] == [0, 3, 1]
    assert mmr(order, scores, 3, [brand], 10.0).tolist()[:3] == [0, 3, 4]
    # ties go to the earlier position, and a catalogue without brands or categories (Online Retail) is unchanged
    nothing = np.full(5, NO_GROUP)
    assert mmr(order, np.ones(5), 5, [brand], 1.0).tolist() == [0, 3, 4, 1, 2]
    assert mmr(order, scores, 5, [nothing, nothing], 10.0).tolist() == [0, 1, 2, 3, 4]


def test_mmr_compares_brand_on_searches_and_brand_and_category_on_recommendations() -> None:
    brand = np.array([0, 1, 2, 3])
    category = np.array([5, 5, 6, 6])
    scores = np.array([1.0, 0.9, 0.8, 0.7])
    strong = Diversity({"search": 2.0, "recommend": 2.0})
    assert strong.top(np.arange(4), scores, 2, brand, category, is_search=True).tolist() == [0, 1]
    assert strong.top(np.arange(4), scores, 2, brand, category, is_search=False).tolist() == [0, 2]
    same_brand = np.zeros(4, np.int64)
    assert strong.top(np.arange(4), scores, 2, same_brand, category, True, named=[0]).tolist() == [0, 1]


def test_a_query_names_a_brand_as_whole_words_in_any_case() -> None:
    codes, names = group_codes(["Acme", None, "Acme Pro", " ", "Zed"])
    assert codes.tolist() == [0, NO_GROUP, 1, NO_GROUP, 2] and names == ["Acme", "Acme Pro", "Zed"]
    named = BrandsNamed(names)
    assert named("acme pro running shoes") == [1] and named("ZED kettle") == [2]
    assert named("acmes") == [] and named(None) == [] and BrandsNamed([])("acme") == []


def test_the_evaluation_cuts_a_system_s_order_as_serve_does_and_counts_distinct_groups() -> None:
    products = pa.table({"product_id": [f"P{i}" for i in range(8)],
                         "brand": ["Acme"] * 5 + ["Zed", "", "Zed"],
                         "category": ["Shoes"] * 6 + ["Bags", "Hats"]})
    top = DiverseTop(Diversity({"search": 3.0, "recommend": 3.0}), products,
                     {"search-1": "running shoes", "search-2": "acme shoes"})
    ordered = [f"P{i}" for i in range(8)]
    scores = [1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93]
    assert top.top("search-1", ordered, scores, 4) == ["P0", "P5", "P6", "P1"]
    assert top.top("search-2", ordered, scores, 4) == ["P0", "P1", "P2", "P3"]  # the query names Acme
    assert top.top("recommend-1", ordered, scores, 4) == ["P0", "P6", "P7", "P1"]  # new brands and categories first
    assert top.distinct(["P0", "P1", "P5", "P6"]) == (2, 2)  # P6 has no brand: it adds a category, not a brand
    assert DiverseTop(Diversity(), products, {}).top("recommend-1", ordered, scores, 4) == ordered[:4]


def test_the_strength_is_the_config_s_or_the_one_the_run_recorded(tmp_path: Path) -> None:
    run = Run(str(tmp_path), "r")
    with pytest.raises(ShopRankError, match="evaluation/diversity.json"):
        Diversity.of(load_config("tiny"), run)  # auto, and the evaluate stage has not run
    DiversityDecision({"search": 0.2, "recommend": 0.5}, 0.02, {}, {"search": "x", "recommend": "y"}).save(run)
    assert Diversity.of(load_config("tiny"), run).strength == {"search": 0.2, "recommend": 0.5}
    fixed = Diversity.of(load_config("tiny", ["policy.diversity.strength=0.3", "policy.diversity.max_per_brand=2"]),
                         run)
    assert fixed == Diversity({"search": 0.3, "recommend": 0.3}, 2, None)
    assert Diversity.of(load_config("tiny")).strength == {"search": 0.0, "recommend": 0.0}  # no run: none
    with pytest.raises(ConfigError, match="policy.diversity.strength"):
        load_config("tiny", ["policy.diversity.strength=-1"])
