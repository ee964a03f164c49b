"""The simulated shop: a documented generative model of a catalogue, shoppers and traffic.

Everything is a pure function of the seed, generated in fixed-size chunks that each
draw from their own random stream (``numpy.random.default_rng([seed, stream,
chunk])``), so the data does not depend on how many parallel blocks produce it.

The model
---------
**Catalogue.** The category tree of :mod:`shoprank.data.taxonomy` (departments >
categories > leaf types). A product draws its leaf from a Zipf-like popularity
over leaves (the order shuffled per seed), a brand from its category's brands
(Zipf-like, earlier brands more common), one value per attribute of its leaf
(colour, material, size, ...), a hidden quality ``q ~ N(0, 1)``, a product line,
and a price ``leaf median x brand tier x exp(0.1 q + N(0, 0.25))`` ending in .99.
Titles and descriptions are composed from these the way real listings read
("Ferrovia Pro Cast Iron Frying Pan, 28 cm, Black").

**Shoppers.** Each user has hidden tastes: a primary category; three favourite
leaves (two in the primary category, one anywhere) with weights 1.0, 0.6, 0.4;
two favourite brands; a price band (budget, mid, premium: preferred price 0.65,
1.0 or 1.6 times a leaf's median); a favourite colour; and an activity level
(log-normal) that sets how many sessions they have.

**Utility** of product p for user u (:meth:`ShopModel.utility`)::

    2.2 * leaf affinity + 0.5 * [same category as a favourite leaf]
    + 1.0 * [favourite brand] + 0.4 * [favourite colour] + 0.5 * q
    - 1.0 * |log(price / (leaf median * preferred ratio))|

**Sessions.** A session picks its user in proportion to activity and an intent
(a favourite leaf with probability 0.8, weighted, else any leaf). With
probability ``search_fraction`` the user searches: a query about the intent leaf
from the query pool, and the shop's legacy search shows the judged products
ordered by relevance plus noise. Otherwise they browse the intent's category,
ordered by popularity plus noise. One to three pages of ``list_size`` products.
Every shown product is a ``view`` event (an impression, with its 1-based
``position``). The user examines position ``k`` with probability ``k ** -0.9``
(position bias) and clicks an examined product with probability
``sigmoid(utility - 2.5 + relevance bonus)`` (search only: -3, -0.5, 0.5, 1.5 for
labels 0..3); a click leads to ``add_to_cart`` with ``sigmoid(click logit - 1)`` and a cart to
``purchase`` with ``sigmoid(click logit - 0.5)``.

**Queries** are written the way shoppers type: the leaf noun, a synonym, an
attribute plus noun ("black skillet"), brand plus noun, brand only, long-tail
(brand, every attribute and noun), and typos (swapped, dropped or doubled
letters) over any of these. **Relevance** (ESCI grades) follows from the ground
truth: 3 when the product is of the query's leaf and matches every attribute and
brand the query names, 2 when it is of the leaf but misses one (a substitute),
1 when its leaf complements the query's leaf (a spatula for "frying pan"), 0
otherwise; brand-only queries grade the brand's products 3 and other products of
its category 1.

:class:`ShopSimulator` exposes this ground truth: given a user and a ranked list
it returns what that user would click, add to cart and buy.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa

from shoprank.config import SyntheticShopConfig
from shoprank.data.schema import EVENT_SCHEMA, EVENT_TYPES, JUDGMENT_SCHEMA, PRODUCT_SCHEMA
from shoprank.data.taxonomy import (
    ATTRIBUTE_VALUES,
    BRAND_TIERS,
    BRANDS,
    CATEGORIES,
    FEATURES,
    LEAVES,
    PRODUCT_LINES,
)

log = logging.getLogger(__name__)

PRODUCT_CHUNK = 4096
USER_CHUNK = 4096
SESSION_CHUNK = 512
QUERY_CHUNK = 256

# Random-stream ids: one per kind of draw, so adding a draw of one kind never shifts another.
_STREAM_LAYOUT, _STREAM_PRODUCTS, _STREAM_USERS, _STREAM_QUERIES, _STREAM_SESSIONS, _STREAM_NEW_PRODUCTS = range(6)

MAX_SLOTS = 3
PRICE_BANDS: tuple[str, ...] = ("budget", "mid", "premium")
PRICE_BAND_RATIO = np.array([0.65, 1.0, 1.6])
FAVOURITE_LEAF_WEIGHTS = np.array([1.0, 0.6, 0.4])
RELEVANCE_BONUS = np.array([-3.0, -0.5, 0.5, 1.5])
QUERY_STYLES: tuple[str, ...] = ("noun", "synonym", "attribute", "brand_noun", "brand_only", "long_tail")
QUERY_STYLE_P = np.array([0.22, 0.18, 0.24, 0.16, 0.06, 0.14])
TYPO_PROBABILITY = 0.15

ALL_BRANDS: tuple[str, ...] = tuple(dict.fromkeys(b for brands in BRANDS.values() for b in brands))
_BRAND_ID = {b: i for i, b in enumerate(ALL_BRANDS)}
_CATEGORY_ID = {c: i for i, c in enumerate(CATEGORIES)}
LEAF_CATEGORY = np.array([_CATEGORY_ID[leaf.category] for leaf in LEAVES])
LEAF_PRICE = np.array([leaf.price for leaf in LEAVES])
LEAF_COLOR_SLOT = np.array(
    [next((j for j, (_, pool) in enumerate(leaf.attributes) if pool == "color"), -1) for leaf in LEAVES]
)
_COLORS = ATTRIBUTE_VALUES["color"]


def _rng(seed: int, stream: int, chunk: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, chunk])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _zipf(n: int, exponent: float, offset: float = 1.0) -> np.ndarray:
    weights = 1.0 / (np.arange(n) + offset) ** exponent
    return weights / weights.sum()


def _chunks(total: int, size: int) -> list[tuple[int, int, int]]:
    """(chunk index, start, stop) covering ``range(total)``."""
    return [(i, start, min(start + size, total)) for i, start in enumerate(range(0, total, size))]


def product_id(index: int) -> str:
    return f"P{index:07d}"


def user_id(index: int) -> str:
    return f"U{index:06d}"


def query_id(index: int) -> str:
    return f"Q{index:06d}"


# --------------------------------------------------------------------------- catalogue


@dataclass
class Catalog:
    """Ground truth of every product, indexed by product number."""

    leaf: np.ndarray
    brand: np.ndarray
    """Index into :data:`ALL_BRANDS`."""
    slots: np.ndarray
    """(n, MAX_SLOTS) value index into each leaf attribute's pool, -1 where the leaf has fewer."""
    quality: np.ndarray
    price: np.ndarray
    line: np.ndarray
    template: np.ndarray

    def __len__(self) -> int:
        return len(self.leaf)

    @cached_property
    def by_leaf(self) -> list[np.ndarray]:
        """Product numbers of each leaf."""
        order = np.argsort(self.leaf, kind="stable")
        bounds = np.searchsorted(self.leaf[order], np.arange(len(LEAVES) + 1))
        return [order[bounds[i] : bounds[i + 1]] for i in range(len(LEAVES))]

    @cached_property
    def by_category(self) -> list[np.ndarray]:
        """Product numbers of each category."""
        return [
            np.concatenate([self.by_leaf[li] for li in np.flatnonzero(LEAF_CATEGORY == c)])
            for c in range(len(CATEGORIES))
        ]

    @cached_property
    def color(self) -> np.ndarray:
        """Colour index of each product, -1 for leaves without a colour."""
        slot = LEAF_COLOR_SLOT[self.leaf]
        return np.where(slot >= 0, self.slots[np.arange(len(self)), np.maximum(slot, 0)], -1)


