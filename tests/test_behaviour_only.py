"""Behaviour-only data (clicks and purchases, no impressions): features, exclusions, the item-item model, the generator.

Ray-free: a catalogue and a ranking context are built in memory from the latent-factor
shop of :mod:`shoprank.data.latent`, with random product vectors in place of the
encoder (recommendations never encode text).
"""

from __future__ import annotations

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from shoprank.config import Config, load_config
from shoprank.data.latent import (
    MAX_SESSION, RATING_EVENT_TYPES, SESSION_GAP_S, LatentShop, LatentShopSpec, generate,
)
from shoprank.recsys.context import (
    EventLog, RankingContext, coengaged_before, excluded_event_types, item_item_before, recent_popularity,
)
from shoprank.recsys.answer import VariantPipeline
from shoprank.recsys.features import COLUMN, FEATURES, compute_features, product_stats
from shoprank.recsys.retrieval import Catalogue, fit_item_item, rank_inputs
from shoprank.recsys.types import Candidates, History

MISSING_WHEN_NEVER = {"days_since_purchase", "days_since_engaged", "repurchase_interval_days", "purchase_due_ratio",
                      "repeat_rate"}
"""Features that are missing, by design, for a product the user never bought (or bought once) or nobody bought."""
SMALL = LatentShopSpec(seed=3, num_products=600, num_users=80, num_interactions=6_000, days=30)


def events_of(shop: LatentShop) -> pd.DataFrame:
    """The ratings as events, the way the readers derive them: rating -> type, 30-minute sessions."""
    r = shop.ratings.sort_values(["user", "timestamp"], kind="stable")
    gap = r.groupby("user")["timestamp"].diff()
    first = r["timestamp"].where(gap.isna() | (gap > SESSION_GAP_S)).groupby(r["user"]).ffill()
    return pd.DataFrame({
        "user_id": r["user"].to_numpy(), "session_id": (r["user"] + "@" + first.astype(np.int64).astype(str)).to_numpy(),
        "product_id": r["item"].to_numpy(), "event_type": r["rating"].astype(str).map(RATING_EVENT_TYPES).to_numpy(),
        "ts_s": r["timestamp"].to_numpy(np.float64),
    })


def events_table(events: pd.DataFrame) -> pa.Table:
    return pa.table({
        "user_id": events["user_id"], "product_id": events["product_id"], "event_type": events["event_type"],
        "ts": pa.array((events["ts_s"].to_numpy() * 1e6).astype(np.int64), pa.timestamp("us", tz="UTC")),
    })


