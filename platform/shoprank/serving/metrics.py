"""The Serve app's metrics, through Ray's metrics: defined here, recorded by the app's replicas.

Each metric is a ``ray.serve.metrics`` object (``ray.util.metrics`` with the replica's
``deployment``, ``replica`` and ``application`` labels added), created in the replica that
records it, on first use. Ray's metrics agent on each node exports them on the node's metrics
export port, prefixed ``ray_``, beside Serve's own (``ray_serve_*``: requests, errors and
latency per route and per deployment, queues, replicas); Prometheus finds those ports in
Ray's service discovery file (``monitoring/prometheus.yml``). Ray sends a replica's values to
its agent every ``metrics_report_interval_ms`` (10 s), so a count is up to that late.

============================================  =========  ==============================  =================================
metric (as Prometheus names it)                type       labels                          what
============================================  =========  ==============================  =================================
``ray_shoprank_requests_total``                counter    endpoint, variant, status       HTTP requests the ingress answered;
                                                                                          ``status`` is the class (``2xx``,
                                                                                          ``4xx``, ``5xx``): errors are the
                                                                                          ``4xx`` and ``5xx`` ones
``ray_shoprank_request_seconds``               histogram  endpoint, variant               their latency, in the ingress
``ray_shoprank_assignments_total``             counter    variant                         answers whose variant the
                                                                                          experiment's hash chose (forced
                                                                                          ones left out): sample ratio
``ray_shoprank_split``                         gauge      variant                         each variant's configured share
                                                                                          (``serve.split``)
``ray_shoprank_impressions_total``             counter    variant                         products shown in answers
``ray_shoprank_explored_items_total``          counter    variant                         of those, the ones an exploration
                                                                                          slot placed (a live-added product
                                                                                          with little exposure); over
                                                                                          ``impressions``: the exploration
                                                                                          share
``ray_shoprank_impressions_dropped_total``     counter    (none)                          impressions dropped by a full
                                                                                          queue (``serve.impression_queue``)
``ray_shoprank_impressions_waiting``           gauge      (Serve's ``replica``)           impressions an ingress replica
                                                                                          holds, not yet in the store: a
                                                                                          replica that dies without a
                                                                                          graceful shutdown lost about its
                                                                                          series' last value
``ray_shoprank_events_total``                  counter    event_type, variant             events stored by ``/events``
                                                                                          (views, clicks, carts, purchases)
``ray_shoprank_revenue_total``                 counter    variant                         price sum of the stored purchases
``ray_shoprank_event_store_write_seconds``     histogram  operation                       one event-store transaction
                                                                                          (``events`` or ``impressions``)
``ray_shoprank_event_store_batch_rows``        histogram  operation                       rows in that transaction
``ray_shoprank_model_loaded``                  gauge      variant, ranker_run, strategy   1: the model a variant replica
                                                                                          serves (a replaced one's series
                                                                                          ends)
``ray_shoprank_model_trees``                   gauge      variant                         trees of that model (0: no ranker)
``ray_shoprank_catalogue_products``            gauge      variant (Serve's ``replica``)   products a variant replica's
                                                                                          catalogue lists (the run's, plus
                                                                                          puts, less deletes)
``ray_shoprank_catalogue_lag_seconds``         gauge      variant (Serve's ``replica``)   how long a catalogue change the
                                                                                          replica knows of has waited to be
                                                                                          applied (0: caught up)
``ray_shoprank_catalogue_changes_total``       counter    variant, op                     catalogue puts and deletes a
                                                                                          variant replica applied
============================================  =========  ==============================  =================================

Histograms come as ``_bucket`` (with ``le``), ``_sum`` and ``_count``. A gauge's value is set again
every :data:`GAUGE_REFRESH_S`: Ray exports only the values set since its last export and forgets a
series after two intervals without one, so a gauge set once (a model loaded at start) would vanish
20 s later. Every label has a
bounded set of values: ``endpoint`` is a route's template (``other`` for any path the app does
not serve), ``variant`` a configured variant (``none`` where no variant answered or the event
named none), ``event_type`` one of the seven kinds (``ALL_EVENT_TYPES``: the funnel's four and the three "not
interested"), ``op`` ``put`` or ``delete``; never a user id, a query or a raw path.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from starlette.routing import get_route_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoprank.experiment.guardrails import GuardrailWindow

if TYPE_CHECKING:  # the store's module is the writer's; ray.serve.metrics is imported where metrics are made
    from ray.serve.metrics import Counter, Gauge, Histogram

    from shoprank.store.events import EventStore, Impression

VARIANT_HEADER = "x-shoprank-variant"
"""The response header naming the variant that answered (set by the ingress, read by :class:`RequestMetrics`)."""
NO_VARIANT = "none"
OTHER_ENDPOINT = "other"
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
WRITE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS_ROWS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 20000)
GAUGE_REFRESH_S = 5.0
"""How often held gauge values are set again: well within Ray's 20 s (two export intervals) before it forgets one."""