def _leaf_popularity(seed: int) -> np.ndarray:
    """Zipf-like share of the catalogue per leaf, the leaves' order shuffled per seed."""
    order = _rng(seed, _STREAM_LAYOUT, 0).permutation(len(LEAVES))
    weights = np.empty(len(LEAVES))
    weights[order] = _zipf(len(LEAVES), 0.6, 3.0)
    return weights


def _catalog_chunk(seed: int, chunk: int, n: int, leaf_p: np.ndarray, stream: int = _STREAM_PRODUCTS) -> Catalog:
    rng = _rng(seed, stream, chunk)
    leaf = rng.choice(len(LEAVES), size=n, p=leaf_p)
    brand = np.empty(n, dtype=np.int32)
    tier = np.empty(n)
    slots = np.full((n, MAX_SLOTS), -1, dtype=np.int16)
    brand_u = rng.random(n)
    slot_u = rng.random((n, MAX_SLOTS))
    for li, spec in enumerate(LEAVES):
        rows = np.flatnonzero(leaf == li)
        if not len(rows):
            continue
        names = BRANDS[spec.category]
        cdf = np.cumsum(_zipf(len(names), 0.7))
        local = np.minimum(np.searchsorted(cdf, brand_u[rows]), len(names) - 1)
        brand[rows] = [_BRAND_ID[names[k]] for k in local]
        tier[rows] = np.array(BRAND_TIERS)[local % len(BRAND_TIERS)]
        for j, (_, pool) in enumerate(spec.attributes):
            slots[rows, j] = (slot_u[rows, j] * len(ATTRIBUTE_VALUES[pool])).astype(np.int16)
    quality = rng.standard_normal(n)
    noise = rng.normal(0.0, 0.25, n)
    price = np.maximum(np.floor(LEAF_PRICE[leaf] * tier * np.exp(0.1 * quality + noise)) + 0.99, 1.99)
    return Catalog(
        leaf=leaf.astype(np.int16),
        brand=brand,
        slots=slots,
        quality=quality,
        price=price,
        line=rng.integers(0, len(PRODUCT_LINES), n).astype(np.int16),
        template=rng.integers(0, 4, n).astype(np.int16),
    )


