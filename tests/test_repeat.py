"""Repeat-aware recommendation and popularity on the data's clock (issue 36, items 2 and 6).

Ray-free: tiny catalogues and event logs written here, the context built by ``assemble_context`` (what
``load_context`` builds from a run), and the request path's own functions: the repeat source, the shopper's
own-history features at a cut-off, the recent popularity windows, and ``policy.exclude.purchased: auto``.
"""

from __future__ import annotations

import datetime as dt
import time

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from shoprank.config import Config, load_config
from shoprank.recsys.context import (
    ExclusionDecision, RankingContext, assemble_context, coengaged_before, events_frame,
)
from shoprank.recsys.features import COLUMN
from shoprank.recsys.retrieval import RecentPopularity, rank_inputs
from shoprank.recsys.types import SOURCES, ProductStats

DAY = 86_400.0
START = dt.datetime(2011, 1, 3, 9, tzinfo=dt.timezone.utc)
"""A data clock far from the wall clock, as Online Retail's (2010-12 to 2011-12)."""


def catalogue(count: int = 6) -> pa.Table:
    return pa.table({"product_id": [f"P{i}" for i in range(count)], "title": [f"mug {i}" for i in range(count)],
                     "description": [""] * count, "category": ["Home > Mugs"] * count, "brand": [""] * count,
                     "price": [2.0 + i for i in range(count)], "attributes": [[]] * count},
                    schema=pa.schema([("product_id", pa.string()), ("title", pa.string()),
                                      ("description", pa.string()), ("category", pa.string()),
                                      ("brand", pa.string()), ("price", pa.float64()),
                                      ("attributes", pa.map_(pa.string(), pa.string()))]))


def log(rows: list[tuple[str, str, str, float, str]]) -> pa.Table:
    """Events from (user, product, event type, day after ``START``, split); one session per user and day."""
    return pa.table({
        "user_id": [r[0] for r in rows], "session_id": [f"{r[0]}@{int(r[3])}" for r in rows],
        "product_id": [r[1] for r in rows], "event_type": [r[2] for r in rows],
        "ts": pa.array([START + dt.timedelta(days=r[3]) for r in rows], pa.timestamp("us", tz="UTC")),
        "split": [r[4] for r in rows],
    })


def context(config: Config, events: pa.Table, products: pa.Table | None = None) -> RankingContext:
    products = products if products is not None else catalogue()

    def dense(stats: ProductStats) -> tuple[np.ndarray, faiss.Index, np.ndarray]:
        vectors = np.eye(len(stats.product_ids), 8, dtype=np.float32)
        index = faiss.IndexFlatIP(8)
        index.add(vectors)
        return vectors, index, np.arange(len(vectors))

    return assemble_context(config, products, events, dense, None)


def epoch(day: float) -> float:
    return (START + dt.timedelta(days=day)).timestamp()


# a regular who bought P1 on days 0, 10 and 30 (and clicked it on day 35), bought P2 once, and bought P1 again on
# day 50: after the cut-off of the request on day 40
REGULAR = [("u", "P1", "purchase", 0, "train"), ("u", "P1", "purchase", 10, "train"),
           ("u", "P1", "purchase", 30, "train"), ("u", "P1", "click", 35, "train"),
           ("u", "P2", "purchase", 20, "train"), ("u", "P1", "purchase", 50, "train"),
           ("v", "P3", "purchase", 1, "train"), ("v", "P3", "purchase", 2, "train"),
           ("w", "P3", "purchase", 3, "train"),
           ("w", "P4", "click", 38, "train")]