@dataclass(frozen=True)
class _Metrics:
    requests: Counter
    request_seconds: Histogram
    assignments: Counter
    split: Gauge
    impressions: Counter
    explored_items: Counter
    impressions_dropped: Counter
    impressions_waiting: Gauge
    events: Counter
    revenue: Counter
    write_seconds: Histogram
    batch_rows: Histogram
    model_loaded: Gauge
    model_trees: Gauge
    catalogue_products: Gauge
    catalogue_lag: Gauge
    catalogue_changes: Counter


@functools.cache
def _metrics() -> _Metrics:
    """This process's metric objects, made on first use (in a replica, where Serve adds its labels), never at
    import."""
    from ray.serve.metrics import Counter, Gauge, Histogram

    return _Metrics(
        requests=Counter("shoprank_requests", "HTTP requests answered by the ingress, by status class.",
                         ("endpoint", "variant", "status")),
        request_seconds=Histogram("shoprank_request_seconds", "Latency of HTTP requests in the ingress (s).",
                                  LATENCY_BUCKETS_S, ("endpoint", "variant")),
        assignments=Counter("shoprank_assignments", "Answers assigned to a variant by the experiment's hash "
                                                    "(forced variants left out).", ("variant",)),
        split=Gauge("shoprank_split", "The configured share of each variant (serve.split).", ("variant",)),
        impressions=Counter("shoprank_impressions", "Products shown in answers.", ("variant",)),
        explored_items=Counter("shoprank_explored_items", "Products shown in answers by an exploration slot "
                                                          "(serve.explore).", ("variant",)),
        impressions_dropped=Counter("shoprank_impressions_dropped",
                                    "Impressions dropped before the event store (full queue)."),
        impressions_waiting=Gauge("shoprank_impressions_waiting",
                                  "Impressions this ingress replica holds, not yet written to the event store."),
        events=Counter("shoprank_events", "Events stored by /events.", ("event_type", "variant")),
        revenue=Counter("shoprank_revenue", "Price sum of the purchases stored by /events.", ("variant",)),
        write_seconds=Histogram("shoprank_event_store_write_seconds", "One event-store transaction (s).",
                                WRITE_BUCKETS_S, ("operation",)),
        batch_rows=Histogram("shoprank_event_store_batch_rows", "Rows written in one event-store transaction.",
                             BATCH_BUCKETS_ROWS, ("operation",)),
        model_loaded=Gauge("shoprank_model_loaded", "1: the ranker a variant replica serves.",
                           ("variant", "ranker_run", "strategy")),
        model_trees=Gauge("shoprank_model_trees", "Trees of the ranker a variant replica serves (0: no ranker).",
                          ("variant",)),
        catalogue_products=Gauge("shoprank_catalogue_products", "Products a variant replica's catalogue lists.",
                                 ("variant",)),
        catalogue_lag=Gauge("shoprank_catalogue_lag_seconds", "How long a catalogue change a variant replica knows "
                            "of has waited to be applied (s; 0: caught up).", ("variant",)),
        catalogue_changes=Counter("shoprank_catalogue_changes", "Catalogue puts and deletes a variant replica "
                                  "applied.", ("variant", "op")),
    )