def build_catalog(shop: SyntheticShopConfig) -> Catalog:
    """Every product's ground truth; cheap numbers only (text is rendered per block)."""
    leaf_p = _leaf_popularity(shop.seed)
    parts = [
        _catalog_chunk(shop.seed, i, stop - start, leaf_p)
        for i, start, stop in _chunks(shop.num_products, PRODUCT_CHUNK)
    ]
    return Catalog(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in Catalog.__dataclass_fields__})


def _attribute_values(index: int, catalog: Catalog) -> list[tuple[str, str]]:
    spec = LEAVES[catalog.leaf[index]]
    return [
        (name, ATTRIBUTE_VALUES[pool][catalog.slots[index, j]])
        for j, (name, pool) in enumerate(spec.attributes)
    ]


def _title(index: int, catalog: Catalog) -> str:
    spec = LEAVES[catalog.leaf[index]]
    attrs = dict(_attribute_values(index, catalog))
    brand = ALL_BRANDS[catalog.brand[index]]
    line = PRODUCT_LINES[catalog.line[index]]
    material = attrs.get("material") or attrs.get("skin_type", "")
    size = attrs.get("size") or attrs.get("capacity") or attrs.get("weight", "")
    color = attrs.get("color", "")
    template = catalog.template[index]
    if template == 0:
        head = " ".join(x for x in (brand, line, material, spec.noun) if x)
        tail = ", ".join(x for x in (size, color) if x)
    elif template == 1:
        head = " ".join(x for x in (brand, spec.noun, size) if x)
        tail = " ".join(x for x in (color, material) if x)
        return f"{head} - {tail}" if tail else head
    elif template == 2:
        head = f"{spec.noun} by {brand}"
        tail = ", ".join(x for x in (material, color, size) if x)
        return f"{head} – {tail}" if tail else head
    else:
        head = " ".join(x for x in (brand, material, spec.noun) if x)
        tail = ", ".join(x for x in (color, size) if x)
        return f"{head} ({tail})" if tail else head
    return f"{head}, {tail}" if tail else head