def test_own_purchase_features_at_a_cutoff_leak_nothing_after_it() -> None:
    config = load_config(None, ["policy.exclude.purchased=false"])
    ctx = context(config, log(REGULAR))
    inputs = rank_inputs(ctx, "u", None, None, epoch(40))
    rows = {ctx.catalogue.stats.product_ids[r]: i for i, r in enumerate(inputs.candidates.rows)}
    assert {"P1", "P2"} <= set(rows)
    p1, p2 = inputs.features[rows["P1"]], inputs.features[rows["P2"]]
    assert p1[COLUMN["user_purchases"]] == 3  # the day-50 purchase is after the request: not counted
    assert p1[COLUMN["user_engagements"]] == 4
    assert p1[COLUMN["days_since_purchase"]] == pytest.approx(10.0)
    assert p1[COLUMN["days_since_engaged"]] == pytest.approx(5.0)
    assert p1[COLUMN["repurchase_interval_days"]] == pytest.approx(15.0)  # (30 - 0) / 2
    assert p1[COLUMN["purchase_due_ratio"]] == pytest.approx(10.0 / 15.0)
    assert p1[COLUMN["from_repeat"]] == 1
    assert p2[COLUMN["user_purchases"]] == 1 and p2[COLUMN["days_since_purchase"]] == pytest.approx(20.0)
    assert np.isnan(p2[COLUMN["repurchase_interval_days"]]) and np.isnan(p2[COLUMN["purchase_due_ratio"]])
    others = [i for p, i in rows.items() if p not in ("P1", "P2")]
    assert others, "popular products the shopper never bought are candidates too"
    for i in others:
        assert inputs.features[i, COLUMN["user_purchases"]] == 0
        assert np.isnan(inputs.features[i, COLUMN["days_since_purchase"]])
    # the repeat source ranks by recency-decayed count: three purchases of P1 over one more recent purchase of P2
    assert inputs.features[rows["P1"], COLUMN["repeat_score"]] > inputs.features[rows["P2"], COLUMN["repeat_score"]]
    # the product's global repeat rate (before the statistics' cut-off): of P3's two buyers, v bought it again
    stats = ctx.catalogue.stats
    assert stats.repeat_rate[stats.row_of["P3"]] == pytest.approx(0.5)
    assert np.isnan(stats.repeat_rate[stats.row_of["P5"]])
    assert stats.popularity_shoppers[stats.row_of["P3"]] == pytest.approx(np.log1p(2))
    assert stats.popularity[stats.row_of["P3"]] == pytest.approx(np.log1p(3))


def test_the_repeat_source_follows_the_exclusion_rule() -> None:
    kept = context(load_config(None, ["policy.exclude.purchased=false"]), log(REGULAR))
    candidates = rank_inputs(kept, "u", None, None, epoch(40)).candidates
    repeat = candidates.rows[(candidates.sources >> SOURCES.index("repeat")) & 1 == 1]
    assert {kept.catalogue.stats.product_ids[r] for r in repeat} == {"P1", "P2"}
    excluded = context(load_config(None, ["policy.exclude.purchased=true"]), log(REGULAR))
    candidates = rank_inputs(excluded, "u", None, None, epoch(40)).candidates
    ids = {excluded.catalogue.stats.product_ids[r] for r in candidates.rows}
    assert not ids & {"P1", "P2"}
    assert not ((candidates.sources >> SOURCES.index("repeat")) & 1).any()


def test_recent_popularity_follows_the_data_clock_not_the_wall_clock() -> None:
    """Windows end at the request (nothing at or after it counts) and never after the log's last event: a clock
    far past the data (today's wall clock) gives the log's last days, the same at any later time."""
    ts = np.array([epoch(d) for d in (1.0, 2.0, 2.5, 9.0, 9.5)])
    rows = np.array([0, 1, 1, 2, 2])
    users = np.array(["a", "a", "b", "c", "c"], dtype=object)
    recent = RecentPopularity(ts, rows, users, 4, days=7.0)
    events, shoppers = recent.at(epoch(3.0))
    assert events.tolist() == [1, 2, 0, 0] and shoppers.tolist() == [1, 2, 0, 0]
    events, shoppers = recent.at(epoch(9.0))  # the events of day 9 are not before a request at day 9
    assert events.tolist() == [0, 2, 0, 0]
    latest = recent.at(epoch(10.0))
    assert latest[0].tolist() == [0, 0, 2, 0] and latest[1].tolist() == [0, 0, 1, 0]  # two events, one shopper
    for now in (time.time(), time.time() + 365 * DAY, epoch(400.0)):
        assert [a.tolist() for a in recent.at(now)] == [a.tolist() for a in latest]
    assert [a.tolist() for a in RecentPopularity.empty(4, 7.0).at(time.time())] == [[0] * 4, [0] * 4]