class HeldGauges:
    """Gauge values this process holds, set again every ``every_s`` by a daemon thread (started with the first
    value) until they are let go."""

    def __init__(self, every_s: float = GAUGE_REFRESH_S) -> None:
        self.every_s = every_s
        self.values: dict[tuple[Gauge, tuple[tuple[str, str], ...]], float] = {}
        self.lock = threading.Lock()
        self.refresher: threading.Thread | None = None

    def hold(self, gauge: Gauge, value: float, tags: dict[str, str]) -> None:
        gauge.set(value, tags=tags)
        with self.lock:
            self.values[gauge, tuple(sorted(tags.items()))] = value
            if self.refresher is None:
                self.refresher = threading.Thread(target=self._refresh, daemon=True, name="metrics-gauges")
                self.refresher.start()

    def let_go(self, gauge: Gauge, tags: dict[str, str]) -> None:
        """Stop setting this series: Ray drops it from its export within 20 s."""
        with self.lock:
            self.values.pop((gauge, tuple(sorted(tags.items()))), None)

    def _refresh(self) -> None:
        while True:
            time.sleep(self.every_s)
            with self.lock:
                held = list(self.values.items())
            for (gauge, tags), value in held:
                gauge.set(value, tags=dict(tags))


@functools.cache
def _held() -> HeldGauges:
    return HeldGauges()


def endpoint_of(scope: Scope) -> str:
    """The route that served ``scope`` (its template, so a path parameter never becomes a label value), the path
    when it is one of the app's routes (a request refused before routing), else :data:`OTHER_ENDPOINT`."""
    route = scope.get("route")
    if route is not None and hasattr(route, "path"):
        return route.path
    path = get_route_path(scope)
    app = scope.get("app")
    known = {getattr(r, "path", None) for r in getattr(app, "routes", ())}
    return path if path in known else OTHER_ENDPOINT


class RequestMetrics:
    """ASGI middleware: every HTTP request counted and timed by endpoint, variant (:data:`VARIANT_HEADER` of the
    answer) and status class; an exception that escapes the app counts as the 5xx it becomes. The answers of a
    variant also go to ``guardrails``, the window of the A/B guardrails that the app's report reads."""

    def __init__(self, app: ASGIApp, guardrails: GuardrailWindow) -> None:
        self.app = app
        self.guardrails = guardrails

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status, variant = 500, NO_VARIANT

        async def observed(message: Message) -> None:
            nonlocal status, variant
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = dict(message.get("headers") or ())
                variant = headers.get(VARIANT_HEADER.encode(), NO_VARIANT.encode()).decode()
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            seconds = time.perf_counter() - started
            tags = {"endpoint": endpoint_of(scope), "variant": variant}
            metrics = _metrics()
            metrics.requests.inc(tags={**tags, "status": f"{status // 100}xx"})
            metrics.request_seconds.observe(seconds, tags=tags)
            if tags["endpoint"] in ANSWERING_ENDPOINTS and variant != NO_VARIANT:
                self.guardrails.observe(variant, seconds, status >= 500)


ANSWERING_ENDPOINTS = ("/search", "/recommend")
"""The endpoints whose latency and errors the A/B guardrails read (an answer of a variant)."""


def record_split(split: dict[str, float]) -> None:
    """The experiment's configured shares: what the sample-ratio check compares the assignments with."""
    for variant, share in split.items():
        _held().hold(_metrics().split, share, {"variant": variant})


def record_answer(variant: str, forced: bool, shown: int) -> None:
    """An answer of ``variant`` showing ``shown`` products; an assignment unless the request ``forced`` it."""
    metrics = _metrics()
    if not forced:
        metrics.assignments.inc(tags={"variant": variant})
    if shown:
        metrics.impressions.inc(shown, tags={"variant": variant})


