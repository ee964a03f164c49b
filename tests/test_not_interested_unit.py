"""Issue 38, "not interested", without the Serve app: what a hide excludes on the Ray-free answer path (the
in-process pipeline over the in-memory shop, the run's own hides), and that every stage reading a log with hides
takes them for what they are (no behaviour, no engagement, a label-0 showing in search pairs, a per-variant count
in the A/B report), never a KeyError. The app-level must-hold test is ``test_not_interested.py``."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import fake_shop
from conftest import tiny_config
from fake_shop import START, FakeShop, HashedWords, products
from shoprank.config import Config
from shoprank.data.io import read_table
from shoprank.data.schema import NEGATIVE_EVENT_TYPES
from shoprank.encoder.text import product_texts
from shoprank.experiment.report import ab_report
from shoprank.experiment.report_model import ABReport
from shoprank.privacy import Pseudonyms
from shoprank.recsys.answer import Retrieval, VariantPipeline
from shoprank.recsys.context import DenseIndex, RankingContext, assemble_context
from shoprank.recsys.features import compute_features, product_stats
from shoprank.recsys.types import ProductStats
from shoprank.stages import run_stages
from shoprank.store.events import Impression, SqliteEventStore
from test_preprocess import files_source

NOW_S = (START + dt.timedelta(days=40)).timestamp()
"""After every event of the in-memory shop: a live request."""
CATALOGUE = {row["product_id"]: row for row in products().to_pylist()}


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> FakeShop:
    return FakeShop(tiny_config(tmp_path_factory.mktemp("shop")), {"client": "c", "admin": "a"}, b"k" * 32)


def shopper(shop: FakeShop, name: str) -> str:
    """The pseudonym the in-memory shop's events name ``name`` by."""
    return Pseudonyms(shop.user_key).of(name)


def ids(items: list) -> list[str]:
    return [item.product_id for item in items]


def test_the_in_process_pipeline_never_shows_what_a_shopper_hid(shop: FakeShop) -> None:
    """A product hidden is gone from that shopper's recommendations and from a search for its exact title, at once,
    and another shopper still finds it; a brand hide takes every product of the brand, a category hide every product
    of the category."""
    pipeline = VariantPipeline(shop.context(shop.resolve("B", "B"), encoder=True), "retrieval")
    user, other = shopper(shop, "U000001"), shopper(shop, "U000002")
    hidden = ids(pipeline.recommend(user, 10, NOW_S))[0]
    title = CATALOGUE[hidden]["title"]
    assert hidden in ids(pipeline.search(title, user, 5, NOW_S))  # found by its title before the hide

    pipeline.observe(user, hidden, "not_interested", NOW_S - 1)
    assert hidden not in ids(pipeline.recommend(user, 36, NOW_S))
    searched = ids(pipeline.search(title, user, 36, NOW_S))
    assert searched and hidden not in searched
    assert hidden in ids(pipeline.search(title, other, 5, NOW_S))

    brand = CATALOGUE[hidden]["brand"]
    pipeline.observe(user, hidden, "not_interested_brand", NOW_S - 1)
    for answer in (pipeline.recommend(user, 36, NOW_S), pipeline.search(brand, user, 36, NOW_S)):
        assert answer and all(CATALOGUE[p]["brand"] != brand for p in ids(answer))
    tent = next(p for p, row in CATALOGUE.items() if row["category"] == "Outdoors > Tents")
    pipeline.observe(other, tent, "not_interested_category", NOW_S - 1)
    for answer in (pipeline.recommend(other, 36, NOW_S), pipeline.search("dome tent", other, 36, NOW_S)):
        assert answer and all(CATALOGUE[p]["category"] != "Outdoors > Tents" for p in ids(answer))
    assert hidden in ids(pipeline.search(title, other, 5, NOW_S))  # a category hide of another category


def context_of(config: Config, events: pa.Table) -> RankingContext:
    """The in-memory shop's context over ``events`` (as :meth:`FakeShop.context`, another event log)."""
    catalogue = products()

    def dense(stats: ProductStats) -> DenseIndex:
        vectors = HashedWords().embed(product_texts(catalogue, config.encoder), 64)
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        return vectors, index, np.arange(len(vectors))

    return assemble_context(config, catalogue, events, dense, HashedWords())


