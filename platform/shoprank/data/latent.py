"""A behaviour-only shop: a documented latent-factor model of clicks and purchases, no impressions.

Most shops can export what their customers did (clicked, bought) but not what they
were shown, often as a ratings-style table ``user,item,rating,timestamp``. This
module generates such a data set, with a real-looking catalogue, so that the
recommendation path can be measured where it usually has to work: without views,
queries or judgments. Everything is a pure function of the seed.

The model
---------
**Catalogue.** The simulated shop's catalogue (:func:`shoprank.data.synthetic.build_catalog`
and :func:`~shoprank.data.synthetic.render_products`): titles, descriptions, category
paths, brands, prices and a hidden quality ``q``, so the text means something and
an encoder can learn from it.

**Item factors** (``dim`` dimensions). Every department, category, leaf and brand
gets a random direction ``N(0, I / dim)``; an item's factor is
``0.6 dept + 0.8 category + 1.0 leaf + 0.4 brand + 0.5 own noise``, so items of a
leaf are close, of a category less so, and text (which names the leaf, category and
brand) says much, but not all, about behaviour.

**Item popularity** is a power law: the item at popularity rank ``r`` gets a bias
``-popularity_exponent * log(r + 10)`` (3 by default); the ranks follow ``q`` plus
noise (popular items are mostly good ones). Together with the leaves' demand below,
interaction counts fall about as ``rank ** -1`` (Zipf), and the 10% most popular
items get about half of all interactions, as in shops' logs.

**Users** have 1 to 4 interests (``1 + Poisson(1)``), each the mean factor of a leaf
(a product type) plus noise ``N(0, 0.35^2 / dim)``; leaves are drawn in proportion to
their size times a Zipf demand (exponent ``leaf_demand_exponent``, order shuffled
per seed: some product types are wanted far more than others). Interest weights are
Dirichlet(1); an activity level (log-normal, sigma 0.8) sets how many sessions a
user has. A user arrives in the first half of the period and stays to its end (most
users) or leaves at a random later time (``churn`` of them), so a time split finds
history for most later users.

**Sessions.** A user's session starts are uniform over their active period, each
pushed later where needed to start at least 2 h 10 min after the previous one (a
session lasts at most 20 x 5 minutes), so the readers' 30-minute gap finds each
session whole. Each session follows one interest: the previous
session's with probability ``stickiness`` (shoppers come back to what they were
looking for), else one drawn by the interest weights. Its length is
``Geometric(0.28)`` interactions (at least 1, about 3.6 on average, at most 20),
drawn without replacement, by the Gumbel top-k trick, from
``softmax(taste_scale * w . v_i + b_i)`` (``taste_scale`` 8) over the items the user
has not interacted with yet: each (user, item) pair appears once, as in a ratings
export. Interactions within a session are 10 s to 5 minutes apart.

**Outcome.** An interaction is a purchase with probability
``sigmoid(-2.1 + 0.9 z + 0.7 q)``, where ``z`` is the interaction's affinity
``w . v_i`` standardised over the data set (about 17% are purchases); the rating is
5 for a purchase and otherwise ``clip(round(2.5 + z + N(0, 0.7)), 1, 4)``, a click.
There are no views, no add-to-carts, no queries and no judgments.

Outputs (:func:`write_latent_shop`): ``catalog.csv`` (``product_id, title,
description, category, brand, price, attributes`` as JSON) and ``ratings.csv``
(``user, item, rating, timestamp``: user and product ids, the rating 1..5, unix
seconds), ordered by time. ``python -m shoprank.data.latent DIR --seed 0`` writes
them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from shoprank.config import SyntheticShopConfig
from shoprank.data.synthetic import LEAF_CATEGORY, build_catalog, render_products
from shoprank.data.taxonomy import LEAVES

CATALOG_FILE = "catalog.csv"
RATINGS_FILE = "ratings.csv"
PURCHASE_RATING = 5
"""The rating that stands for a purchase; every other rating (1..4) is a click."""
RATING_EVENT_TYPES: dict[str, str] = {"1": "click", "2": "click", "3": "click", "4": "click", "5": "purchase"}
"""How a reader turns ``ratings.csv``'s rating into an event type."""
SESSION_P = 0.28
"""Session lengths are Geometric(SESSION_P): at least 1, about 3.6 on average."""
MAX_SESSION = 20
SESSION_GAP_S = 30 * 60
"""The readers' default session gap."""
MAX_STEP_S = 300.0
"""Interactions within a session are 10 s to this far apart."""
SESSION_SPACING_S = MAX_SESSION * MAX_STEP_S + SESSION_GAP_S
"""A user's consecutive session starts are at least this far apart: longer than the longest session plus the gap."""
_DEPARTMENTS = sorted({leaf.department for leaf in LEAVES})
LEAF_DEPARTMENT = np.array([_DEPARTMENTS.index(leaf.department) for leaf in LEAVES])