def _description(index: int, catalog: Catalog) -> str:
    spec = LEAVES[catalog.leaf[index]]
    attrs = _attribute_values(index, catalog)
    brand = ALL_BRANDS[catalog.brand[index]]
    line = PRODUCT_LINES[catalog.line[index]]
    features = FEATURES[spec.department]
    # Deterministic per product: pick two different features from its number.
    first = features[index % len(features)]
    second = features[(index // len(features) + 1 + index) % len(features)]
    specs = "; ".join(f"{name.replace('_', ' ')}: {value}" for name, value in attrs)
    quality_words = ("a dependable", "a well-made", "an outstanding")[
        int(np.clip(catalog.quality[index] + 1, 0, 2))
    ]
    parts = [
        f"The {brand} {line} {spec.noun.lower()} is {quality_words} choice for {spec.category.lower()}.",
        first,
        second if second != first else "",
        f"Specifications: {specs}." if specs else "",
    ]
    return " ".join(p for p in parts if p)


def render_products(catalog: Catalog, start: int, stop: int) -> pa.Table:
    """Product records (PRODUCT_SCHEMA) of product numbers ``start..stop``."""
    idx = range(start, stop)
    return pa.Table.from_arrays(
        [
            pa.array([product_id(i) for i in idx]),
            pa.array([_title(i, catalog) for i in idx]),
            pa.array([_description(i, catalog) for i in idx]),
            pa.array([LEAVES[catalog.leaf[i]].path for i in idx]),
            pa.array([ALL_BRANDS[catalog.brand[i]] for i in idx]),
            pa.array(catalog.price[start:stop], pa.float64()),
            pa.array([_attribute_values(i, catalog) for i in idx], PRODUCT_SCHEMA.field("attributes").type),
        ],
        schema=PRODUCT_SCHEMA,
    )


# --------------------------------------------------------------------------- shoppers


@dataclass
class Users:
    """Ground truth of every user's hidden tastes, indexed by user number."""

    primary_category: np.ndarray
    favourite_leaves: np.ndarray
    """(n, 3) leaf indices, weighted by FAVOURITE_LEAF_WEIGHTS."""
    favourite_brands: np.ndarray
    """(n, 2) indices into ALL_BRANDS."""
    price_band: np.ndarray
    favourite_color: np.ndarray
    activity: np.ndarray

    def __len__(self) -> int:
        return len(self.activity)


def _users_chunk(seed: int, chunk: int, n: int, leaf_p: np.ndarray) -> Users:
    rng = _rng(seed, _STREAM_USERS, chunk)
    category_p = np.bincount(LEAF_CATEGORY, weights=leaf_p, minlength=len(CATEGORIES))
    primary = rng.choice(len(CATEGORIES), size=n, p=category_p / category_p.sum())
    favourites = np.empty((n, 3), dtype=np.int16)
    brands = np.empty((n, 2), dtype=np.int32)
    any_leaf = rng.choice(len(LEAVES), size=n, p=leaf_p)
    u = rng.random((n, 4))
    for c in range(len(CATEGORIES)):
        rows = np.flatnonzero(primary == c)
        if not len(rows):
            continue
        leaves = np.flatnonzero(LEAF_CATEGORY == c)
        favourites[rows, 0] = leaves[(u[rows, 0] * len(leaves)).astype(int)]
        favourites[rows, 1] = leaves[(u[rows, 1] * len(leaves)).astype(int)]
        names = BRANDS[CATEGORIES[c]]
        brands[rows, 0] = [_BRAND_ID[names[k]] for k in (u[rows, 2] * len(names)).astype(int)]
    favourites[:, 2] = any_leaf
    for li, spec in enumerate(LEAVES):
        rows = np.flatnonzero(any_leaf == li)
        names = BRANDS[spec.category]
        brands[rows, 1] = [_BRAND_ID[names[k]] for k in (u[rows, 3] * len(names)).astype(int)]
    return Users(
        primary_category=primary.astype(np.int16),
        favourite_leaves=favourites,
        favourite_brands=brands,
        price_band=rng.choice(len(PRICE_BANDS), size=n, p=[0.35, 0.45, 0.2]).astype(np.int8),
        favourite_color=rng.integers(0, len(_COLORS), n).astype(np.int16),
        activity=rng.lognormal(0.0, 0.7, n),
    )


def build_users(shop: SyntheticShopConfig) -> Users:
    """Every user's hidden tastes."""
    leaf_p = _leaf_popularity(shop.seed)
    parts = [
        _users_chunk(shop.seed, i, stop - start, leaf_p)
        for i, start, stop in _chunks(shop.num_users, USER_CHUNK)
    ]
    return Users(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in Users.__dataclass_fields__})


def users_table(users: Users) -> pa.Table:
    """The users' hidden tastes as a table: ground truth for analysis and demos, never for training."""
    return pa.table(
        {
            "user_id": [user_id(i) for i in range(len(users))],
            "primary_category": [CATEGORIES[c] for c in users.primary_category],
            "favourite_leaves": [[LEAVES[li].path for li in row] for row in users.favourite_leaves],
            "favourite_brands": [[ALL_BRANDS[b] for b in row] for row in users.favourite_brands],
            "price_band": [PRICE_BANDS[b] for b in users.price_band],
            "favourite_color": [_COLORS[c] for c in users.favourite_color],
            "activity": users.activity,
        }
    )


# --------------------------------------------------------------------------- queries


@dataclass
class Queries:
    """The query pool: each query's intent (ground truth) and the text a shopper typed."""

    text: list[str]
    style: list[str]
    leaf: np.ndarray
    """Intended leaf, -1 for brand-only queries."""
    category: np.ndarray
    brand: np.ndarray
    """Named brand (index into ALL_BRANDS) or -1."""
    slots: np.ndarray
    """(n, MAX_SLOTS) attribute values the query names, -1 where it names none."""

    def __len__(self) -> int:
        return len(self.text)

    @cached_property
    def by_leaf(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.leaf == li) for li in range(len(LEAVES))]

    @cached_property
    def by_text(self) -> dict[str, int]:
        """First query index of each text, to grade a typed query the pool knows."""
        index: dict[str, int] = {}
        for i, text in enumerate(self.text):
            index.setdefault(text, i)
        return index


_KEYBOARD_NEIGHBOURS = {
    "a": "qs", "e": "wr", "i": "uo", "o": "ip", "n": "bm", "r": "et", "s": "ad", "t": "ry", "l": "k", "c": "xv",
}


def _typo(text: str, rng: np.random.Generator) -> str:
    words = text.split()
    long_words = [i for i, w in enumerate(words) if len(w) >= 4]
    if not long_words:
        return text
    wi = long_words[int(rng.integers(len(long_words)))]
    w = words[wi]
    pos = int(rng.integers(1, len(w) - 1))
    kind = int(rng.integers(4))
    if kind == 0:
        w = w[:pos] + w[pos + 1] + w[pos] + w[pos + 2 :]
    elif kind == 1:
        w = w[:pos] + w[pos + 1 :]
    elif kind == 2:
        w = w[:pos] + w[pos] + w[pos:]
    else:
        near = _KEYBOARD_NEIGHBOURS.get(w[pos], "")
        if near:
            w = w[:pos] + near[int(rng.integers(len(near)))] + w[pos + 1 :]
        else:
            w = w[:pos] + w[pos + 1 :]
    words[wi] = w
    return " ".join(words)


