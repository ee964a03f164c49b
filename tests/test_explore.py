"""Exploration slots for products added while serving (issue 38, item 3): the policy on the request path.

Ray-free but the last: the in-memory fake shop's run (its context built by ``assemble_context``, what
``load_context`` builds from a run) with six products put after it through the catalogue change log's path
(:class:`LiveCatalogue`), answered by :class:`VariantPipeline` through ``answer_many``, the path a Serve replica
calls; the last test asks the app over that shop (``fake_app``), the change log followed by its replicas.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest
from ray import serve

from conftest import App
from fake_shop import DIMENSIONS, START, HashedWords, events, products
from shoprank.config import Config, ExploreConfig, load_config
from shoprank.encoder.text import product_texts
from shoprank.errors import ConfigError
from shoprank.privacy import Pseudonyms
from shoprank.recsys.answer import VariantPipeline
from shoprank.recsys.context import DenseIndex, RankingContext, assemble_context
from shoprank.recsys.explore import Exploration, ExposureCounts, ExposureFollower
from shoprank.recsys.live import LiveCatalogue
from shoprank.recsys.messages import Asked, Ranked
from shoprank.recsys.types import ProductStats
from shoprank.store.events import CatalogueChange, EventStore, Impression, open_event_store

KEY = b"k" * 32
NEW = [f"N{i}" for i in range(6)]
"""Products put live after the run: lanterns, headlamps and tents no shopper has seen."""
SHOPPER = Pseudonyms(KEY).of("U000004")
"""A shopper whose history is in "Outdoors > Lights" (the fake shop's fourth category)."""
NOW_S = START.timestamp() + 40 * 86_400.0
ADDED_S = START.timestamp() + 35 * 86_400.0


def new_products() -> list[dict]:
    """The record rows of :data:`NEW`, as ``PUT /products`` stores them in the catalogue change log."""
    kinds = [("lantern", "Outdoors > Lights"), ("headlamp", "Outdoors > Lights"), ("lantern", "Outdoors > Lights"),
             ("dome tent", "Outdoors > Tents"), ("skillet", "Kitchen > Cookware"), ("wok", "Kitchen > Cookware")]
    return [{"product_id": pid, "title": f"Zephyr {noun} {i}", "description": f"A new {noun} by Zephyr.",
             "category": category, "brand": "Zephyr", "price": 20.0 + i, "attributes": {"colour": "black"}}
            for i, (pid, (noun, category)) in enumerate(zip(NEW, kinds))]


def run_context(config: Config) -> RankingContext:
    """The fake shop's run as a replica loads it."""
    table = products()

    def dense(stats: ProductStats) -> DenseIndex:
        vectors = HashedWords().embed(product_texts(table, config.encoder), 64)
        index = faiss.IndexFlatIP(DIMENSIONS)
        index.add(vectors)
        return vectors, index, np.arange(len(vectors))

    return assemble_context(config, table, events(Pseudonyms(KEY)), dense, HashedWords())


def put(context: RankingContext, *changes: CatalogueChange) -> None:
    """Apply catalogue changes as a replica's follower does (its own encoder embeds the new texts)."""
    LiveCatalogue(context, lambda texts: HashedWords().embed(texts, 64)).apply(list(changes))


def live_context(config: Config) -> RankingContext:
    """The fake shop's run after :data:`NEW` were put at ``ADDED_S``."""
    context = run_context(config)
    put(context, *(CatalogueChange(seq, "put", p["product_id"], p, ADDED_S)
                   for seq, p in enumerate(new_products(), start=1)))
    return context


@pytest.fixture(scope="module")
def config() -> Config:
    return load_config(None, ["policy.exclude.purchased=false"])


@pytest.fixture
def context(config: Config) -> RankingContext:
    return live_context(config)


def pipeline(context: RankingContext, explore: ExploreConfig | None,
             counts: ExposureCounts | None = None) -> VariantPipeline:
    exploration = Exploration(explore, context, counts or ExposureCounts()) if explore is not None else None
    return VariantPipeline(context, "retrieval", exploration=exploration)


def answer(variant: VariantPipeline, request_id: str, user: str | None = SHOPPER, query: str | None = None,
           hidden: tuple[tuple[str, str], ...] = (), k: int = 10) -> list[Ranked]:
    return variant.answer_many([Asked(user, [], query, k, NOW_S, hidden=hidden, request_id=request_id)])[0].items


def test_recommendation_slots_are_bounded_and_at_their_positions(context: RankingContext) -> None:
    plain = pipeline(context, None)
    explored = pipeline(context, ExploreConfig())
    for user in (SHOPPER, None):
        for request in range(20):
            before = [item.product_id for item in answer(plain, f"r{request}", user)]
            items = answer(explored, f"r{request}", user)
            flags = [item.explored for item in items]
            assert len(items) == 10
            assert [i + 1 for i, flag in enumerate(flags) if flag] == [3, 8], (user, flags)
            assert all(items[i].product_id in NEW for i in (2, 7))
            # the ranked list keeps its order around the slots, shifted down and cut at k
            assert [item.product_id for item in items if not item.explored] == [p for p in before if p not in NEW][:8]


def test_search_has_no_slot_by_default_and_its_configured_ones_otherwise(context: RankingContext) -> None:
    plain = pipeline(context, None)
    by_default = pipeline(context, ExploreConfig())
    for request, query in enumerate(("lantern", "black skillet", "dome tent")):
        assert answer(by_default, f"s{request}", query=query) == answer(plain, f"s{request}", query=query)
    one_slot = pipeline(context, ExploreConfig(search_slots=1, recommend_slots=0))
    items = answer(one_slot, "s", query="headlamp")
    assert [i for i, item in enumerate(items) if item.explored] == [2]
    assert not any(item.explored for item in answer(one_slot, "r"))  # and none on recommendations


def test_a_blocked_deleted_or_capped_product_is_never_explored(context: RankingContext) -> None:
    put(context, CatalogueChange(7, "delete", "N1", None, NOW_S))
    counts = ExposureCounts()
    counts.add({"N2": 200}, {"N2": 30})  # shown max_impressions times: its cap
    variant = pipeline(context, ExploreConfig(), counts)
    seen: set[str] = set()
    for request in range(60):
        items = answer(variant, f"b{request}", hidden=(("not_interested", "N0"),))
        seen |= {item.product_id for item in items if item.explored}
    assert seen and not seen & {"N0", "N1", "N2"}, seen
    assert seen <= {"N3", "N4", "N5"}


def test_a_product_with_clicks_is_drawn_more_often_than_one_without(context: RankingContext) -> None:
    put(context, *(CatalogueChange(7 + i, "delete", pid, None, NOW_S) for i, pid in enumerate(NEW[2:])))
    # two candidates left: N0 and N1
    counts = ExposureCounts()
    counts.add({"N0": 60, "N1": 60}, {"N0": 15, "N1": 0})
    variant = pipeline(context, ExploreConfig(recommend_slots=1, positions=[3]), counts)
    drawn = [next(item.product_id for item in answer(variant, f"c{request}") if item.explored)
             for request in range(200)]
    assert drawn.count("N0") > 0.9 * len(drawn), drawn.count("N0")
    assert drawn.count("N1") > 0, "the one without clicks still draws a slot now and then"


def test_nothing_is_explored_when_nothing_is_eligible(context: RankingContext, config: Config) -> None:
    run_only = run_context(config)  # no product put live
    plain, explored = pipeline(run_only, None), pipeline(run_only, ExploreConfig())
    for request in range(10):
        for user, query in ((SHOPPER, None), (None, None), (SHOPPER, "lantern")):
            assert answer(explored, f"e{request}", user, query) == answer(plain, f"e{request}", user, query)
    counts = ExposureCounts()
    counts.add(dict.fromkeys(NEW, 200), {})  # every new product past its cap
    capped = pipeline(context, ExploreConfig(), counts)
    assert not any(item.explored for item in answer(capped, "e"))


def test_the_same_request_id_draws_the_same(context: RankingContext) -> None:
    variant = pipeline(context, ExploreConfig())

    def slots(request_id: str) -> list[str]:
        return [item.product_id for item in answer(variant, request_id) if item.explored]

    assert all(slots("same") == slots("same") for _ in range(5))
    assert len({tuple(slots(f"other{i}")) for i in range(30)}) > 1, "different requests draw differently"


def test_positions_must_hold_the_slots() -> None:
    with pytest.raises(ConfigError, match="positions"):
        load_config(None, ["serve.explore.positions=[3]"])  # two recommendation slots by default
    with pytest.raises(ConfigError, match="increasing"):
        load_config(None, ["serve.explore.positions=[8, 3]"])


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EventStore]:
    """A new event store of each backend: an SQLite file, or an empty database of the session's PostgreSQL."""
    location = str(tmp_path / "events.sqlite") if request.param == "sqlite" else \
        request.getfixturevalue("postgres_server").database()
    opened = open_event_store(location)
    yield opened
    opened.close()


