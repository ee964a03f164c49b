"""Issue 38, "not interested", on the session's Serve app (two replicas of each variant): a shopper who hides a
product never sees it again, in either variant, from the next answer on, however many events follow; a brand hide
takes every product of the brand; another shopper is not affected.

The shoppers here are new ones (ids of this module's own), so no other test's answers change: a hide is an event of
the shopper who sent it only."""

from __future__ import annotations

import uuid
from collections import defaultdict
from typing import Any

from conftest import App

VARIANTS = ("A", "B")
ANSWERS = 50
"""Answers asked after a hide, alternating variants and kinds (the issue's "test over 50 answers")."""
MAX_ANSWERS = 200
"""At most this many, should Serve not have sent a variant's requests to both of its replicas within ``ANSWERS``."""


def ask(app: App, user: str, variant: str, query: str | None, k: int = 20) -> tuple[dict[str, Any], str]:
    """One answer (a search for ``query``, else a recommendation) forced to ``variant``, and its replica."""
    body = {"user_id": user, "k": k, "variant": variant}
    response = app.post("/search", {**body, "query": query}) if query is not None else app.post("/recommend", body)
    assert response.status_code == 200, response.text
    return response.json(), response.headers["x-shoprank-replica"]


def hide(app: App, user: str, answer: dict[str, Any], item: dict[str, Any], kind: str) -> None:
    """``user`` hides ``item`` of ``answer`` (``kind``: one of the three "not interested" types), attributed to the
    answer as a page sends it (the app checks that answer showed it to this user: serve.unattributed=reject)."""
    event = {"user_id": user, "product_id": item["product_id"], "event_type": kind, "request_id": answer["request_id"],
             "variant": answer["variant"], "position": item["rank"]}
    response = app.post("/events", [event])
    assert response.status_code == 200, response.text


def answers_after(app: App, user: str, queries: list[str]) -> list[dict[str, Any]]:
    """``ANSWERS`` answers for ``user``, alternating variants A and B and, within each, a search for each of
    ``queries`` and a recommendation; then more until each variant's two replicas have answered (at most
    ``MAX_ANSWERS``)."""
    kinds: list[str | None] = [*queries, None]
    answered: list[dict[str, Any]] = []
    replicas: dict[str, set[str]] = defaultdict(set)
    for i in range(MAX_ANSWERS):
        if i >= ANSWERS and all(len(replicas[v]) == 2 for v in VARIANTS):
            break
        variant = VARIANTS[i % 2]
        answer, replica = ask(app, user, variant, kinds[(i // 2) % len(kinds)])
        answered.append(answer)
        replicas[variant].add(replica)
    assert all(len(replicas[v]) == 2 for v in VARIANTS), f"not every replica answered: {dict(replicas)}"
    return answered


def found_by_title(app: App, user: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """A recommendation to ``user`` (variant A) and an item of it that a search for its exact title finds in both
    variants (so the test could see it come back), with that title as a query."""
    answer, _ = ask(app, user, "A", None)
    limit = app.config.serve.max_query_chars
    for item in answer["items"]:
        title = item["title"][:limit].strip()
        if all(item["product_id"] in products(ask(app, user, v, title)[0]) for v in VARIANTS):
            return answer, item, title
    raise AssertionError(f"no product recommended to {user} is found by its title: {answer['items']}")


def products(answer: dict[str, Any]) -> list[str]:
    return [item["product_id"] for item in answer["items"]]


def test_a_hidden_product_never_reappears_for_that_shopper(app: App) -> None:
    """Hidden on an answer that showed it: absent from 50 answers (searches for its exact title and
    recommendations, variants A and B, each variant's two replicas), also once more events than
    ``features.history_events`` have followed the hide (the window a replica reads of a shopper); another shopper
    still finds it by its title."""
    user, other = f"hide-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"
    answer, item, title = found_by_title(app, user)
    hidden = item["product_id"]
    hide(app, user, answer, item, "not_interested")
    for shown in answers_after(app, user, [title]):
        assert hidden not in products(shown), f"{hidden} came back in {shown['variant']} ({shown['kind']})"

    window = app.config.features.history_events
    others = [p for p in app.category_of if p != hidden]
    views = [{"user_id": user, "product_id": others[i % len(others)], "event_type": "view"} for i in range(window + 10)]
    for start in range(0, len(views), 1000):
        assert app.post("/events", views[start:start + 1000]).status_code == 200
    for shown in answers_after(app, user, [title]):
        assert hidden not in products(shown), f"{hidden} came back after {len(views)} views in {shown['variant']}"
    for variant in VARIANTS:
        assert hidden in products(ask(app, other, variant, title)[0]), f"{variant}: another shopper lost {hidden}"


def test_a_hidden_brand_takes_every_product_of_the_brand(app: App) -> None:
    """A brand hide: no product of the brand in 50 answers (searches for the brand's name and the product's title,
    recommendations), in either variant; another shopper still finds the brand's products."""
    user, other = f"brand-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"
    answer, _ = ask(app, user, "B", None)
    item = next(i for i in answer["items"] if i["brand"])
    brand = item["brand"]
    limit = app.config.serve.max_query_chars
    queries = [brand[:limit], item["title"][:limit].strip()]
    before = ask(app, user, "A", queries[0])[0]
    assert any(i["brand"] == brand for i in before["items"]), f"a search for {brand!r} finds none of its products"
    hide(app, user, answer, item, "not_interested_brand")
    for shown in answers_after(app, user, queries):
        assert not [i["product_id"] for i in shown["items"] if i["brand"] == brand], \
            f"{brand} came back in {shown['variant']} ({shown['kind']})"
    for variant in VARIANTS:
        assert any(i["brand"] == brand for i in ask(app, other, variant, queries[0])[0]["items"]), variant