@dataclass(frozen=True)
class LatentShopSpec:
    """Size, seed and the few knobs of the model (see the module docstring)."""

    seed: int = 0
    num_products: int = 1_700
    num_users: int = 1_000
    num_interactions: int = 100_000
    days: int = 70
    start_date: str = "2026-01-01"
    dim: int = 24
    taste_scale: float = 8.0
    popularity_exponent: float = 3.0
    leaf_demand_exponent: float = 1.5
    stickiness: float = 0.6
    churn: float = 0.2


@dataclass
class LatentShop:
    """The generated tables and the hidden truth behind them (for tests and inspection)."""

    products: pa.Table
    ratings: pd.DataFrame
    """``user, item, rating, timestamp`` (unix seconds), ordered by time."""
    item_factors: np.ndarray
    item_bias: np.ndarray


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, 1_000 + stream])


def _item_factors(spec: LatentShopSpec, leaf: np.ndarray, brand: np.ndarray) -> np.ndarray:
    rng = _rng(spec.seed, 0)
    scale = 1.0 / np.sqrt(spec.dim)
    department = rng.normal(0, scale, (len(_DEPARTMENTS), spec.dim))
    category = rng.normal(0, scale, (int(LEAF_CATEGORY.max()) + 1, spec.dim))
    leaves = rng.normal(0, scale, (len(LEAVES), spec.dim))
    brands = rng.normal(0, scale, (int(brand.max()) + 1, spec.dim))
    own = rng.normal(0, scale, (len(leaf), spec.dim))
    return (0.6 * department[LEAF_DEPARTMENT[leaf]] + 0.8 * category[LEAF_CATEGORY[leaf]] + 1.0 * leaves[leaf]
            + 0.4 * brands[brand] + 0.5 * own)


def _item_bias(spec: LatentShopSpec, quality: np.ndarray) -> np.ndarray:
    """Power-law popularity (log scale); the popularity order follows quality plus noise."""
    rng = _rng(spec.seed, 1)
    order = np.argsort(-(quality + rng.normal(0, 1.0, len(quality))), kind="stable")
    bias = np.empty(len(quality))
    bias[order] = -spec.popularity_exponent * np.log(np.arange(len(quality)) + 10.0)
    return bias - bias.max()


def _leaf_demand(spec: LatentShopSpec) -> np.ndarray:
    """Zipf-like demand per leaf (some product types are wanted far more), order shuffled per seed."""
    order = _rng(spec.seed, 3).permutation(len(LEAVES))
    demand = np.empty(len(LEAVES))
    demand[order] = (np.arange(len(LEAVES)) + 1.0) ** -spec.leaf_demand_exponent
    return demand