def _query(rng: np.random.Generator, leaf_p: np.ndarray) -> tuple[str, str, int, int, int, np.ndarray]:
    """One query: (text, style, leaf, category, brand, named slots)."""
    li = int(rng.choice(len(LEAVES), p=leaf_p))
    spec = LEAVES[li]
    category = int(LEAF_CATEGORY[li])
    style = QUERY_STYLES[int(rng.choice(len(QUERY_STYLES), p=QUERY_STYLE_P))]
    slots = np.full(MAX_SLOTS, -1, dtype=np.int16)
    brands = BRANDS[spec.category]
    brand = _BRAND_ID[brands[int(rng.integers(len(brands)))]]
    noun = spec.noun.lower()
    synonym = spec.synonyms[int(rng.integers(len(spec.synonyms)))]
    name = noun if rng.random() < 0.5 else synonym
    words: list[str]
    if style == "noun":
        brand, words = -1, [noun]
    elif style == "synonym":
        brand, words = -1, [synonym]
    elif style == "attribute":
        j = int(rng.integers(len(spec.attributes)))
        pool = ATTRIBUTE_VALUES[spec.attributes[j][1]]
        slots[j] = int(rng.integers(len(pool)))
        value = pool[slots[j]].lower()
        words = [value, name] if spec.attributes[j][0] in ("color", "material", "skin_type") else [name, value]
        brand = -1
    elif style == "brand_noun":
        words = [ALL_BRANDS[brand].lower(), name]
    elif style == "brand_only":
        li, words = -1, [ALL_BRANDS[brand].lower()]
    else:  # long_tail
        values = []
        for j, (_, pool_name) in enumerate(spec.attributes):
            slots[j] = int(rng.integers(len(ATTRIBUTE_VALUES[pool_name])))
            values.append(ATTRIBUTE_VALUES[pool_name][slots[j]].lower())
        words = [ALL_BRANDS[brand].lower(), *values[:-1], name, *values[-1:]]
    text = " ".join(words)
    if rng.random() < TYPO_PROBABILITY:
        text = _typo(text, rng)
    return text, style, li, category, brand, slots


def build_queries(shop: SyntheticShopConfig) -> Queries:
    """The query pool (ground truth intents and typed texts)."""
    leaf_p = _leaf_popularity(shop.seed)
    rows = []
    for i, start, stop in _chunks(shop.num_queries, QUERY_CHUNK):
        rng = _rng(shop.seed, _STREAM_QUERIES, i)
        rows.extend(_query(rng, leaf_p) for _ in range(stop - start))
    return Queries(
        text=[r[0] for r in rows],
        style=[r[1] for r in rows],
        leaf=np.array([r[2] for r in rows], dtype=np.int16),
        category=np.array([r[3] for r in rows], dtype=np.int16),
        brand=np.array([r[4] for r in rows], dtype=np.int32),
        slots=np.stack([r[5] for r in rows]) if rows else np.empty((0, MAX_SLOTS), np.int16),
    )


def queries_table(queries: Queries) -> pa.Table:
    """The query pool with each query's intent: ground truth for analysis, never for training."""
    return pa.table(
        {
            "query_id": [query_id(i) for i in range(len(queries))],
            "query": queries.text,
            "style": queries.style,
            "leaf": [LEAVES[li].path if li >= 0 else None for li in queries.leaf],
            "brand": [ALL_BRANDS[b] if b >= 0 else None for b in queries.brand],
        }
    )


def relevance(queries: Queries, q: int, catalog: Catalog, products: np.ndarray) -> np.ndarray:
    """ESCI grade (0..3) of ``products`` for query ``q`` from the ground truth."""
    leaf = catalog.leaf[products]
    if queries.leaf[q] < 0:  # brand only
        same_brand = catalog.brand[products] == queries.brand[q]
        same_category = LEAF_CATEGORY[leaf] == queries.category[q]
        return np.where(same_brand, 3, np.where(same_category, 1, 0)).astype(np.int8)
    target = queries.leaf[q]
    named = queries.slots[q]
    matches = np.ones(len(products), dtype=bool)
    for j in np.flatnonzero(named >= 0):
        matches &= catalog.slots[products, j] == named[j]
    if queries.brand[q] >= 0:
        matches &= catalog.brand[products] == queries.brand[q]
    complements = [i for i, spec in enumerate(LEAVES) if spec.name in LEAVES[target].complements]
    return np.where(
        leaf == target, np.where(matches, 3, 2), np.where(np.isin(leaf, complements), 1, 0)
    ).astype(np.int8)


