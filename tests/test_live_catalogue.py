"""Every variant replica follows the catalogue change log (issue 38, item 2), on the session's app over the tiny run
(``app``: an XGBoost-ranked variant B, ONNX encoders) and on the app over the in-memory shop (``fake_app``): two
replicas of each variant, real Serve, HTTP and SQLite store.

Changes go through the admin API (``PUT /products``, ``DELETE /products/{id}``), as a shop's back office sends them;
what is checked here is what the replicas make of the log. Each test leaves the shop's answers as it found them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import ray
from ray import serve

from conftest import App
from fake_shop import products
from shoprank.data.schema import PRODUCT_SCHEMA
from shoprank.store.tables import read_table

VARIANTS = ("A", "B")


def change(app: App, puts: Sequence[dict] = (), deletes: Sequence[str] = ()) -> None:
    """Put and delete products through the admin API (the app's client holds the admin key)."""
    if puts:
        answer = app.http.put("/products", json=list(puts))
        assert answer.status_code == 200 and answer.json()["stored"] == len(puts), answer.text
    for product_id in deletes:
        answer = app.http.delete(f"/products/{product_id}")
        assert answer.status_code == 200, answer.text


@pytest.fixture(params=["fake_app", "app"])
def shop(request: pytest.FixtureRequest) -> App:
    return request.getfixturevalue(request.param)


def record(app: App, product_id: str) -> dict:
    """``product_id``'s row as the shop's catalogue holds it, as a put would send it (put back, it changes nothing:
    normalising a normalised row gives it again)."""
    table = products() if app.run is None else read_table(app.run, "data", "products")
    row = next(r for r in table.to_pylist() if r["product_id"] == product_id)
    return {name: dict(row["attributes"] or ()) if name == "attributes" else row[name] for name in PRODUCT_SCHEMA.names}


def on_every_replica(app: App, path: str, body: dict[str, Any], check: Callable[[dict], None]) -> None:
    """``check`` each answer of both variants until both replicas of each answered (Serve picks the replica)."""
    for variant in VARIANTS:
        replicas: set[str] = set()
        for _ in range(60):
            answer = app.post(path, {**body, "variant": variant})
            assert answer.status_code == 200, answer.text
            check(answer.json())
            replicas.add(answer.headers["x-shoprank-replica"])
            if len(replicas) == 2:
                break
        assert len(replicas) == 2, f"{variant}: one replica answered 60 requests in a row"


def test_a_product_put_is_found_by_its_title_on_every_replica_within_2s(shop: App) -> None:
    product = {"product_id": "LIVE-1", "title": "Quarnish trail lantern", "description": "A lantern nobody sold yet.",
               "category": "Outdoors > Lights", "brand": "Borealis", "price": 27.5, "attributes": {"colour": "amber"}}
    try:
        change(shop, puts=[product])
        stored = time.monotonic()
        found: dict[str, float] = {}
        while len(found) < 4 and time.monotonic() - stored < 5:
            for variant in VARIANTS:
                answer = shop.post("/search", {"query": "quarnish trail lantern", "k": 10, "variant": variant})
                live = [item for item in answer.json()["items"] if item["product_id"] == "LIVE-1"]
                if live:
                    assert live[0]["title"] == "quarnish trail lantern" and live[0]["price"] == 27.5  # the replica's
                    found.setdefault(f"{variant} {answer.headers['x-shoprank-replica']}", time.monotonic() - stored)
        assert len(found) == 4 and max(found.values()) < 2.0, found
        listed = len(products()) if shop.run is None else read_table(shop.run, "data", "products").num_rows
        for variant in VARIANTS:  # /variants says where the answering replica's catalogue stands
            catalogue = shop.http.get("/variants").json()["variants"][variant]["model"]["catalogue"]
            assert catalogue["products"] == listed + 1 and catalogue["cursor"] >= 1, catalogue
    finally:
        change(shop, deletes=["LIVE-1"])

    def without(answer: dict) -> None:
        assert "LIVE-1" not in [i["product_id"] for i in answer["items"]], answer

    on_every_replica(shop, "/search", {"query": "quarnish trail lantern", "k": 36}, without)


def test_a_changed_price_shows_in_the_next_answer(shop: App) -> None:
    product = shop.post("/recommend", {"k": 1, "variant": "A"}).json()["items"][0]["product_id"]
    original = record(shop, product)
    try:
        change(shop, puts=[{**original, "price": 123.25}])
        # at once, no waiting: each replica catches up with the log before it answers

        def priced(answer: dict) -> None:
            item = next(i for i in answer["items"] if i["product_id"] == product)
            assert item["price"] == 123.25, item

        on_every_replica(shop, "/search", {"query": original["title"], "k": 36}, priced)
    finally:
        change(shop, puts=[original])


def test_a_deleted_product_never_appears_again(shop: App) -> None:
    """The product an anonymous recommendation shows first (a popular one), deleted: no search by its title, no
    personal or anonymous recommendation shows it on any replica; put back unchanged, it is answered again."""
    first = shop.post("/recommend", {"k": 10, "variant": "A"}).json()["items"][0]["product_id"]
    original = record(shop, first)
    shopper = next(u for u in (f"U{i:06d}" for i in range(1, 41))
                   if any(i["product_id"] == first
                          for i in shop.post("/recommend", {"user_id": u, "k": 36, "variant": "A"}).json()["items"]))

    def without(answer: dict) -> None:
        assert first not in [i["product_id"] for i in answer["items"]], answer

    try:
        change(shop, deletes=[first])
        for _ in range(5):
            on_every_replica(shop, "/search", {"query": original["title"], "k": 36}, without)
            on_every_replica(shop, "/recommend", {"k": 36}, without)
            on_every_replica(shop, "/recommend", {"user_id": shopper, "k": 36}, without)
    finally:
        change(shop, puts=[original])
    assert shop.post("/recommend", {"k": 10, "variant": "A"}).json()["items"][0]["product_id"] == first


def test_a_replica_started_later_replays_the_log(shop: App) -> None:
    """A replica of B killed after a put and a delete: the one Serve starts in its place has both."""
    product = {"product_id": "LIVE-2", "title": "Vellichor camp stove", "description": None,
               "category": "Outdoors > Stoves", "brand": None, "price": 64.0, "attributes": {}}
    withdrawn_id = "P00030" if shop.run is None else sorted(shop.category_of)[30]
    withdrawn = record(shop, withdrawn_id)
    try:
        change(shop, puts=[product], deletes=[withdrawn_id])
        before = {replica._actor_id for replica in _replicas("Variant_B", shop.name)}
        ray.kill(_replicas("Variant_B", shop.name)[0], no_restart=True)
        deadline = time.time() + 120.0
        while len({r._actor_id for r in _replicas("Variant_B", shop.name)} - before) < 1 or \
                serve.status().applications[shop.name].deployments["Variant_B"].replica_states.get("RUNNING") != 2:
            assert time.time() < deadline, "no new replica of Variant_B"
            time.sleep(0.5)

        def found(answer: dict) -> None:
            assert "LIVE-2" in [i["product_id"] for i in answer["items"]], answer["items"]

        def gone(answer: dict) -> None:
            assert withdrawn_id not in [i["product_id"] for i in answer["items"]], answer["items"]

        on_every_replica(shop, "/search", {"query": "vellichor camp stove", "k": 10}, found)
        on_every_replica(shop, "/search", {"query": withdrawn["title"], "k": 36}, gone)
    finally:
        change(shop, puts=[withdrawn], deletes=["LIVE-2"])


def _replicas(deployment: str, app_name: str) -> list[ray.actor.ActorHandle]:
    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{app_name}#{deployment}#")]
    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in names]