def test_the_runs_own_hides_exclude_from_their_time_on_and_are_no_behaviour(shop: FakeShop) -> None:
    """Hides in the run's event log (an update's export carries them): excluded for requests after them, not before
    (the offline evaluation asks as of a request's time), kept out of the user's history and out of every product
    statistic, so the features of a log with hides are those of the log without them (at one cut-off)."""
    behaviour = fake_shop.events(Pseudonyms(shop.user_key))
    user = shopper(shop, "U000003")
    hidden_at = START + dt.timedelta(days=10)
    hides = pa.Table.from_pylist([
        {"user_id": user, "session_id": "hides", "product_id": product, "event_type": kind, "ts": hidden_at,
         "split": "train"} for product, kind in (("P00001", "not_interested"), ("P00020", "not_interested_brand"))],
        schema=behaviour.schema)
    with_hides, without = context_of(shop.config, pa.concat_tables([behaviour, hides])), context_of(shop.config,
                                                                                                    behaviour)
    retrieval = Retrieval(with_hides)
    brand_rows = [i for i, p in enumerate(with_hides.catalogue.stats.product_ids)
                  if CATALOGUE[p]["brand"] == CATALOGUE["P00020"]["brand"]]
    assert retrieval.blocked(user, (), NOW_S).tolist() == sorted({1, *brand_rows})
    assert retrieval.blocked(user, (), hidden_at.timestamp()).tolist() == []  # strictly before the request
    assert retrieval.blocked(user, (("not_interested", "P00002"), ("not_interested", "P-unknown")),
                             hidden_at.timestamp()).tolist() == [2]
    blocked = {1, *brand_rows}
    assert blocked & set(Retrieval(without).retrieve(user, [], None, None, NOW_S).candidates.rows.tolist())
    assert not blocked & set(retrieval.retrieve(user, [], None, None, NOW_S).candidates.rows.tolist())

    history = with_hides.events.history(user, NOW_S, 50)
    assert len(history) == len(without.events.history(user, NOW_S, 50)) and not set(history.event_types) & set(
        NEGATIVE_EVENT_TYPES)
    a, b = (product_stats(products(), log, NOW_S, shop.config.features.ctr_prior_views)
            for log in (pa.concat_tables([behaviour, hides]), behaviour))
    for name in ("popularity", "popularity_shoppers", "ctr", "conversion", "repeat_rate"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    candidates = retrieval.retrieve(user, [], None, None, NOW_S).candidates
    np.testing.assert_array_equal(compute_features(candidates, history, NOW_S, a, False),
                                  compute_features(candidates, without.events.history(user, NOW_S, 50), NOW_S, b,
                                                   False))
    with_hides.events.forget(user)
    assert retrieval.blocked(user, (), NOW_S).tolist() == []  # an erased shopper's hides go with them


def test_a_log_with_hides_goes_through_ingest_and_preprocess(ray_local: None, tmp_path: Path,
                                                             make_tiny_config: Callable[..., Config]) -> None:
    """An events file with hides (what an event store's export holds) is read, split and kept; the user histories
    hold behaviour only; a searched product the shopper hid is a label-0 pair shown once; hides pair nothing; the
    run's product statistics and features read the log without a KeyError."""
    catalogue = ("sku,title,category,brand,price\nA,Cast Iron Pan,Home > Cookware > Pans,Ferro,30\n"
                 "B,Steel Pan,Home > Cookware > Pans,Ferro,20\nC,Wok,Home > Cookware > Woks,Sartén,25")
    rows = []
    for day in range(1, 21):
        user, session = f"u{day % 3}", f"s{day}"
        rows += [f"v{day},{user},{session},A,view,2026-01-{day:02d}T10:00:00Z,pan",
                 f"c{day},{user},{session},B,click,2026-01-{day:02d}T10:01:00Z,pan",
                 f"h{day},{user},{session},C,{NEGATIVE_EVENT_TYPES[day % 3]},2026-01-{day:02d}T10:02:00Z,pan"]
    source = files_source(tmp_path, catalogue, rows, "event_id,user_id,session_id,product_id,event_type,ts,query")
    config = make_tiny_config(tmp_path / "runs", *source, "source.files.products.columns={product_id: sku}")
    run = run_stages(config, until="preprocess")

    events = read_table(run, "data", "events")
    assert sorted(set(events.column("event_type").to_pylist())) == sorted({"view", "click", *NEGATIVE_EVENT_TYPES})
    histories = read_table(run, "data", "user_histories")
    kinds = {kind for kinds in histories.column("event_types").to_pylist() for kind in kinds}
    assert kinds == {"view", "click"}
    pairs = {(p["query"], p["product_id"]): p for p in read_table(run, "data", "query_pairs").to_pylist()
             if p["source"] == "behaviour"}
    train = events.filter(pc.equal(events.column("split"), "train"))
    train_hides = pc.sum(pc.is_in(train.column("event_type"), pa.array(NEGATIVE_EVENT_TYPES))).as_py()
    assert train_hides and (pairs[("pan", "C")]["label"], pairs[("pan", "C")]["impressions"]) == (0, train_hides)
    assert (pairs[("pan", "B")]["label"], pairs[("pan", "A")]["label"]) == (1, 0)
    coengaged = read_table(run, "data", "coengagement")
    assert "C" not in coengaged.column("product_a").to_pylist() + coengaged.column("product_b").to_pylist()

    stats = product_stats(read_table(run, "data", "products"), events, cutoff_s=2e9, prior_views=10.0)
    hidden = stats.row_of["C"]  # only ever hidden: no engagement, no shopper, no rate over the hides
    assert stats.popularity[hidden] == stats.popularity_shoppers[hidden] == 0.0
    assert np.isnan(stats.conversion[hidden]) and np.isnan(stats.ctr[hidden])


def test_the_ab_report_counts_hides_per_variant_apart_from_engagements(tmp_path: Path) -> None:
    """A hide of an assigned impression counts once (whichever of the three types, however often sent) in its
    variant's ``hides``; it is no click and no purchase, so CTR and conversion are those of the log without it; a
    hide on a forced answer (the side-by-side view) counts nowhere; the pre-period reads a log with hides; the
    report keeps its documented shape (``ABReport``)."""
    t0 = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)

    def report(with_hides: bool) -> dict:
        store = SqliteEventStore(tmp_path / f"events-{with_hides}.db")
        store.log_impressions([Impression(f"{v}-R{r}", f"{v}-U{r}", v, f"P{p}", p + 1, t0 + dt.timedelta(hours=1))
                               for v in "AB" for r in range(4) for p in range(5)]
                              + [Impression("F-R0", "A-U0", "B", "P0", 1, t0 + dt.timedelta(hours=1), forced=True)])
        events = [{"event_id": f"{v}-c{r}", "user_id": f"{v}-U{r}", "session_id": f"S-{v}{r}", "product_id": "P0",
                   "event_type": "click", "ts": t0 + dt.timedelta(hours=2), "request_id": f"{v}-R{r}"}
                  for v in "AB" for r in range(2)]
        if with_hides:
            hide = {"user_id": "B-U0", "session_id": "S-B0", "product_id": "P3", "request_id": "B-R0",
                    "ts": t0 + dt.timedelta(hours=2)}
            events += [{**hide, "event_id": "h1", "event_type": "not_interested"},
                       {**hide, "event_id": "h2", "event_type": "not_interested_brand"},
                       {**hide, "event_id": "h3", "event_type": "not_interested", "product_id": "P4"},
                       {**hide, "event_id": "forced", "event_type": "not_interested", "product_id": "P0",
                        "user_id": "A-U0", "request_id": "F-R0"},
                       {**hide, "event_id": "before", "event_type": "not_interested_category", "ts": t0,
                        "request_id": None}]
        store.append(events)
        return ab_report(store, {"A": 0.5, "B": 0.5}, prices={"P0": 10.0})

    hidden, plain = report(True), report(False)
    ABReport.model_validate({**hidden, "experiment": "hides", "impressions_dropped": 0})
    assert (hidden["variants"]["A"]["hides"], hidden["variants"]["B"]["hides"]) == (0, 2)
    assert hidden["variants"]["B"]["hide_rate"]["rate"] == pytest.approx(2 / 20)
    assert plain["variants"]["B"]["hides"] == 0
    for variant in "AB":
        for figure in ("impressions", "clicks", "purchases", "ctr", "conversion", "funnel"):
            assert hidden["variants"][variant][figure] == plain["variants"][variant][figure], (variant, figure)
    assert hidden["side_by_side"] == plain["side_by_side"]
    assert hidden["user_level"]["variants"] == plain["user_level"]["variants"]