def _judged_products(
    queries: Queries, q: int, catalog: Catalog, n: int, rng: np.random.Generator
) -> np.ndarray:
    """Products judged for query ``q``: exact matches, its leaf, complements, its category, random."""
    pools: list[tuple[np.ndarray, float]] = []
    if queries.leaf[q] >= 0:
        spec = LEAVES[queries.leaf[q]]
        leaf_products = catalog.by_leaf[queries.leaf[q]]
        exact = leaf_products[relevance(queries, q, catalog, leaf_products) == 3]
        complements = [catalog.by_leaf[i] for i, s in enumerate(LEAVES) if s.name in spec.complements]
        pools = [
            (exact, 0.3),
            (leaf_products, 0.3),
            (np.concatenate(complements) if complements else np.empty(0, int), 0.15),
            (catalog.by_category[queries.category[q]], 0.1),
        ]
    else:
        category_products = catalog.by_category[queries.category[q]]
        pools = [
            (category_products[catalog.brand[category_products] == queries.brand[q]], 0.5),
            (category_products, 0.3),
        ]
    chosen: list[np.ndarray] = []
    for pool, share in pools:
        if len(pool):
            chosen.append(rng.choice(pool, size=min(len(pool), max(1, int(share * n))), replace=False))
    chosen.append(rng.integers(0, len(catalog), size=n))
    unique = np.unique(np.concatenate(chosen))
    return np.sort(rng.permutation(unique)[:n])


def judged_products(shop: SyntheticShopConfig, catalog: Catalog, queries: Queries) -> list[np.ndarray]:
    """Product numbers judged for each query of the pool (list index = query number)."""
    judged: list[np.ndarray] = []
    for i, start, stop in _chunks(len(queries), QUERY_CHUNK):
        rng = _rng(shop.seed, _STREAM_QUERIES, 1_000_000 + i)
        judged.extend(_judged_products(queries, q, catalog, shop.judgments_per_query, rng) for q in range(start, stop))
    return judged


def judgments_table(queries: Queries, catalog: Catalog, judged: list[np.ndarray]) -> pa.Table:
    """Graded judgments (JUDGMENT_SCHEMA) of the judged products of every query."""
    query_of_row = np.repeat(np.arange(len(judged)), [len(p) for p in judged])
    products = np.concatenate(judged) if judged else np.empty(0, np.int64)
    labels = [relevance(queries, q, catalog, p) for q, p in enumerate(judged)]
    return pa.Table.from_arrays(
        [
            pa.array([query_id(q) for q in query_of_row], pa.string()),
            pa.array([queries.text[q] for q in query_of_row], pa.string()),
            pa.array([product_id(p) for p in products], pa.string()),
            pa.array(np.concatenate(labels) if labels else np.empty(0, np.int8), pa.int8()),
        ],
        schema=JUDGMENT_SCHEMA,
    )


# --------------------------------------------------------------------------- behaviour