def test_the_follower_counts_each_stored_impression_and_click_once(store: EventStore) -> None:
    at = dt.datetime(2024, 4, 1, tzinfo=dt.timezone.utc)

    def shown(request: str, *products: str) -> None:
        store.log_impressions([Impression(request, "u1", "B", p, i, at) for i, p in enumerate(products, start=1)])

    def clicked(event_id: str, product: str, kind: str = "click") -> None:
        store.append([{"event_id": event_id, "user_id": "u1", "session_id": "s", "product_id": product,
                       "event_type": kind, "ts": at}])

    shown("r1", "N0", "N1", "P00001")
    clicked("e1", "N0")
    clicked("e2", "N0", "add_to_cart")  # a cart is not a click
    counts = ExposureCounts()
    follower = ExposureFollower(store, counts)
    follower.catch_up()  # a replica started now: everything stored so far
    assert [c.tolist() for c in counts.of(["N0", "N1", "N9"])] == [[1, 1, 0], [1, 0, 0]]
    follower.catch_up()  # nothing new: nothing counted again
    shown("r2", "N0")
    shown("r3", "N0", "N1")
    clicked("e3", "N1")
    follower.catch_up()
    assert [c.tolist() for c in counts.of(["N0", "N1"])] == [[3, 2], [1, 1]]
    late = ExposureCounts()
    ExposureFollower(store, late).catch_up()  # a replica started later agrees
    assert [c.tolist() for c in late.of(["N0", "N1"])] == [[3, 2], [1, 1]]