def _sessions(spec: LatentShopSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(user, start second) of every session, by user and time, consecutive ones > 30 min apart."""
    period = spec.days * 86_400.0
    activity = rng.lognormal(0.0, 0.8, spec.num_users)
    arrive = rng.uniform(0.0, 0.5 * period, spec.num_users)
    leave = np.where(rng.random(spec.num_users) < spec.churn,
                     arrive + rng.uniform(0.2, 1.0, spec.num_users) * (period - arrive), period)
    mean_length = 1.0 / SESSION_P
    expected = activity * (leave - arrive)
    counts = rng.multinomial(int(round(spec.num_interactions / mean_length)), expected / expected.sum())
    users, starts = [], []
    for u, count in enumerate(counts):
        times = np.sort(rng.uniform(arrive[u], leave[u], count))
        for i in range(1, count):
            times[i] = max(times[i], times[i - 1] + SESSION_SPACING_S)
        users.append(np.full(count, u))
        starts.append(times)
    return np.concatenate(users), np.concatenate(starts)


def generate(spec: LatentShopSpec = LatentShopSpec()) -> LatentShop:
    """The catalogue and the ratings of the model in the module docstring."""
    catalog = build_catalog(SyntheticShopConfig(seed=spec.seed, num_products=spec.num_products))
    products = render_products(catalog, 0, len(catalog))
    factors = _item_factors(spec, catalog.leaf.astype(np.int64), catalog.brand.astype(np.int64))
    bias = _item_bias(spec, catalog.quality)
    rng = _rng(spec.seed, 2)
    leaf_size = np.bincount(catalog.leaf, minlength=len(LEAVES)).astype(np.float64)
    leaf_mean = np.zeros((len(LEAVES), spec.dim))
    np.add.at(leaf_mean, catalog.leaf, factors)
    leaf_mean /= np.maximum(leaf_size, 1.0)[:, None]
    demand = leaf_size * _leaf_demand(spec)
    demand /= demand.sum()
    interests, weights = [], []
    for _ in range(spec.num_users):
        k = min(1 + rng.poisson(1.0), 4)
        leaves = rng.choice(len(LEAVES), size=k, replace=False, p=demand)
        interests.append(leaf_mean[leaves] + rng.normal(0, 0.35 / np.sqrt(spec.dim), (k, spec.dim)))
        weights.append(rng.dirichlet(np.ones(k)))
    session_user, session_start = _sessions(spec, rng)
    seen = [np.zeros(spec.num_products, bool) for _ in range(spec.num_users)]
    last_interest = np.full(spec.num_users, -1)
    out_user, out_item, out_ts, out_affinity = [], [], [], []
    for u, start in zip(session_user.tolist(), session_start.tolist()):
        previous = last_interest[u]
        k = previous if previous >= 0 and rng.random() < spec.stickiness else rng.choice(len(weights[u]), p=weights[u])
        last_interest[u] = k
        affinity = factors @ interests[u][k]
        logits = spec.taste_scale * affinity + bias + rng.gumbel(size=spec.num_products)
        logits[seen[u]] = -np.inf
        length = min(int(rng.geometric(SESSION_P)), MAX_SESSION, int((~seen[u]).sum()))
        items = np.argsort(-logits)[:length]
        seen[u][items] = True
        out_user.append(np.full(length, u))
        out_item.append(items)
        out_ts.append(start + np.cumsum(rng.uniform(10.0, MAX_STEP_S, length)) - 10.0)
        out_affinity.append(affinity[items])
    user = np.concatenate(out_user)
    item = np.concatenate(out_item)
    affinity = np.concatenate(out_affinity)
    z = (affinity - affinity.mean()) / affinity.std()
    purchase = rng.random(len(z)) < 1.0 / (1.0 + np.exp(-(-2.1 + 0.9 * z + 0.7 * catalog.quality[item])))
    click_rating = np.clip(np.round(2.5 + z + rng.normal(0, 0.7, len(z))), 1, 4)
    start_s = dt.datetime.fromisoformat(spec.start_date).replace(tzinfo=dt.timezone.utc).timestamp()
    ids = products.column("product_id").to_pylist()
    ratings = pd.DataFrame({
        "user": [f"U{u:06d}" for u in user],
        "item": [ids[i] for i in item],
        "rating": np.where(purchase, PURCHASE_RATING, click_rating).astype(np.int64),
        "timestamp": (start_s + np.concatenate(out_ts)).astype(np.int64),
    }).sort_values(["timestamp", "user"], kind="stable").reset_index(drop=True)
    return LatentShop(products, ratings, factors, bias)


def write_latent_shop(directory: Path, spec: LatentShopSpec = LatentShopSpec()) -> LatentShop:
    """Generate and write ``catalog.csv`` and ``ratings.csv`` under ``directory``."""
    shop = generate(spec)
    directory.mkdir(parents=True, exist_ok=True)
    catalog = shop.products.to_pandas()
    catalog["attributes"] = [json.dumps(dict(pairs)) for pairs in catalog["attributes"]]
    catalog.to_csv(directory / CATALOG_FILE, index=False)
    shop.ratings.to_csv(directory / RATINGS_FILE, index=False)
    return shop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=LatentShopSpec.seed)
    parser.add_argument("--num-products", type=int, default=LatentShopSpec.num_products)
    parser.add_argument("--num-users", type=int, default=LatentShopSpec.num_users)
    parser.add_argument("--num-interactions", type=int, default=LatentShopSpec.num_interactions)
    args = parser.parse_args()
    spec = LatentShopSpec(seed=args.seed, num_products=args.num_products, num_users=args.num_users,
                          num_interactions=args.num_interactions)
    shop = write_latent_shop(args.directory, spec)
    print(f"{len(shop.ratings):,} ratings of {shop.ratings['user'].nunique():,} users on "
          f"{shop.ratings['item'].nunique():,} of {spec.num_products:,} products -> {args.directory}")


if __name__ == "__main__":
    main()
