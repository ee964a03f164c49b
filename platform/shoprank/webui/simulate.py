"""Simulated traffic: shoppers of the simulated shop use the Serve API as a website would.

Each shopper is one of the shop's simulated users, assigned to a variant by the
router (never forced): every arm of ``serve.split`` gets shoppers in its weight's share,
however many arms there are (:attr:`Traffic.arms` counts them as the answers named them).
A shopper has one to three page views; each asks for a search
(a query the user would type about their current intent) or for recommendations,
then clicks, adds to cart and buys what the shop's hidden ground truth
(:class:`~shoprank.data.synthetic.ShopSimulator`: tastes, query relevance,
position bias) says, and sends those events back with the answer's ``request_id``.
The server logged what it showed (impressions), so the A/B report can judge the
variants; the simulator never reads the report.

**Returning shoppers.** A shopper may come back: with ``visits`` above 1, each comes
once a simulated day, at a random time of it, their page views a minute apart. The
simulated clock starts an hour after the app's (``/healthz``), and each request and
event carries its simulated time (``ts``), which the app stamps its impressions with:
the report's sessionisation (a gap over 30 minutes) sees each visit as a session, where
visits sent within the same minutes of wall time would all have been one. Visits go in
rounds, a day at a time, so a shopper's second visit is answered with their first one's
events in their history. The app accepts times up to ``serve.simulated_days`` ahead of
its clock (the simulated presets set it; a live shop's 0 refuses them): ``visits`` days
need one more. A second simulation starts again from the app's clock, so its visits may
share days (and, rarely, sessions) with the first one's.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import numpy as np

from shoprank.data.synthetic import ShopSimulator
from shoprank.errors import ShopRankError
from shoprank.webui.client import ServeClient, ServeError

Progress = Callable[[int, int], None]

DAY_S = 86_400.0
PAGE_VIEW_GAP_S = 60.0
"""A visit's page views a minute apart: well within one session."""
FIRST_VISIT_AFTER_S = 3_600.0
"""The first day begins an hour after the app's clock: a shopper's first visit is a session apart from what they did
just before (the page, an earlier simulation of single visits)."""
LATEST_VISIT_S = DAY_S - 3_600.0
"""A day's visit starts before its last hour: the next day's visit of the same shopper is more than the report's
30-minute session gap after it, whatever their times of day."""


@dataclass
class Traffic:
    """What a simulation sent and what failed."""

    shoppers: int = 0
    """Distinct shoppers who visited."""
    visits: int = 0
    requests: int = 0
    events: int = 0
    errors: list[str] = field(default_factory=list)
    arms: Counter[str] = field(default_factory=Counter)
    """Variant -> distinct shoppers the router assigned to it (the variant their answers named)."""
    arm_of: dict[str, str] = field(default_factory=dict, repr=False)
    """Shopper -> the variant that answered their first visit."""

    def assigned(self, user_id: str, variant: str | None) -> None:
        """``user_id``'s visit was answered by ``variant`` (counted once per shopper)."""
        if variant is not None and user_id not in self.arm_of:
            self.arm_of[user_id] = variant
            self.arms[variant] += 1


def shopper(client: ServeClient, simulator: ShopSimulator, user_id: str, seed: int, k: int,
            search_fraction: float, at_s: float | None = None) -> tuple[int, int, str | None]:
    """One shopper's visit, at simulated time ``at_s`` (epoch seconds; None: the app's clock): (requests, events
    sent, the variant the router assigned them)."""
    rng = np.random.default_rng(seed)
    requests = events = 0
    variant = None
    for view in range(1 + min(int(rng.geometric(0.5)) - 1, 2)):
        ts = None if at_s is None else _iso(at_s + view * PAGE_VIEW_GAP_S)
        query = simulator.query_for(user_id, rng) if rng.random() < search_fraction else None
        answer = client.search(query, user_id, k, ts=ts) if query else client.recommend(user_id, k, ts=ts)
        requests += 1
        variant = answer["variant"]
        shown = [item["product_id"] for item in answer["items"]]
        outcome = simulator.respond(user_id, shown, rng, query)
        sent = [
            {"user_id": user_id, "product_id": product, "event_type": kind, "request_id": answer["request_id"],
             "variant": answer["variant"], "position": shown.index(product) + 1, "query": query,
             "session_id": f"sim-{seed}", **({} if ts is None else {"ts": ts})}
            for kind, products in (("click", outcome.clicked), ("add_to_cart", outcome.added_to_cart),
                                   ("purchase", outcome.purchased))
            for product in products
        ]
        if sent:
            client.events(sent)
            events += len(sent)
    return requests, events, variant


def _iso(epoch_s: float) -> str:
    return dt.datetime.fromtimestamp(epoch_s, dt.timezone.utc).isoformat()


def simulate(url: str, key: str, simulator: ShopSimulator, users: int, *, visits: int = 1, concurrency: int = 8,
             k: int = 10, search_fraction: float = 0.5, seed: int = 0, progress: Progress | None = None) -> Traffic:
    """Send ``users`` distinct simulated shoppers (drawn from the shop's users), each ``visits`` times a simulated
    day apart, through the API with ``key`` (a client key suffices), ``concurrency`` visits at a time; ``progress``
    hears (visits done, visits in all)."""
    pool = simulator.user_ids
    if not 1 <= users <= len(pool):
        raise ShopRankError(f"the simulated shop has {len(pool)} shoppers (source.synthetic.num_users); asked for "
                            f"{users}: ask for at most {len(pool)}, and more visits each")
    if visits < 1:
        raise ShopRankError(f"each shopper visits at least once; asked for {visits} visits")
    picks = np.random.default_rng(seed).choice(len(pool), size=users, replace=False)
    times = np.random.default_rng([seed, visits]).uniform(0.0, LATEST_VISIT_S, size=(visits, users))
    traffic = Traffic(shoppers=users)
    total = users * visits
    client = ServeClient(url, key, timeout_s=120.0)
    try:
        day_zero = float(client.health()["clock"]) + FIRST_VISIT_AFTER_S if visits > 1 else None
        with ThreadPoolExecutor(max_workers=concurrency) as workers:
            for day in range(visits):  # a day's visits all answered before the next day's begin
                futures = {workers.submit(shopper, client, simulator, pool[p], seed * 1_000_003 + day * users + i, k,
                                          search_fraction,
                                          None if day_zero is None else day_zero + day * DAY_S + times[day, i]): pool[p]
                           for i, p in enumerate(picks)}
                for future in as_completed(futures):
                    try:
                        requests, events, variant = future.result()
                        traffic.requests += requests
                        traffic.events += events
                        traffic.assigned(futures[future], variant)
                    except ServeError as exc:
                        traffic.errors.append(str(exc))
                    traffic.visits += 1
                    if progress is not None:
                        progress(traffic.visits, total)
    finally:
        client.close()
    return traffic
