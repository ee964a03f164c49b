"""Every variant replica follows the catalogue change log (issue 38, item 2), on the app over the in-memory shop
(``fake_app``: two replicas of each variant, real Serve, HTTP and SQLite store).

Changes are written through the app's event-store writer (``EventStoreWriter.change_catalogue``), the call
``PUT /products`` and ``DELETE /products/{id}`` make once they have validated a request; what is checked here is
what the replicas make of the log. Each test leaves the shop's answers as it found them.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray import serve

from conftest import App
from fake_shop import products

VARIANTS = ("A", "B")


def change(app: App, puts: Sequence[dict] = (), deletes: Sequence[str] = ()) -> int:
    """Store a batch of catalogue changes as the admin routes do; the changes stored."""
    writer = serve.get_deployment_handle("EventStoreWriter", app_name=app.name)
    return writer.change_catalogue.remote(list(puts), list(deletes), dt.datetime.now(dt.timezone.utc),
                                          uuid.uuid4().hex).result()


def record(product_id: str) -> dict:
    row = next(r for r in products().to_pylist() if r["product_id"] == product_id)
    return {**row, "attributes": dict(row["attributes"])}


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


def test_a_product_put_is_found_by_its_title_on_every_replica_within_2s(fake_app: App) -> None:
    product = {"product_id": "LIVE-1", "title": "Quarnish trail lantern", "description": "A lantern nobody sold yet.",
               "category": "Outdoors > Lights", "brand": "Borealis", "price": 27.5, "attributes": {"colour": "amber"}}
    try:
        assert change(fake_app, puts=[product]) == 1
        stored = time.monotonic()
        found: dict[str, float] = {}
        while len(found) < 4 and time.monotonic() - stored < 5:
            for variant in VARIANTS:
                answer = fake_app.post("/search", {"query": "quarnish trail lantern", "k": 5, "variant": variant})
                top = answer.json()["items"][0]
                if top["product_id"] == "LIVE-1":
                    assert top["title"] == "quarnish trail lantern" and top["price"] == 27.5  # the replica's row
                    found.setdefault(f"{variant} {answer.headers['x-shoprank-replica']}", time.monotonic() - stored)
        assert len(found) == 4 and max(found.values()) < 2.0, found
        for variant in VARIANTS:  # /variants says where the answering replica's catalogue stands
            catalogue = fake_app.http.get("/variants").json()["variants"][variant]["model"]["catalogue"]
            assert catalogue["products"] == 37 and catalogue["cursor"] >= 1, catalogue
    finally:
        change(fake_app, deletes=["LIVE-1"])

    def without(answer: dict) -> None:
        assert "LIVE-1" not in [i["product_id"] for i in answer["items"]], answer

    on_every_replica(fake_app, "/search", {"query": "quarnish trail lantern", "k": 36}, without)


def test_a_changed_price_shows_in_the_next_answer(fake_app: App) -> None:
    original = record("P00004")
    try:
        change(fake_app, puts=[{**original, "price": 123.25}])
        # at once, no waiting: each replica catches up with the log before it answers

        def priced(answer: dict) -> None:
            item = next(i for i in answer["items"] if i["product_id"] == "P00004")
            assert item["price"] == 123.25, item

        on_every_replica(fake_app, "/search", {"query": original["title"], "k": 36}, priced)
    finally:
        change(fake_app, puts=[original])


def test_a_deleted_product_never_appears_again(fake_app: App) -> None:
    """The product an anonymous recommendation shows first (a popular one), deleted: no search by its title, no
    personal or anonymous recommendation shows it on any replica; put back unchanged, it is answered again."""
    first = fake_app.post("/recommend", {"k": 10, "variant": "A"}).json()["items"][0]["product_id"]
    original = record(first)
    shopper = next(u for u in ("U000001", "U000002", "U000003", "U000004", "U000005")
                   if any(i["product_id"] == first
                          for i in fake_app.post("/recommend", {"user_id": u, "k": 36, "variant": "A"}).json()["items"]))

    def without(answer: dict) -> None:
        assert first not in [i["product_id"] for i in answer["items"]], answer

    try:
        change(fake_app, deletes=[first])
        for _ in range(5):
            on_every_replica(fake_app, "/search", {"query": original["title"], "k": 36}, without)
            on_every_replica(fake_app, "/recommend", {"k": 36}, without)
            on_every_replica(fake_app, "/recommend", {"user_id": shopper, "k": 36}, without)
    finally:
        change(fake_app, puts=[original])
    assert fake_app.post("/recommend", {"k": 10, "variant": "A"}).json()["items"][0]["product_id"] == first



def test_a_replica_started_later_replays_the_log(fake_app: App) -> None:
    """A replica of B killed after a put and a delete: the one Serve starts in its place has both."""
    product = {"product_id": "LIVE-2", "title": "Vellichor camp stove", "description": None,
               "category": "Outdoors > Stoves", "brand": None, "price": 64.0, "attributes": {}}
    withdrawn = record("P00030")
    try:
        change(fake_app, puts=[product], deletes=["P00030"])
        before = {replica._actor_id for replica in _replicas("Variant_B", fake_app.name)}
        ray.kill(_replicas("Variant_B", fake_app.name)[0], no_restart=True)
        deadline = time.time() + 120.0
        while len({r._actor_id for r in _replicas("Variant_B", fake_app.name)} - before) < 1 or \
                serve.status().applications[fake_app.name].deployments["Variant_B"].replica_states.get("RUNNING") != 2:
            assert time.time() < deadline, "no new replica of Variant_B"
            time.sleep(0.5)

        def found(answer: dict) -> None:
            assert answer["items"][0]["product_id"] == "LIVE-2", answer["items"][:3]

        def gone(answer: dict) -> None:
            assert "P00030" not in [i["product_id"] for i in answer["items"]], answer["items"]

        on_every_replica(fake_app, "/search", {"query": "vellichor camp stove", "k": 5}, found)
        on_every_replica(fake_app, "/search", {"query": withdrawn["title"], "k": 36}, gone)
    finally:
        change(fake_app, puts=[withdrawn], deletes=["LIVE-2"])


def _replicas(deployment: str, app_name: str) -> list[ray.actor.ActorHandle]:
    names = [a for a in ray.util.list_named_actors(all_namespaces=True)
             if a["name"].startswith(f"SERVE_REPLICA::{app_name}#{deployment}#")]
    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in names]