def test_the_app_explores_a_product_put_live_on_recommendations_only(fake_app: App) -> None:
    """On the app (two replicas per variant): a product put through the change log fills the first slot of an
    anonymous recommendation, flagged ``explored``, as the replica lists it; a search finds it by its title but
    never through a slot; deleted, it is explored no more."""
    product = {"product_id": "LIVE-EXPLORE", "title": "Vindrel storm lantern", "description": "A lantern.",
               "category": "Outdoors > Lights", "brand": "Zephyr", "price": 31.0, "attributes": {"colour": "red"}}
    writer = serve.get_deployment_handle("EventStoreWriter", app_name=fake_app.name)

    def change(puts: list[dict], deletes: list[str]) -> None:
        writer.change_catalogue.remote(puts, deletes, dt.datetime.now(dt.timezone.utc), uuid.uuid4().hex).result()

    change([product], [])
    try:
        explored: dict[str, dict] = {}
        deadline = time.monotonic() + 10
        while len(explored) < 2 and time.monotonic() < deadline:
            for variant in ("A", "B"):
                items = fake_app.post("/recommend", {"k": 10, "variant": variant}).json()["items"]
                assert [i["rank"] for i in items if i["explored"]] in ([], [3]), items  # one eligible: one slot
                explored.update({variant: i for i in items if i["explored"]})
        assert set(explored) == {"A", "B"}, explored
        assert all(i["product_id"] == "LIVE-EXPLORE" and i["title"] == "vindrel storm lantern"
                   for i in explored.values())
        for variant in ("A", "B"):
            body = {"query": "vindrel storm lantern", "k": 10, "variant": variant}
            items = fake_app.post("/search", body).json()["items"]
            assert items[0]["product_id"] == "LIVE-EXPLORE" and not any(i["explored"] for i in items)
    finally:
        change([], ["LIVE-EXPLORE"])
    time.sleep(1.0)  # past serve.catalogue_poll_s: every replica applied the delete
    for _ in range(20):
        for variant in ("A", "B"):
            items = fake_app.post("/recommend", {"k": 10, "variant": variant}).json()["items"]
            assert not any(i["explored"] or i["product_id"] == "LIVE-EXPLORE" for i in items)
