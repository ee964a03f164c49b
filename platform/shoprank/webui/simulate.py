"""Simulated traffic: shoppers of the simulated shop use the Serve API as a website would.

Each shopper is one of the shop's simulated users, assigned to a variant by the
router (never forced). A shopper has one to three page views; each asks for a search
(a query the user would type about their current intent) or for recommendations,
then clicks, adds to cart and buys what the shop's hidden ground truth
(:class:`~shoprank.data.synthetic.ShopSimulator`: tastes, query relevance,
position bias) says, and sends those events back with the answer's ``request_id``.
The server logged what it showed (impressions), so the A/B report can judge the
variants; the simulator never reads the report.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import numpy as np

from shoprank.data.synthetic import ShopSimulator
from shoprank.webui.client import ServeClient, ServeError

Progress = Callable[[int, int], None]


@dataclass
class Traffic:
    """What a simulation sent and what failed."""

    shoppers: int = 0
    requests: int = 0
    events: int = 0
    errors: list[str] = field(default_factory=list)


def shopper(client: ServeClient, simulator: ShopSimulator, user_id: str, seed: int, k: int,
            search_fraction: float) -> tuple[int, int]:
    """One shopper's visit: (requests, events sent)."""
    rng = np.random.default_rng(seed)
    requests = events = 0
    for _ in range(1 + min(int(rng.geometric(0.5)) - 1, 2)):
        query = simulator.query_for(user_id, rng) if rng.random() < search_fraction else None
        answer = client.search(query, user_id, k) if query else client.recommend(user_id, k)
        requests += 1
        shown = [item["product_id"] for item in answer["items"]]
        outcome = simulator.respond(user_id, shown, rng, query)
        sent = [
            {"user_id": user_id, "product_id": product, "event_type": kind, "request_id": answer["request_id"],
             "variant": answer["variant"], "position": shown.index(product) + 1, "query": query,
             "session_id": f"sim-{seed}"}
            for kind, products in (("click", outcome.clicked), ("add_to_cart", outcome.added_to_cart),
                                   ("purchase", outcome.purchased))
            for product in products
        ]
        if sent:
            client.events(sent)
            events += len(sent)
    return requests, events


def simulate(url: str, key: str, simulator: ShopSimulator, users: int, *, concurrency: int = 8, k: int = 10,
             search_fraction: float = 0.5, seed: int = 0, progress: Progress | None = None) -> Traffic:
    """Send ``users`` simulated shoppers (drawn from the shop's users) through the API with ``key`` (a client key
    suffices), ``concurrency`` at a time."""
    pool = simulator.user_ids
    picks = np.random.default_rng(seed).choice(len(pool), size=users, replace=users > len(pool))
    traffic = Traffic()
    lock = threading.Lock()
    client = ServeClient(url, key, timeout_s=120.0)
    try:
        with ThreadPoolExecutor(max_workers=concurrency) as workers:
            futures = [workers.submit(shopper, client, simulator, pool[p], seed * 1_000_003 + i, k, search_fraction)
                       for i, p in enumerate(picks)]
            for future in as_completed(futures):
                with lock:
                    try:
                        requests, events = future.result()
                        traffic.requests += requests
                        traffic.events += events
                    except ServeError as exc:
                        traffic.errors.append(str(exc))
                    traffic.shoppers += 1
                    if progress is not None:
                        progress(traffic.shoppers, users)
    finally:
        client.close()
    return traffic