def context_of(shop: LatentShop, config: Config) -> RankingContext:
    """What ``load_context`` builds from a run, here from memory; the cut-off at 60% of the log's time."""
    events = events_of(shop)
    cutoff = float(np.quantile(events["ts_s"], 0.6))
    stats = product_stats(shop.products, events_table(events), cutoff, config.features.ctr_prior_views)
    vectors = np.random.default_rng(0).normal(size=(len(stats.product_ids), 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    catalogue = Catalogue(
        stats=stats, vectors=vectors, index=index, index_rows=np.arange(len(vectors)),
        texts=shop.products.column("title").to_pylist(),
        coengaged=coengaged_before(events, stats.row_of, cutoff),
        recent=recent_popularity(events, stats.row_of, config.retrieval.trending_days),
        item_item=item_item_before(events, stats.row_of, cutoff, config.retrieval),
        # no validation split here: purchase exclusion's auto has no evidence and excludes, as a run would decide
        excluded_types=excluded_event_types(config.policy.exclude, purchased=True),
    )
    return RankingContext(config, catalogue, None, EventLog(events, stats.row_of), cutoff)


@pytest.fixture(scope="module")
def small() -> LatentShop:
    return generate(SMALL)


def later_requests(context: RankingContext, count: int) -> list[tuple[str, float]]:
    """(user, time) of ``count`` users' requests an hour after their last event."""
    histories = sorted(context.events.histories.items(), key=lambda item: -len(item[1]))[:count]
    return [(user, float(history.ts_s[-1]) + 3600.0) for user, history in histories]


def test_features_of_a_log_without_views_have_no_rate_over_a_zero_count(small: LatentShop) -> None:
    config = load_config(None)
    context = context_of(small, config)
    stats = context.catalogue.stats
    assert np.isnan(stats.ctr).all(), "no impressions: there is no click-through rate, not clicks over 1"
    engaged = ~np.isnan(stats.conversion)
    assert engaged.sum() > 0.8 * len(stats.product_ids)
    assert ((stats.conversion[engaged] >= 0) & (stats.conversion[engaged] <= 1)).all()
    pipeline = VariantPipeline(context, "retrieval")
    for user, now in later_requests(context, 20):
        inputs = rank_inputs(context, user, None, None, now)  # the offline rows' path
        assert not np.isinf(inputs.features).any()
        assert np.isnan(inputs.features[:, COLUMN["ctr"]]).all()
        missing = {FEATURES[c] for c in np.flatnonzero(np.isnan(inputs.features).any(axis=0))}
        assert missing <= {"ctr", "conversion", *MISSING_WHEN_NEVER}, missing
        for item in pipeline.recommend(user, 10, now):  # the served path: what the answer says about each item
            assert "ctr" not in item.contributions and all(np.isfinite(v) for v in item.contributions.values())
            assert np.isfinite(item.score)


def test_a_click_without_a_logged_impression_does_not_push_a_rate_above_one() -> None:
    products = pa.table({"product_id": ["a", "b", "c"], "category": ["x", "x", "y"], "brand": ["", "", ""],
                         "price": [1.0, 2.0, 3.0]})
    events = pa.table({
        "user_id": ["u1", "u1", "u1", "u2", "u3"], "product_id": ["a", "a", "a", "b", "b"],
        "event_type": ["view", "click", "click", "click", "purchase"],
        "ts": pa.array(np.arange(5) * 1_000_000, pa.timestamp("us", tz="UTC")),
    })
    stats = product_stats(products, events, cutoff_s=100.0, prior_views=0.0)
    assert stats.ctr[0] == 1.0  # one view, two clicks: capped, not 2.0
    assert np.isnan(stats.ctr[1]) and np.isnan(stats.ctr[2])  # b: clicked but never shown; c: nothing at all
    assert stats.conversion[1] == 0.5  # b: two engaged users, one bought
    assert stats.conversion[0] == 0.0 and np.isnan(stats.conversion[2])


@pytest.mark.parametrize("seen", [[], ["click"]])
def test_a_recommendation_leaves_out_what_the_user_bought(small: LatentShop, seen: list[str]) -> None:
    config = load_config(None, [f"policy.exclude.seen={seen}"])
    context = context_of(small, config)
    pipeline = VariantPipeline(context, "retrieval")
    stats = context.catalogue.stats
    left_out = 0
    for user, now in later_requests(context, 30):
        history = context.events.history(user, now, config.features.history_events)
        excluded = {r for r, t in zip(history.product_rows, history.event_types)
                    if t == "purchase" or t in seen}
        assert excluded
        candidates = set(rank_inputs(context, user, None, None, now).candidates.rows.tolist())
        assert not candidates & excluded
        served = {stats.row_of[r.product_id] for r in pipeline.recommend(user, 20, now)}
        assert not served & excluded
        left_out += len(excluded)
    # without the rule the same histories do get some of those products back: the check above can fail
    config.policy.exclude.purchased = False
    config.policy.exclude.seen = []
    context.catalogue.excluded_types = excluded_event_types(config.policy.exclude, purchased=False)
    returned = 0
    for user, now in later_requests(context, 30):
        history = context.events.history(user, now, config.features.history_events)
        excluded = {r for r, t in zip(history.product_rows, history.event_types) if t == "purchase" or t in seen}
        returned += len(set(rank_inputs(context, user, None, None, now).candidates.rows.tolist()) & excluded)
    assert left_out > 0 and returned > 0


def test_a_shopper_with_nothing_left_to_recommend_gets_an_empty_answer(small: LatentShop) -> None:
    config = load_config(None, [f"features.history_events={2 * SMALL.num_products}"])  # every purchase in view
    context = context_of(small, config)
    user, now = later_requests(context, 1)[0]
    stats = context.catalogue.stats
    for row in range(len(stats.product_ids)):
        context.events.append(user, row, "purchase", now - 1.0)
    inputs = rank_inputs(context, user, None, None, now)
    assert len(inputs.candidates.rows) == 0 and inputs.features.shape == (0, len(FEATURES))
    assert VariantPipeline(context, "retrieval").recommend(user, 10, now) == []


def test_a_live_purchase_is_left_out_of_the_next_recommendation(small: LatentShop) -> None:
    context = context_of(small, load_config(None))
    pipeline = VariantPipeline(context, "retrieval")
    user, now = later_requests(context, 1)[0]
    first = pipeline.recommend(user, 5, now)[0].product_id
    pipeline.observe(user, first, "purchase", now + 1)
    assert first not in {r.product_id for r in pipeline.recommend(user, 50, now + 2)}


def test_the_item_item_model_is_ease_and_keeps_its_strongest_weights() -> None:
    rng = np.random.default_rng(0)
    users, rows = rng.integers(0, 40, 400), rng.integers(0, 12, 400)
    x = np.zeros((40, 12))
    x[users, rows] = 1.0
    precision = np.linalg.inv(x.T @ x + 5.0 * np.eye(12))
    expected = precision / -np.diag(precision)[None, :]
    np.fill_diagonal(expected, 0.0)
    full = fit_item_item(users, rows, 12, l2=5.0, max_items=12, neighbours=11)
    np.testing.assert_allclose(full.weights.toarray(), expected, rtol=1e-4, atol=1e-6)
    history = np.array([3, 7, 7])
    np.testing.assert_allclose(full.scores(history), expected[[3, 7]].sum(axis=0), rtol=1e-4, atol=1e-6)
    pruned = fit_item_item(users, rows, 12, l2=5.0, max_items=12, neighbours=3).weights.toarray()
    for row in range(12):
        kept = np.flatnonzero(pruned[row])
        assert len(kept) == 3
        assert np.abs(expected[row, kept]).min() >= np.sort(np.abs(expected[row]))[-3] - 1e-9


def test_coengaged_products_are_counted_by_shared_sessions_before_the_cutoff() -> None:
    """Engagements only, a session counted once per product, unknown products and later events left out; most
    shared first, a session weighing 1 / log2(1 + its products) (B's pair with D, from a basket of two, outweighs
    its pair with C, from a basket of three), ties in catalogue order."""
    events = pd.DataFrame([
        ("s1", "A", "click", 1.0), ("s1", "B", "purchase", 2.0), ("s1", "C", "click", 3.0), ("s1", "A", "click", 4.0),
        ("s2", "A", "add_to_cart", 5.0), ("s2", "B", "click", 6.0), ("s2", "E", "view", 7.0),
        ("s3", "D", "click", 8.0), ("s3", "B", "click", 9.0), ("s3", "X", "click", 10.0),
        ("s4", "C", "click", 100.0), ("s4", "D", "click", 101.0),
    ], columns=["session_id", "product_id", "event_type", "ts_s"])
    row_of = {"A": 0, "B": 1, "C": 2, "D": 3, "E": 4}
    found = {a: rows.tolist() for a, rows in coengaged_before(events, row_of, cutoff_s=50.0).items()}
    assert found == {0: [1, 2], 1: [0, 3, 2], 2: [0, 1], 3: [1]}
    assert coengaged_before(events, row_of, cutoff_s=0.5) == {}


def test_the_latest_visit_is_the_trailing_run_of_close_events() -> None:
    ts = np.array([0.0, 600.0, 10_000.0, 10_100.0, 10_100.0 + SESSION_GAP_S - 1])
    history = History(np.arange(5), ["click", "view", "click", "purchase", "view"], ts)
    visit = history.last_visit()
    assert visit.product_rows.tolist() == [2, 3, 4]
    assert visit.engaged_rows().tolist() == [2, 3]
    assert len(History.empty().last_visit()) == 0


def test_unseen_rank_counts_only_products_the_user_has_not_met(small: LatentShop) -> None:
    context = context_of(small, load_config(None))
    stats = context.catalogue.stats
    category = int(np.bincount(stats.category).argmax())
    members = np.flatnonzero(stats.category == category)
    by_rank = members[np.argsort(stats.rank_in_category[members])]
    assert stats.rank_in_category[by_rank].tolist() == list(range(len(members)))
    seen = by_rank[:2]
    history = History(seen, ["purchase", "click"], np.array([0.0, 1.0]))
    candidates = Candidates(rows=by_rank[2:5], cosine=np.zeros(3, np.float32), bm25=np.zeros(3, np.float32),
                            sources=np.zeros(3, np.int64), position=np.ones(3, np.float32))
    features = compute_features(candidates, history, 10.0, stats, is_search=False)
    assert features[:, COLUMN["unseen_rank_in_category"]].tolist() == [0, 1, 2]


def test_the_generator_is_deterministic_and_has_the_documented_shape() -> None:
    a, b = generate(SMALL), generate(SMALL)
    pd.testing.assert_frame_equal(a.ratings, b.ratings)
    assert a.products.equals(b.products)
    assert not generate(LatentShopSpec(**{**SMALL.__dict__, "seed": 4})).ratings.equals(a.ratings)

    shop = generate(LatentShopSpec(seed=0))
    ratings = shop.ratings
    assert 95_000 <= len(ratings) <= 105_000
    assert ratings["user"].nunique() >= 990 and ratings["item"].nunique() >= 1_650
    assert set(ratings["rating"].unique()) <= {1, 2, 3, 4, 5}
    assert set(ratings["rating"].astype(str).map(RATING_EVENT_TYPES)) == {"click", "purchase"}  # no views
    assert 0.1 < (ratings["rating"] == 5).mean() < 0.3
    assert not ratings.duplicated(["user", "item"]).any()  # one rating per (user, item), as in a ratings export
    # power-law popularity: counts fall about as rank ** -1 over the middle ranks; the top 10% take ~half
    counts = ratings["item"].value_counts().to_numpy()
    ranks = np.arange(1, len(counts) + 1)
    middle = (ranks > 10) & (ranks < 1_000)
    slope = np.polyfit(np.log(ranks[middle]), np.log(counts[middle]), 1)[0]
    assert -1.3 < slope < -0.7, slope
    assert 0.4 < counts[: len(counts) // 10].sum() / counts.sum() < 0.65
    # weeks of time, users coming back: most users of the last tenth of the log were there before it
    ts = ratings["timestamp"]
    assert (ts.max() - ts.min()) / 86_400 > 60
    late = ratings[ts >= ts.quantile(0.9)]["user"].unique()
    earlier = set(ratings[ts < ts.quantile(0.8)]["user"])
    assert np.mean([u in earlier for u in late]) > 0.9
    # sessions: a user's consecutive interactions are within a 30-minute gap or far apart
    gaps = ratings.sort_values(["user", "timestamp"]).groupby("user")["timestamp"].diff().dropna()
    assert not ((gaps > 300) & (gaps <= SESSION_GAP_S)).any()
    sessions = (gaps > SESSION_GAP_S).sum() + ratings["user"].nunique()
    assert 2.5 < len(ratings) / sessions < 5 and len(ratings) / sessions <= MAX_SESSION
