"""The diversity rule after ranking (:mod:`shoprank.recsys.diversity`), Ray-free: the same function cuts Serve's
answers (``tests/test_serving.py`` checks them over HTTP) and the offline evaluation's lists."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from shoprank.recsys.diversity import NO_GROUP, BrandsNamed, DiverseTop, Diversity, diversified, group_codes


def test_at_most_the_limit_of_a_brand_in_score_order_and_no_brand_is_no_group() -> None:
    brand = np.array([0, 0, 0, 1, 1, NO_GROUP, NO_GROUP, NO_GROUP, 0, 2])
    assert diversified(range(10), 5, [(brand, 2)]).tolist() == [0, 1, 3, 4, 5]
    assert diversified(range(10), 8, [(brand, 2)]).tolist() == [0, 1, 3, 4, 5, 6, 7, 9]
    assert diversified([9, 8, 2, 3, 0], 3, [(brand, 1)]).tolist() == [9, 8, 3]


def test_an_answer_stays_full_when_the_candidates_cannot_be_diverse() -> None:
    one_brand = np.zeros(6, np.int64)
    assert diversified(range(6), 4, [(one_brand, 2)]).tolist() == [0, 1, 2, 3]  # the best skipped fill the rest
    assert diversified(range(6), 10, [(one_brand, 2)]).tolist() == [0, 1, 2, 3, 4, 5]


def test_categories_are_limited_on_recommendations_only_and_a_named_brand_is_exempt() -> None:
    brand = np.array([0, 0, 0, 1, 2, 3])
    category = np.array([5, 5, 5, 5, 6, 7])
    rule = Diversity(max_per_brand=2, max_per_category=2)
    assert diversified(range(6), 4, rule.limits(brand, category, is_search=True)).tolist() == [0, 1, 3, 4]
    assert diversified(range(6), 4, rule.limits(brand, category, is_search=False)).tolist() == [0, 1, 4, 5]
    assert diversified(range(6), 4, rule.limits(brand, category, is_search=True, named=[0])).tolist() == [0, 1, 2, 3]
    assert diversified(range(6), 4, Diversity(None, None).limits(brand, category, False)).tolist() == [0, 1, 2, 3]


def test_a_query_names_a_brand_as_whole_words_in_any_case() -> None:
    codes, names = group_codes(["Acme", None, "Acme Pro", " ", "Zed"])
    assert codes.tolist() == [0, NO_GROUP, 1, NO_GROUP, 2] and names == ["Acme", "Acme Pro", "Zed"]
    named = BrandsNamed(names)
    assert named("acme pro running shoes") == [1] and named("ZED kettle") == [2]
    assert named("acmes") == [] and named(None) == [] and BrandsNamed([])("acme") == []


def test_the_evaluation_cuts_a_system_s_order_as_serve_does() -> None:
    products = pa.table({"product_id": [f"P{i}" for i in range(8)],
                         "brand": ["Acme"] * 5 + ["Zed", "", "Zed"],
                         "category": ["Shoes"] * 6 + ["Bags", "Hats"]})
    top = DiverseTop(Diversity(2, 2), products, {"search-1": "running shoes", "search-2": "acme shoes"})
    ordered = [f"P{i}" for i in range(8)]
    assert top.top("search-1", ordered, 4) == ["P0", "P1", "P5", "P6"]
    assert top.top("search-2", ordered, 4) == ["P0", "P1", "P2", "P3"]  # the query names Acme
    shown = top.top("recommend-1", ordered, 4)
    assert shown == ["P0", "P1", "P6", "P7"]  # two shoes at most, whatever the brand
    assert max(Counter(products.column("category").to_pylist()[int(p[1:])] for p in shown).values()) <= 2
