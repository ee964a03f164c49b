"""The simulated shop: structure, determinism, schemas, and ground truth that behaves."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from shoprank.config import SyntheticShopConfig
from shoprank.data import synthetic
from shoprank.data.ingest import generate_shop
from shoprank.data.io import read_table
from shoprank.data.schema import EVENT_SCHEMA, JUDGMENT_SCHEMA, PRODUCT_SCHEMA
from shoprank.data.taxonomy import BRANDS, LEAVES
from shoprank.privacy import Pseudonyms
from shoprank.store.run import Run

SHOP = SyntheticShopConfig(seed=3, num_products=800, num_users=150, num_sessions=600, num_queries=120, num_blocks=2)
USERS = Pseudonyms(b"a test key of 32 bytes, no more!")


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.parquet"))
    }


def test_taxonomy_is_a_three_level_tree_with_30_leaves() -> None:
    assert len(LEAVES) >= 30
    assert len({leaf.department for leaf in LEAVES}) >= 4
    for leaf in LEAVES:
        assert leaf.path.count(" > ") == 2
        assert len(BRANDS[leaf.category]) >= 4


def test_same_seed_same_bytes_different_seed_different_data(ray_local: None, tmp_path: Path) -> None:
    generate_shop(SHOP, Run(str(tmp_path / "a"), "shop"), USERS)
    generate_shop(SHOP, Run(str(tmp_path / "b"), "shop"), USERS)
    generate_shop(SHOP.model_copy(update={"seed": 4}), Run(str(tmp_path / "c"), "shop"), USERS)
    a, b, c = (_digest(tmp_path / x / "shop") for x in "abc")
    assert a and a == b, "same seed must give byte-identical files"
    assert set(a) == set(c)
    assert all(a[name] != c[name] for name in a), "another seed must change every table"


def test_content_does_not_depend_on_the_number_of_blocks(ray_local: None, tmp_path: Path) -> None:
    generate_shop(SHOP, Run(str(tmp_path / "two"), "shop"), USERS)
    generate_shop(SHOP.model_copy(update={"num_blocks": 1}), Run(str(tmp_path / "one"), "shop"), USERS)
    for table in ("products", "events"):
        two = read_table(Run(str(tmp_path / "two"), "shop"), "data", "records", table)
        one = read_table(Run(str(tmp_path / "one"), "shop"), "data", "records", table)
        key = "product_id" if table == "products" else "event_id"
        assert two.sort_by(key).equals(one.sort_by(key))


def test_records_have_exactly_the_design_schemas(ray_local: None, tmp_path: Path) -> None:
    run = Run(str(tmp_path), "shop")
    generate_shop(SHOP, run, USERS)
    for table, schema in (("products", PRODUCT_SCHEMA), ("events", EVENT_SCHEMA), ("judgments", JUDGMENT_SCHEMA)):
        for part in (tmp_path / "shop" / "data" / "records" / table).glob("*.parquet"):
            assert pq.read_schema(part).remove_metadata().equals(schema), (table, part)
    products = read_table(run, "data", "records", "products")
    assert products.num_rows == SHOP.num_products
    assert len(set(products.column("product_id").to_pylist())) == SHOP.num_products
    events = read_table(run, "data", "records", "events")
    assert set(events.column("product_id").to_pylist()) <= set(products.column("product_id").to_pylist())


def test_listings_read_like_a_shop() -> None:
    model = synthetic.ShopModel.build(SHOP)
    products = synthetic.render_products(model.catalog, 0, 50).to_pylist()
    for product in products:
        leaf = next(leaf for leaf in LEAVES if leaf.path == product["category"])
        assert product["brand"] in product["title"]
        assert leaf.noun in product["title"]
        assert dict(product["attributes"]).keys() == {name for name, _ in leaf.attributes}
        assert product["price"] > 1 and str(product["price"]).endswith(".99")
        assert product["brand"] in product["description"]


def test_queries_cover_the_ways_shoppers_type_and_every_grade() -> None:
    shop = SHOP.model_copy(update={"num_queries": 600})
    model = synthetic.ShopModel.build(shop)
    styles = Counter(model.queries.style)
    assert set(styles) == set(synthetic.QUERY_STYLES)
    vocabulary = {w for leaf in LEAVES for term in (leaf.noun.lower(), *leaf.synonyms) for w in term.split()}
    vocabulary |= {w for brand in synthetic.ALL_BRANDS for w in brand.lower().split()}
    vocabulary |= {w for values in synthetic.ATTRIBUTE_VALUES.values() for v in values for w in v.lower().split()}
    typos = [t for t in model.queries.text if any(w not in vocabulary for w in t.split())]
    assert 0.05 < len(typos) / len(model.queries) < 0.3
    synonyms = [t for t, s in zip(model.queries.text, model.queries.style) if s == "synonym"]
    assert any(t in {syn for leaf in LEAVES for syn in leaf.synonyms} for t in synonyms)
    labels = Counter(model.judgments().column("label").to_pylist())
    assert all(labels[grade] > 0 for grade in (0, 1, 2, 3)), labels


def test_relevance_follows_the_ground_truth() -> None:
    model = synthetic.ShopModel.build(SHOP)
    q = next(i for i, s in enumerate(model.queries.style) if s == "long_tail")
    leaf = model.queries.leaf[q]
    in_leaf = model.catalog.by_leaf[leaf]
    grades = synthetic.relevance(model.queries, q, model.catalog, in_leaf)
    assert set(grades.tolist()) <= {2, 3}
    exact = in_leaf[grades == 3]
    assert all(model.catalog.brand[exact] == model.queries.brand[q])
    other = np.flatnonzero(synthetic.LEAF_CATEGORY[model.catalog.leaf] != synthetic.LEAF_CATEGORY[leaf])
    assert set(synthetic.relevance(model.queries, q, model.catalog, other).tolist()) <= {0, 1}


def test_simulator_users_prefer_their_tastes_and_the_top_of_the_list() -> None:
    simulator = synthetic.ShopSimulator(SHOP)
    model = simulator.model
    rng = np.random.default_rng(0)
    liked_clicks = random_clicks = 0
    position_clicks = np.zeros(10)
    for user in range(60):
        favourite = model.users.favourite_leaves[user, 0]
        liked = rng.choice(model.catalog.by_leaf[favourite], size=10)
        unrelated_pool = np.flatnonzero(
            ~np.isin(synthetic.LEAF_CATEGORY[model.catalog.leaf],
                     synthetic.LEAF_CATEGORY[model.users.favourite_leaves[user]])
        )
        unrelated = rng.choice(unrelated_pool, size=10)
        uid = synthetic.user_id(user)
        for _ in range(20):
            liked_out = simulator.respond(uid, [synthetic.product_id(p) for p in liked], rng)
            random_out = simulator.respond(uid, [synthetic.product_id(p) for p in unrelated], rng)
            liked_clicks += len(liked_out.clicked)
            random_clicks += len(random_out.clicked)
            for pid in liked_out.clicked:
                position_clicks[[synthetic.product_id(p) for p in liked].index(pid)] += 1
    assert liked_clicks > 3 * random_clicks
    assert position_clicks[:3].sum() > position_clicks[-3:].sum()


def test_simulator_rejects_unknown_ids() -> None:
    simulator = synthetic.ShopSimulator(SHOP)
    with pytest.raises(KeyError, match="U999999"):
        simulator.respond("U999999", ["P0000001"], np.random.default_rng(0))
    with pytest.raises(KeyError, match="X1"):
        simulator.respond("U000001", ["X1"], np.random.default_rng(0))
    assert simulator.relevance("no such query text", ["P0000001"]) is None


def test_new_products_join_the_shop_with_the_appeal_they_were_given() -> None:
    model = synthetic.ShopModel.build(SHOP)
    quality = np.array([1.5] * 20 + [-1.5] * 20)
    grown = model.with_new_products(quality)
    start = len(model.catalog)
    assert len(grown.catalog) == start + 40 and np.array_equal(grown.catalog.quality[start:], quality)
    assert np.array_equal(grown.catalog.leaf[:start], model.catalog.leaf), "the shop's own products are unchanged"
    table = synthetic.render_products(grown.catalog, start, start + 40)
    assert table.column("product_id").to_pylist()[0] == synthetic.product_id(start)
    simulator = synthetic.ShopSimulator(SHOP, grown)
    appealing, dull = table.column("product_id").to_pylist()[:20], table.column("product_id").to_pylist()[20:]
    gap = [simulator.expected_utility(u, appealing).mean() - simulator.expected_utility(u, dull).mean()
           for u in simulator.user_ids[:50]]
    assert np.mean(gap) > 1.0, "appealing products are worth more to shoppers than dull ones"
    assert np.array_equal(model.with_new_products(quality).catalog.leaf, grown.catalog.leaf), "the same draw twice"