def record_explored(variant: str, explored: int) -> None:
    """``explored`` of an answer's products were placed by exploration slots (``Ranked.explored``): with the
    impressions, the share of what shoppers see that is exploration, which the slots bound."""
    if explored:
        _metrics().explored_items.inc(explored, tags={"variant": variant})


def record_dropped(count: int) -> None:
    """``count`` impressions dropped by a full queue (:class:`~shoprank.serving.impressions.ImpressionQueue`)."""
    if count:
        _metrics().impressions_dropped.inc(count)


def record_waiting(count: int) -> None:
    """The impressions this replica's queue holds now: a held gauge, so the last value before a crash stays visible
    (Prometheus keeps it after the replica's series ends) as the impressions that crash lost."""
    _held().hold(_metrics().impressions_waiting, count, {})


def record_events(events: Sequence[dict[str, Any]], prices: dict[str, float]) -> None:
    """Events the store committed, by kind and variant, and the revenue of their purchases (price x quantity)."""
    metrics = _metrics()
    counts: dict[tuple[str, str], int] = {}
    revenue: dict[str, float] = {}
    for event in events:
        variant = event.get("variant") or NO_VARIANT
        counts[event["event_type"], variant] = counts.get((event["event_type"], variant), 0) + 1
        if event["event_type"] == "purchase":
            revenue[variant] = (revenue.get(variant, 0.0)
                                + prices.get(event["product_id"], 0.0) * (event.get("quantity") or 1))
    for (event_type, variant), count in counts.items():
        metrics.events.inc(count, tags={"event_type": event_type, "variant": variant})
    for variant, amount in revenue.items():
        if amount > 0:
            metrics.revenue.inc(amount, tags={"variant": variant})


def record_model(variant: str, replaced: dict[str, Any], loaded: dict[str, Any]) -> None:
    """A variant replica now serves ``loaded`` (``ranker_run``, ``strategy``, ``trees``) instead of ``replaced``
    (empty at its start)."""
    metrics, held = _metrics(), _held()
    if replaced:
        held.let_go(metrics.model_loaded, {"variant": variant, "ranker_run": replaced["ranker_run"],
                                           "strategy": replaced["strategy"]})
    held.hold(metrics.model_loaded, 1, {"variant": variant, "ranker_run": loaded["ranker_run"],
                                        "strategy": loaded["strategy"]})
    held.hold(metrics.model_trees, loaded["trees"], {"variant": variant})


def record_catalogue(variant: str, products: int, lag_s: float) -> None:
    """A variant replica's catalogue size and change-log lag (:mod:`shoprank.serving.catalogue_state`)."""
    metrics, held = _metrics(), _held()
    held.hold(metrics.catalogue_products, products, {"variant": variant})
    held.hold(metrics.catalogue_lag, lag_s, {"variant": variant})


def record_catalogue_changes(variant: str, applied: dict[str, int]) -> None:
    """Catalogue puts and deletes (``applied``: op -> count) a variant replica applied."""
    for op, count in applied.items():
        if count:
            _metrics().catalogue_changes.inc(count, tags={"variant": variant, "op": op})


class MeteredEventStore:
    """An event store whose writes are timed and counted, one observation per transaction; everything else goes to
    the store as it is."""

    def __init__(self, store: EventStore) -> None:
        self.store = store

    def append(self, events: Sequence[dict]) -> int:
        with self._transaction("events", len(events)):
            return self.store.append(events)

    def log_impressions(self, impressions: Sequence[Impression], dropped: int = 0, batch_id: str | None = None) -> bool:
        with self._transaction("impressions", len(impressions)):
            return self.store.log_impressions(impressions, dropped, batch_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    @contextmanager
    def _transaction(self, operation: str, rows: int) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            metrics, tags = _metrics(), {"operation": operation}
            metrics.write_seconds.observe(time.perf_counter() - started, tags=tags)
            metrics.batch_rows.observe(rows, tags=tags)


def metered(store: EventStore) -> EventStore:
    """``store`` with its writes measured (:class:`MeteredEventStore`), for the event store's writer."""
    return cast("EventStore", MeteredEventStore(store))