def test_trending_orders_by_distinct_shoppers_or_by_events() -> None:
    """A heavy buyer's ten purchases of P0 against three shoppers' one each of P1, in the last week of a log
    a year before today: a cold start's trending list puts P1 first by shoppers, P0 by events."""
    rows = [("heavy", "P0", "purchase", 100 + i / 10, "train") for i in range(10)]
    rows += [(f"s{i}", "P1", "purchase", 101 + i / 10, "train") for i in range(3)]
    for popularity_by, first in (("shoppers", "P1"), ("events", "P0")):
        ctx = context(load_config(None, [f"retrieval.popularity_by={popularity_by}"]), log(rows))
        trending = ctx.catalogue.trending(time.time())
        assert ctx.catalogue.stats.product_ids[trending[0]] == first
        assert len(trending) == 2


def test_auto_exclusion_keeps_bought_products_where_shoppers_buy_them_again() -> None:
    exclude = load_config(None).policy.exclude
    assert exclude.purchased == "auto"
    again = [("u", "P1", "purchase", 0, "train"), ("u", "P1", "purchase", 30, "validation"),
             ("v", "P2", "purchase", 0, "train"), ("v", "P2", "purchase", 31, "validation"),
             ("v", "P3", "purchase", 31, "validation"), ("u", "P1", "purchase", 60, "test")]
    frame = events_frame(log(again))
    decision = ExclusionDecision.decide(exclude, frame)
    assert decision.shares["validation"] == {"purchases": 3, "repeat_share": pytest.approx(2 / 3, abs=1e-4)}
    assert decision.shares["test"] == {"purchases": 1, "repeat_share": 1.0}
    assert not decision.exclude_purchased and "66.7%" in decision.reason
    never = [("u", "P1", "purchase", 0, "train"), ("u", "P2", "purchase", 30, "validation"),
             ("v", "P3", "purchase", 31, "validation")]
    decision = ExclusionDecision.decide(exclude, events_frame(log(never)))
    assert decision.exclude_purchased and decision.shares["validation"]["repeat_share"] == 0.0
    no_evidence = ExclusionDecision.decide(exclude, events_frame(log(never[:1])))
    assert no_evidence.exclude_purchased and "no purchase in the validation split" in no_evidence.reason
    forced = ExclusionDecision.decide(load_config(None, ["policy.exclude.purchased=true"]).policy.exclude, frame)
    assert forced.exclude_purchased and forced.setting is True
    # the context a reader builds follows the decision: a product bought before is a candidate only where kept
    ctx = context(load_config(None), log(again))
    assert "purchase" not in ctx.catalogue.excluded_types
    ctx = context(load_config(None), log(never))
    assert "purchase" in ctx.catalogue.excluded_types


def test_a_huge_basket_adds_less_to_each_pair_than_a_small_one() -> None:
    """Baskets as co-engagement: a wholesaler's order of 40 products holds A, B and C; an order of two puts A beside
    C, one of three beside B and D. Per pair the big order adds 1 / log2(41), about 0.19, the order of two 0.63."""
    rows = [("big", "A", "purchase", 0.0), ("big", "B", "purchase", 0.0), ("big", "C", "purchase", 0.0)]
    rows += [("big", f"X{i}", "purchase", 0.0) for i in range(37)]
    rows += [("o1", "A", "purchase", 1.0), ("o1", "C", "purchase", 1.0)]
    rows += [("o2", "A", "purchase", 2.0), ("o2", "B", "purchase", 2.0), ("o2", "D", "purchase", 2.0)]
    events = pd.DataFrame(rows, columns=["session_id", "product_id", "event_type", "ts_s"])
    row_of = {p: i for i, p in enumerate(["A", "B", "C", "D", *[f"X{i}" for i in range(37)]])}
    neighbours = coengaged_before(events, row_of, cutoff_s=10.0)[0].tolist()
    assert neighbours[:3] == [2, 1, 3]  # C (0.19 + 1/log2(3)), B (0.19 + 1/log2(4)), D (0.5)