@dataclass
class ShopModel:
    """The whole ground truth of a simulated shop, rebuilt from its config in seconds."""

    shop: SyntheticShopConfig
    catalog: Catalog
    users: Users
    queries: Queries

    @classmethod
    def build(cls, shop: SyntheticShopConfig) -> "ShopModel":
        return cls(shop, build_catalog(shop), build_users(shop), build_queries(shop))

    @cached_property
    def judged(self) -> list[np.ndarray]:
        """Judged products per query: the legacy search's candidates and the judgments' rows."""
        return judged_products(self.shop, self.catalog, self.queries)

    def judgments(self) -> pa.Table:
        """The judgments table of the query pool."""
        return judgments_table(self.queries, self.catalog, self.judged)

    def with_new_products(self, quality: np.ndarray, batch: int = 0) -> "ShopModel":
        """This shop with ``len(quality)`` products more, numbered after its catalogue (ids ``P{num_products + i}``
        on), drawn like the others from a stream of their own (``batch`` numbers such additions), but with the hidden
        quality ``quality`` instead of a draw: products put live while shoppers arrive, whose appeal a measurement
        knows (:func:`render_products` gives their records). The price keeps the draw made with the chunk's own
        quality (``0.1 q`` of its log), so a set quality moves the appeal alone."""
        added = _catalog_chunk(self.shop.seed, batch, len(quality), _leaf_popularity(self.shop.seed),
                               _STREAM_NEW_PRODUCTS)
        added.quality = np.asarray(quality, np.float64)
        catalog = Catalog(**{f: np.concatenate([getattr(self.catalog, f), getattr(added, f)])
                             for f in Catalog.__dataclass_fields__})
        return ShopModel(self.shop, catalog, self.users, self.queries)

    def utility(self, user: int, products: np.ndarray) -> np.ndarray:
        """How much ``user`` likes each product, before position bias and query relevance."""
        c, u = self.catalog, self.users
        leaf = c.leaf[products]
        favourites = u.favourite_leaves[user]
        leaf_affinity = (favourites[None, :] == leaf[:, None]).astype(float) @ FAVOURITE_LEAF_WEIGHTS
        same_category = np.isin(LEAF_CATEGORY[leaf], LEAF_CATEGORY[favourites])
        favourite_brand = np.isin(c.brand[products], u.favourite_brands[user])
        favourite_color = c.color[products] == u.favourite_color[user]
        preferred = LEAF_PRICE[leaf] * PRICE_BAND_RATIO[u.price_band[user]]
        price_fit = np.abs(np.log(c.price[products] / preferred))
        return (
            2.2 * leaf_affinity
            + 0.5 * same_category
            + 1.0 * favourite_brand
            + 0.4 * favourite_color
            + 0.5 * c.quality[products]
            - 1.0 * price_fit
        )

    def respond(
        self,
        user: int,
        products: np.ndarray,
        rng: np.random.Generator,
        query: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boolean (clicked, added to cart, purchased) per shown product, in list order."""
        n = len(products)
        examine, click, cart, buy = self.response_probabilities(user, products, query)
        examined = rng.random(n) < examine
        clicked = examined & (rng.random(n) < click)
        carted = clicked & (rng.random(n) < cart)
        bought = carted & (rng.random(n) < buy)
        return clicked, carted, bought

    def response_probabilities(
        self, user: int, products: np.ndarray, query: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per shown product (list order): P(examined), P(click | examined), P(cart | click), P(buy | cart).

        :meth:`respond` draws from these; A/B calibration (:mod:`shoprank.experiment.calibrate`) draws
        from them directly, many experiments at once, so both follow the one model of behaviour.
        """
        examine = np.arange(1, len(products) + 1) ** -0.9
        logit = self.utility(user, products) - 2.5
        if query is not None:
            logit = logit + RELEVANCE_BONUS[relevance(self.queries, query, self.catalog, products)]
        return examine, _sigmoid(logit), _sigmoid(logit - 1.0), _sigmoid(logit - 0.5)

    def intent(self, user: int, rng: np.random.Generator) -> int:
        """The leaf a session is about: a favourite leaf (weighted) or, sometimes, any leaf."""
        if rng.random() < 0.8:
            w = FAVOURITE_LEAF_WEIGHTS / FAVOURITE_LEAF_WEIGHTS.sum()
            return int(self.users.favourite_leaves[user, rng.choice(3, p=w)])
        return int(rng.integers(len(LEAVES)))

    def search_results(self, query: int, n: int, rng: np.random.Generator) -> np.ndarray:
        """The legacy search page: judged products by relevance plus noise."""
        candidates = self.judged[query]
        score = (
            relevance(self.queries, query, self.catalog, candidates)
            + 0.3 * self.catalog.quality[candidates]
            + rng.normal(0.0, 0.8, len(candidates))
        )
        return candidates[np.argsort(-score, kind="stable")[:n]]

    def browse_results(self, leaf: int, n: int, rng: np.random.Generator) -> np.ndarray:
        """The legacy category page: products of the intent's category by popularity plus noise."""
        pool = self.catalog.by_category[LEAF_CATEGORY[leaf]]
        candidates = rng.choice(pool, size=min(len(pool), 3 * n), replace=False)
        in_leaf = self.catalog.leaf[candidates] == leaf
        score = 0.5 * self.catalog.quality[candidates] + 1.0 * in_leaf + rng.normal(0.0, 1.0, len(candidates))
        return candidates[np.argsort(-score, kind="stable")[:n]]

    def sessions(self, chunk: int, start: int, stop: int) -> pa.Table:
        """Events (EVENT_SCHEMA) of sessions ``start..stop``, from their own random stream."""
        rng = _rng(self.shop.seed, _STREAM_SESSIONS, chunk)
        cdf = np.cumsum(self.users.activity)
        base = dt.datetime.fromisoformat(self.shop.start_date).replace(tzinfo=dt.timezone.utc)
        base_us = int(base.timestamp() * 1_000_000)
        cols: dict[str, list[Any]] = {k: [] for k in ("session", "user", "product", "type", "ts", "pos", "query", "page")}
        for session in range(start, stop):
            user = int(np.searchsorted(cdf, rng.random() * cdf[-1]))
            user = min(user, len(self.users) - 1)
            t0 = base_us + int(rng.random() * self.shop.days * 86_400) * 1_000_000
            pages = 1 + min(int(rng.geometric(0.5)) - 1, 2)
            intent = self.intent(user, rng)
            for page in range(pages):
                query: int | None = None
                if rng.random() < self.shop.search_fraction and len(self.queries.by_leaf[intent]):
                    options = self.queries.by_leaf[intent]
                    query = int(options[rng.integers(len(options))])
                    shown = self.search_results(query, self.shop.list_size, rng)
                else:
                    shown = self.browse_results(intent, self.shop.list_size, rng)
                clicked, carted, bought = self.respond(user, shown, rng, query)
                page_t = t0 + page * 90_000_000
                positions = np.arange(1, len(shown) + 1)
                for code, mask, offset in (
                    (0, np.ones(len(shown), bool), 0),
                    (1, clicked, 20_000_000),
                    (2, carted, 45_000_000),
                    (3, bought, 70_000_000),
                ):
                    k = int(mask.sum())
                    if not k:
                        continue
                    cols["session"].append(np.full(k, session))
                    cols["user"].append(np.full(k, user))
                    cols["product"].append(shown[mask])
                    cols["type"].append(np.full(k, code))
                    cols["ts"].append(page_t + offset + positions[mask] * 1_000_000)
                    cols["pos"].append(positions[mask])
                    cols["query"].append(np.full(k, -1 if query is None else query))
                    cols["page"].append(np.full(k, page))
        arrays = {k: np.concatenate(v) for k, v in cols.items()}
        order = np.lexsort((arrays["pos"], arrays["ts"], arrays["session"]))
        arrays = {k: v[order] for k, v in arrays.items()}
        first = np.r_[0, np.flatnonzero(np.diff(arrays["session"])) + 1]
        seq = np.arange(len(order)) - np.repeat(first, np.diff(np.r_[first, len(order)]))
        has_query = arrays["query"] >= 0
        texts = self.queries.text
        return pa.Table.from_arrays(
            [
                pa.array([f"E{s:08d}-{k:03d}" for s, k in zip(arrays["session"], seq)]),
                pa.array([user_id(u) for u in arrays["user"]]),
                pa.array([f"S{s:08d}" for s in arrays["session"]]),
                pa.array([product_id(p) for p in arrays["product"]]),
                pa.array([EVENT_TYPES[t] for t in arrays["type"]]),
                pa.array(arrays["ts"], pa.timestamp("us", tz="UTC")),
                pa.array([texts[q] if h else None for q, h in zip(arrays["query"], has_query)], pa.string()),
                pa.array(arrays["pos"], pa.int32()),
                pa.array([f"R{s:08d}-{p}" for s, p in zip(arrays["session"], arrays["page"])]),
                pa.nulls(len(order), pa.string()),
                pa.nulls(len(order), pa.int32()),
            ],
            schema=EVENT_SCHEMA,
        )


@dataclass
class Outcome:
    """What a simulated shopper did with a ranked list."""

    clicked: list[str] = field(default_factory=list)
    added_to_cart: list[str] = field(default_factory=list)
    purchased: list[str] = field(default_factory=list)


class ShopSimulator:
    """The simulated shop's ground truth, for simulating traffic against any ranking.

    Given a user and a ranked list, it answers which products that user would click,
    add to cart and buy, under the same model that generated the training data:
    the user's hidden tastes, the position bias, and, for a query the pool knows,
    its graded relevance.
    """

    def __init__(self, shop: SyntheticShopConfig, model: ShopModel | None = None) -> None:
        self.model = model or ShopModel.build(shop)

    @property
    def user_ids(self) -> list[str]:
        return [user_id(i) for i in range(len(self.model.users))]

    def _user(self, uid: str) -> int:
        index = int(uid[1:]) if uid[:1] == "U" and uid[1:].isdigit() else -1
        if not 0 <= index < len(self.model.users):
            raise KeyError(f"user_id {uid!r} is not a simulated user")
        return index

    def _products(self, product_ids: list[str]) -> np.ndarray:
        out = np.empty(len(product_ids), dtype=np.int64)
        for k, pid in enumerate(product_ids):
            index = int(pid[1:]) if pid[:1] == "P" and pid[1:].isdigit() else -1
            if not 0 <= index < len(self.model.catalog):
                raise KeyError(f"product_id {pid!r} is not in the simulated catalog")
            out[k] = index
        return out

    def query_for(self, user: str, rng: np.random.Generator) -> str | None:
        """What ``user`` would type now: a query about a leaf of the user's intent (None: nothing to search)."""
        options = self.model.queries.by_leaf[self.model.intent(self._user(user), rng)]
        return str(self.model.queries.text[options[rng.integers(len(options))]]) if len(options) else None

    def relevance(self, query: str, product_ids: list[str]) -> list[int] | None:
        """Graded relevance of products for a query the pool knows; None for other texts."""
        q = self.model.queries.by_text.get(query.strip().lower())
        if q is None:
            return None
        return relevance(self.model.queries, q, self.model.catalog, self._products(product_ids)).tolist()

    def respond(
        self,
        user: str,
        ranked_product_ids: list[str],
        rng: np.random.Generator,
        query: str | None = None,
    ) -> Outcome:
        """What ``user`` does with ``ranked_product_ids`` (top first), drawn from ``rng``."""
        products = self._products(ranked_product_ids)
        q = self.model.queries.by_text.get(query.strip().lower()) if query else None
        clicked, carted, bought = self.model.respond(self._user(user), products, rng, q)
        pick = np.asarray(ranked_product_ids, dtype=object)
        return Outcome(list(pick[clicked]), list(pick[carted]), list(pick[bought]))

    def click_probabilities(self, user: str, product_ids: list[str]) -> np.ndarray:
        """P(click | examined) of each product for ``user`` browsing (no query): how much a recommendation of it is
        worth to them, the gain of a measurement's NDCG."""
        return self.model.response_probabilities(self._user(user), self._products(product_ids))[1]

    def expected_utility(self, user: str, product_ids: list[str]) -> np.ndarray:
        """The user's hidden utility of each product (for diagnosing a model, not for training)."""
        return self.model.utility(self._user(user), self._products(product_ids))
