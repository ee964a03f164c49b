"""Ray Serve deployments shared by both variants, and the HTTP ingress.

A search or recommendation has two hops behind Serve's HTTP proxy: the ingress, then the
variant's replica (:mod:`shoprank.serving.variant_deployments`, which loads the models and
reads the users' live events from its own cache of the event store).

* :class:`EventStoreWriter` owns the event store (SQLite or PostgreSQL); concurrent ``/events``
  requests are written in one transaction (``@serve.batch``), falling back to one
  transaction per request when a batch fails, so each request stays all or nothing;
  the ingress replicas' impressions arrive in batches, off the answers' path;
* :class:`Ingress` (FastAPI) validates, routes to a variant (salted hash or forced),
  asks it, queues the answer's impressions (:mod:`shoprank.serving.impressions`) and answers.

None of them loads a model, so this module imports neither PyTorch nor the ranker: each of
these replicas starts in about a second of imports instead of ten.
Nothing here runs at import; :func:`shoprank.serving.app.build_app` binds the graph.
This module has no ``from __future__ import annotations``: FastAPI reads the ingress
routes' signatures at runtime and would take string annotations for query parameters.
"""

import asyncio
import contextlib
import datetime as dt
import logging
import math
import pathlib
import sqlite3
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response, Security
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from shoprank.cluster import replica_grpc_on_loopback
from shoprank.config import Config
from shoprank.data.io import read_table
from shoprank.errors import ConfigError, DataError, ShopRankError
from shoprank.experiment.assignment import assign
from shoprank.experiment.guardrails import GuardrailLimits, GuardrailWindow, with_guardrails
from shoprank.experiment.report import ab_report
from shoprank.experiment.report_model import ABReport
from shoprank.privacy import serving_pseudonyms
from shoprank.recsys.features import epoch_seconds
from shoprank.serving.api import (
    FAILURES, Answer, BodyLimit, Erased, EventBatch, EventsAccepted, Health, RecommendRequest, Restored,
    RestoreRequest, SearchRequest, UserSummary, Variants, check_text, invalid, problem, refusals, rejected,
)
from shoprank.serving.impressions import ImpressionQueue
from shoprank.serving.keys import KeyRing, Role, allows, load_keyring
from shoprank.recsys.messages import Answered, Asked
from shoprank.serving.metrics import (
    VARIANT_HEADER, Guardrails, RequestMetrics, endpoint_of, metered, record_answer, record_dropped, record_events,
    record_split, record_waiting,
)
from shoprank.serving.variants import VariantSpec, offline_figures
from shoprank.store.events import (
    EventStore, Impression, StoreBusy, checked_backup, is_server_database, open_event_writer, redacted, restore_sqlite,
)
from shoprank.store.run import Run

log = logging.getLogger(__name__)

SHOWN_MEMORY = 100_000
"""Answers an ingress replica remembers (request id -> user and products shown) to check the engagements that name
them without a query; older ones are looked up in the store's impressions."""


@serve.deployment
class EventStoreWriter:
    """The event store's writer (the one owner of an SQLite file, holding its writer lock); concurrent writes share a
    transaction. A restore (:meth:`restore`) pauses it: the calls it is serving finish, new ones are refused with
    :class:`StoreBusy` (a 503 with Retry-After at the ingress) until the backup is in place and the store reopened,
    so no request is answered 200 for a write the restore then loses."""

    def __init__(self, location: str) -> None:
        replica_grpc_on_loopback()
        self.location = location
        self.store = metered(open_event_writer(location))
        self.restoring = False
        self.in_use = 0
        self.idle = asyncio.Event()
        """Set while no call uses the store: what a restore waits for after it stops new calls."""
        self.idle.set()

    def reconfigure(self, settings: dict[str, Any]) -> None:
        self.append.set_max_batch_size(settings["batch_size"])

    @contextlib.asynccontextmanager
    async def _using(self) -> AsyncIterator[EventStore]:
        """The store for one call, or :class:`StoreBusy` while a restore is under way."""
        if self.restoring:
            raise StoreBusy("the event store is being restored from a backup")
        self.in_use += 1
        self.idle.clear()
        try:
            yield self.store
        finally:
            self.in_use -= 1
            if not self.in_use:
                self.idle.set()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def append(self, batches: list[list[dict]]) -> list[int | str]:
        """Per request: how many were stored, or why none were (each request all or nothing)."""
        async with self._using() as store:
            return await asyncio.to_thread(self._append, store, batches)

    @staticmethod
    def _append(store: EventStore, batches: list[list[dict]]) -> list[int | str]:
        if len(batches) > 1:
            try:
                store.append([event for batch in batches for event in batch])
                return [len(batch) for batch in batches]
            except DataError:
                pass  # one request's events are at fault: store each request alone
        results: list[int | str] = []
        for batch in batches:
            try:
                results.append(store.append(batch))
            except DataError as exc:
                results.append(str(exc))
        return results

    async def log_impressions(self, impressions: list[Impression], dropped: int, batch_id: str) -> bool:
        """An ingress replica's queued impressions, already batched (:class:`ImpressionQueue`); False when the store
        had this batch already (a retry after a lost answer)."""
        async with self._using() as store:
            return await asyncio.to_thread(store.log_impressions, impressions, dropped, batch_id)

    async def restore(self, backup: str, replace: bool) -> int | str:
        """Put an SQLite backup in place of the store (:func:`restore_sqlite`): the events it holds, or why nothing
        was restored. Calls already using the store finish first; new ones are refused until the store is open again."""
        if is_server_database(self.location):
            return (f"serve.event_db is a PostgreSQL server ({redacted(self.location)}): restore it with its own "
                    "tools (pg_restore, or your managed service's snapshots)")
        if self.restoring:
            return "a restore is already under way"
        try:
            await asyncio.to_thread(checked_backup, pathlib.Path(backup))  # a wrong file never pauses the writer
        except DataError as exc:
            return str(exc)
        self.restoring = True
        try:
            await self.idle.wait()
            return await asyncio.to_thread(self._restore, backup, replace)
        finally:
            self.restoring = False

    def _restore(self, backup: str, replace: bool) -> int | str:
        self.store.close()  # lets go of the writer lock, which the restore takes
        try:
            return restore_sqlite(backup, self.location, replace=replace)
        except ShopRankError as exc:
            return str(exc)
        finally:
            self.store = metered(open_event_writer(self.location))

    async def report(self, split: dict[str, float], prices: dict[str, float]) -> dict[str, Any]:
        async with self._using() as store:
            report = await asyncio.to_thread(ab_report, store, split, prices=prices)
            report["impressions_dropped"] = await asyncio.to_thread(store.dropped_impressions)
        return report

    async def erase(self, user: str, at: dt.datetime) -> dict[str, int]:
        async with self._using() as store:
            return await asyncio.to_thread(store.erase, user, at)

    async def erasures(self, after: int) -> list[tuple[int, str]]:
        return await asyncio.to_thread(self.store.erasures, after)

    async def purge(self, before: dt.datetime) -> dict[str, int]:
        async with self._using() as store:
            return await asyncio.to_thread(store.purge, before)

    async def shown(self, request_id: str) -> tuple[str, set[str]] | None:
        async with self._using() as store:
            return await asyncio.to_thread(store.shown, request_id)

    async def export(self, path: str) -> int:
        async with self._using() as store:
            return await asyncio.to_thread(store.export_parquet, path)

    async def counts(self) -> dict[str, int]:
        async with self._using() as store:
            events = await asyncio.to_thread(store.events)
            return {"events": events.num_rows, "impressions": len(await asyncio.to_thread(store.impressions))}


def user_summaries(table: pa.Table, products: dict[str, dict[str, Any]], recent: int = 20) -> list[dict[str, str]]:
    """Users by activity, each with "N events; mostly <category>; last: <event> <title>"."""
    events = table.to_pandas().sort_values(["user_id", "ts"], kind="stable")
    out = []
    for user, rows in sorted(events.groupby("user_id"), key=lambda kv: -len(kv[1])):
        tail = rows.tail(recent)
        categories = [products[p]["category"] for p in tail["product_id"] if p in products]
        favourite = max(set(categories), key=categories.count) if categories else "-"
        engaged = rows[rows["event_type"] != "view"].tail(1)
        last = (f"; last: {engaged['event_type'].iat[0]} {products[engaged['product_id'].iat[0]]['title']}"
                if len(engaged) and engaged["product_id"].iat[0] in products else "")
        out.append({"user_id": user, "summary": f"{len(rows)} events; mostly {favourite}{last}"})
    return out


class Access:
    """What the module-level parts of the HTTP app (its dependencies, middleware and exception handlers) need of
    the config, set by the ingress replica when it starts, before its first request.

    Class attributes, not a module-level instance: Serve pickles the ingress class and its FastAPI app by value,
    and a by-value function gets copies of the module globals it names, while an importable class travels by
    reference, so this class is the one object that the replica's code and the app's code both see.
    """

    keys = KeyRing(())
    docs = False
    retry_after_s = 1.0


DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


def needs(role: Role) -> Any:
    """A route dependency: 401 without a known key (``Authorization: Bearer`` or ``X-API-Key``), 403 when the key's
    role may not call the route (:mod:`shoprank.serving.keys`).

    The two ways of sending a key are FastAPI security schemes named after the role (``clientKey``,
    ``clientKeyHeader``, ``adminKey``...), so the OpenAPI schema says which endpoints need a key and of which
    role: the docs page can send one, and a client (or the contract test) picks the right one.
    """
    bearer = HTTPBearer(scheme_name=f"{role}Key", auto_error=False,
                        description=f"A key of role {role}: `Authorization: Bearer <key>`.")
    header = APIKeyHeader(name="X-API-Key", scheme_name=f"{role}KeyHeader", auto_error=False,
                          description=f"A key of role {role}, in the `X-API-Key` header.")

    async def check(sent_bearer: HTTPAuthorizationCredentials | None = Security(bearer),
                    sent_header: str | None = Security(header)) -> None:
        held = Access.keys.role_of(sent_bearer.credentials if sent_bearer is not None else sent_header)
        if held is None:
            raise HTTPException(status_code=401, headers={"WWW-Authenticate": "Bearer"}, detail=[problem(
                ["header", "authorization"],
                "no API key, or an unknown one: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                "unauthorized")])
        if not allows(held, role):
            raise HTTPException(status_code=403, detail=[problem(
                ["header", "authorization"], f"a {held} key may not call this endpoint: it needs {role}", "forbidden")])

    return Depends(check)


class DocsSwitch:
    """ASGI middleware: ``/docs`` and ``/openapi.json`` answer 404 unless ``serve.docs``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not Access.docs:
            path, root = scope["path"], scope.get("root_path", "")
            if (path[len(root):] if root and path.startswith(root) else path) in DOCS_PATHS:
                await JSONResponse(status_code=404, content={"detail": "API docs are off (serve.docs)"})(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


api = FastAPI(title="shoprank", description="Search, recommendations, events and the A/B report of the shop. "
                                            "Every endpoint but /healthz needs an API key (Authorization: Bearer).",
              responses=FAILURES)
api.add_middleware(BodyLimit)
api.add_middleware(DocsSwitch)
api.add_middleware(RequestMetrics)  # the outermost: it sees the refusals of the others too


@api.exception_handler(RequestValidationError)
async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each field and why; FastAPI's own answer echoes the input and fails (a 5xx) on one that JSON
    cannot carry."""
    return JSONResponse(status_code=422, content=invalid(exc.errors()))


@api.exception_handler(StarletteHTTPException)
async def refused(request: Request, exc: StarletteHTTPException) -> Response:
    """An HTTP exception as FastAPI answers it, except a body that could not be parsed at all (not UTF-8 text, or
    nested deeper than the parser goes): FastAPI answers that with a 400 of another shape, but it is malformed JSON
    like any other, so it is a 422 naming the body."""
    if exc.status_code == 400 and isinstance(exc.__cause__, (ValueError, RecursionError)):
        return JSONResponse(status_code=422, content={"detail": [problem(
            ["body"], f"the body is not JSON text ({type(exc.__cause__).__name__}): send UTF-8 JSON", "json_invalid")]})
    return await http_exception_handler(request, exc)


def unavailable(exc: BaseException) -> str | None:
    """Why ``exc`` means the service cannot answer now (a replica or the database gone), or None: then it is a bug.
    (Overload never gets here: Serve answers a full queue itself, 503 with the deployment's Retry-After.)"""
    if isinstance(exc, (DeploymentUnavailableError, RayActorError)):
        return "a part of the service is restarting"
    cause = exc.cause if isinstance(exc, RayTaskError) else exc
    if isinstance(cause, StoreBusy):
        return "the event store is being restored"
    if isinstance(cause, sqlite3.OperationalError) or type(cause).__module__.startswith("psycopg"):
        return "the event store cannot be reached"
    return None


@api.exception_handler(Exception)
async def unexpected(request: Request, exc: Exception) -> JSONResponse:
    """503 with Retry-After when the service cannot answer now (:func:`unavailable`); else a bug: 500 with an error
    id that the log names beside the stack trace, which the client never sees. The log names the route's template
    (``/users/{user_id}``), never the path, which may hold a raw user id."""
    reason = unavailable(exc)
    if reason is not None:
        log.warning("%s %s: 503, %s (%s)", request.method, endpoint_of(request.scope), reason, type(exc).__name__)
        return JSONResponse(status_code=503, content={"detail": f"{reason}; retry shortly"},
                            headers={"Retry-After": str(math.ceil(Access.retry_after_s))})
    error_id = uuid.uuid4().hex
    log.error("%s %s: 500, error %s", request.method, endpoint_of(request.scope), error_id, exc_info=exc)
    return JSONResponse(status_code=500, content={"detail": f"internal error {error_id}: the app's log has it"})


@serve.deployment
@serve.ingress(api)
class Ingress:
    """The HTTP API (see :mod:`shoprank.serving.api` and DESIGN.md)."""

    def __init__(self, config: dict[str, Any], variants: dict[str, DeploymentHandle],
                 store: DeploymentHandle) -> None:
        replica_grpc_on_loopback()
        self.config = Config.model_validate(config)
        keys = load_keyring(self.config)
        if not keys.entries:
            raise ConfigError(f"no API keys: serve.api_keys ({self.config.serve.api_keys} under run.root) is missing "
                              "and SHOPRANK_API_KEYS is empty; create them with `shoprank keys create`")
        BodyLimit.max_bytes = self.config.serve.max_body_bytes
        Guardrails.window = GuardrailWindow(self.config.serve.guardrail_window)
        Access.keys, Access.docs, Access.retry_after_s = keys, self.config.serve.docs, self.config.serve.retry_after_s
        self.handles = variants
        self.store = store
        self.pseudonyms = serving_pseudonyms(self.config)
        """Every user id of a request is replaced by its pseudonym first: nothing past this point sees the id. The
        run root's key, never one made here; :meth:`reconfigure` checks it is the one the variants' runs recorded."""
        self.impressions = ImpressionQueue(self.store.log_impressions.remote, self.config.serve.impression_queue,
                                           on_drop=record_dropped, on_waiting=record_waiting)
        record_split(self.config.serve.split)
        self.shown: OrderedDict[str, tuple[str, frozenset[str]]] = OrderedDict()
        self.background: list[asyncio.Task] = []
        self.specs: dict[str, VariantSpec] = {}
        self.offline: dict[str, dict[str, Any]] = {}
        """Each variant's offline figures (its run's evaluation), shown beside the online ones."""
        self.products: dict[str, dict[str, Any]] = {}
        self.prices: dict[str, float] = {}
        """Product -> price: the A/B report's revenue."""
        self.clock_offset_s = 0.0
        self.users: list[dict[str, str]] = []
        self.run_events_of: Counter[str] = Counter()
        """User -> their events in the served runs' history: what an erasure masks on the variants."""
        self.erasure_cursor = 0
        """The last tombstone whose user left ``users`` and ``run_events_of``."""
        self.without_behaviour: set[str] = set()
        """Runs with no behaviour events (judged queries only): nothing there is popular or personal."""

    def reconfigure(self, settings: dict[str, Any]) -> None:
        """The variants (from the registry, at deploy time): their products and the serving clock."""
        self.specs = {name: VariantSpec.model_validate(spec) for name, spec in settings["variants"].items()}
        self.pseudonyms = serving_pseudonyms(self.config, [spec.run for spec in self.specs.values()])
        self.offline = {name: offline_figures(spec) for name, spec in self.specs.items()}
        last_event_s = 0.0
        events_of_run = {}
        self.run_events_of = Counter()
        for run_uri in sorted({spec.run for spec in self.specs.values()}):
            run = Run.from_uri(run_uri)
            products = read_table(run, "data", "products", columns=["product_id", "title", "category", "brand", "price"])
            for row in products.to_pylist():
                self.products[row["product_id"]] = row
                self.prices[row["product_id"]] = row["price"]
            events = read_table(run, "data", "events", columns=["user_id", "product_id", "event_type", "ts"])
            ts = epoch_seconds(events.column("ts"))
            last_event_s = max(last_event_s, float(ts.max()) if len(ts) else 0.0)
            events_of_run[run_uri] = events
            if events.num_rows == 0:
                self.without_behaviour.add(run_uri)
            for counted in pc.value_counts(events.column("user_id")).to_pylist():
                self.run_events_of[counted["values"]] += counted["counts"]
        self.users = user_summaries(events_of_run[self.specs[sorted(self.specs)[-1]].run], self.products)
        self.erasure_cursor = 0  # the lists are the run's again: every erasure so far leaves them at the next read
        if self.config.serve.clock == "data" and last_event_s:
            # from the deploy's moment, not this replica's start: every ingress replica (a restarted one too) keeps
            # the same clock, so impressions and erasures stamped by different replicas compare in time order
            self.clock_offset_s = settings["deployed_at_s"] - (last_event_s + 60.0)

    def now_s(self) -> float:
        return time.time() - self.clock_offset_s

    def _start_background(self) -> None:
        """The impressions' flusher and the retention purge, started on the replica's event loop by its first
        request."""
        if not self.background:
            self.background = [asyncio.create_task(self.impressions.run(self.config.serve.impression_flush_s)),
                               asyncio.create_task(self._purge_every(self.config.serve.purge_interval_s))]

    async def _purge_every(self, interval_s: float) -> None:
        """Delete what is older than ``serve.retention_days`` now, then every ``interval_s``."""
        while True:
            before = dt.datetime.fromtimestamp(self.now_s() - self.config.serve.retention_days * 86_400,
                                               dt.timezone.utc)
            try:
                purged = await self.store.purge.remote(before)
                if any(purged.values()):
                    log.info("retention: purged %s dated before %s", purged, before.isoformat(timespec="seconds"))
            except Exception:
                log.exception("retention purge failed; retrying in %.0f s", interval_s)
            await asyncio.sleep(interval_s)

    # ------------------------------------------------------------------ answers

    def _variant(self, forced: str | None, user_id: str | None, request_id: str) -> str:
        if forced is not None:
            if forced not in self.specs:
                raise rejected(["variant"], f"unknown variant {forced!r}; known: {', '.join(sorted(self.specs))}")
            return forced
        return assign(user_id or request_id, self.config.serve.experiment, self.config.serve.split)

    async def _answer(self, kind: str, user_id: str | None, query: str | None, k: int, forced: str | None,
                      response: Response) -> Answer:
        self._start_background()
        request_id = uuid.uuid4().hex
        user_id = self.pseudonyms.of(user_id) if user_id else None
        variant = self._variant(forced, user_id, request_id)
        now = self.now_s()
        answered: Answered = await self.handles[variant].answer.remote(Asked(user_id, [], query, k, now))
        ranked = answered.items
        shown_at = dt.datetime.fromtimestamp(now, dt.timezone.utc)
        self.impressions.put([
            Impression(request_id, user_id or "anonymous", variant, r.product_id, i + 1, shown_at, forced is not None)
            for i, r in enumerate(ranked)
        ])
        self.shown[request_id] = (user_id or "anonymous", frozenset(r.product_id for r in ranked))
        if len(self.shown) > SHOWN_MEMORY:
            self.shown.popitem(last=False)
        response.headers["x-shoprank-replica"] = answered.replica
        response.headers[VARIANT_HEADER] = variant
        record_answer(variant, forced is not None, len(ranked))
        items = [{"rank": i + 1, **self.products[r.product_id], "score": r.score, "contributions": r.contributions}
                 for i, r in enumerate(ranked)]
        return Answer(request_id=request_id, variant=variant, forced=forced is not None, kind=kind, items=items,
                      note=self._note(kind, self.specs[variant].run, answered.history_events))

    def _note(self, kind: str, run_uri: str, history_events: int) -> str | None:
        """Why a recommendation is not personal, when it is not."""
        if kind != "recommend" or history_events:
            return None
        if run_uri in self.without_behaviour:
            return ("this run has no behaviour events (judged queries only): popular products, by how many "
                    "queries judged them relevant")
        return "no history for this user: popular and trending products"

    @api.post("/search", response_model=Answer, dependencies=[needs("client")], responses=refusals(401, 403, 422))
    async def search(self, body: SearchRequest, response: Response) -> Answer:
        if len(body.query) > self.config.serve.max_query_chars:
            raise rejected(["query"], f"query is {len(body.query)} characters; at most "
                                      f"{self.config.serve.max_query_chars} (serve.max_query_chars)")
        return await self._answer("search", body.user_id, body.query, body.k, body.variant, response)

    @api.post("/recommend", response_model=Answer, dependencies=[needs("client")],
              responses=refusals(401, 403, 422))
    async def recommend(self, body: RecommendRequest, response: Response) -> Answer:
        return await self._answer("recommend", body.user_id, None, body.k, body.variant, response)

    # ------------------------------------------------------------------ events

    @api.post("/events", response_model=EventsAccepted, dependencies=[needs("client")],
              responses=refusals(401, 403, 409, 422))
    async def events(self, body: EventBatch) -> EventsAccepted:
        self._start_background()
        now = self.now_s()
        oldest = now - self.config.serve.retention_days * 86_400
        rows = []
        for i, event in enumerate(body):
            user = self.pseudonyms.of(event.user_id)
            if event.product_id not in self.products:
                raise rejected([i, "product_id"], f"unknown product {event.product_id!r}; nothing of this request "
                                                  "was stored")
            if event.variant is not None and event.variant not in self.specs:
                raise rejected([i, "variant"], f"unknown variant {event.variant!r}; nothing of this request was stored")
            ts = event.ts or dt.datetime.fromtimestamp(now, dt.timezone.utc)
            if ts.tzinfo is None:
                ts = ts.replace(tzinfo=dt.timezone.utc)
            if ts.timestamp() > now + self.config.serve.clock_skew_s:
                served = dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat(timespec="seconds")
                raise rejected([i, "ts"], f"{ts.isoformat()} is later than the app's clock ({served}, serve.clock="
                                          f"{self.config.serve.clock}) by more than serve.clock_skew_s "
                                          f"({self.config.serve.clock_skew_s:g} s); nothing of this request was stored")
            if ts.timestamp() < oldest:
                raise rejected([i, "ts"], f"{ts.isoformat()} is older than serve.retention_days "
                                          f"({self.config.serve.retention_days:g}); nothing of this request was stored")
            if (event.request_id is not None and event.event_type != "view"
                    and self.config.serve.unattributed == "reject"):
                why = await self._unattributed(user, event.request_id, event.product_id)
                if why is not None:
                    raise rejected([i, "request_id"], f"{why} (serve.unattributed=reject); nothing of this request "
                                                      "was stored")
            rows.append({
                **event.model_dump(), "user_id": user, "ts": ts, "event_id": event.event_id or uuid.uuid4().hex,
                "session_id": event.session_id or f"live-{user}",
            })
        outcome = await self.store.append.remote(rows)
        if isinstance(outcome, str):
            raise (rejected([], outcome, status=409, error_type="conflict") if "already stored" in outcome
                   else rejected([], outcome))
        record_events(rows, self.prices)
        return EventsAccepted(stored=outcome, event_ids=[r["event_id"] for r in rows])

    async def _unattributed(self, user: str, request_id: str, product_id: str) -> str | None:
        """Why an engagement naming ``request_id`` is not with a product that answer showed to ``user``, or None.

        The answer is looked up in this replica's memory, else in the store's impressions (this replica's queue
        flushed first); one not found there may still wait in another ingress replica's queue, which flushes
        within ``serve.impression_flush_s``: so it is looked up once more after that long.
        """
        shown = self.shown.get(request_id)
        if shown is None:
            await self.impressions.flush()
            shown = await self.store.shown.remote(request_id)
            if shown is None:
                await asyncio.sleep(self.config.serve.impression_flush_s)
                shown = await self.store.shown.remote(request_id)
            if shown is None:
                return f"request_id {request_id!r} names no answer of this app"
            self.shown[request_id] = shown = (shown[0], frozenset(shown[1]))
        owner, products = shown
        if owner != user:
            return f"answer {request_id!r} was not shown to this user"
        if product_id not in products:
            return f"answer {request_id!r} did not show product {product_id!r}"
        return None

    # ------------------------------------------------------------------ state

    @api.get("/ab/report", response_model=ABReport, response_model_exclude_unset=True,
             dependencies=[needs("admin")], responses=refusals(401, 403))
    async def ab_report(self) -> dict[str, Any]:
        await self.impressions.flush()  # this replica's answers so far are in the report
        report = await self.store.report.remote(self.config.serve.split, self.prices)
        report["experiment"] = self.config.serve.experiment
        report["offline"] = self.offline
        settings = self.config.serve
        report["guardrails"] = Guardrails.window.figures(GuardrailLimits(
            settings.guardrail_p99_ms, settings.guardrail_error_rate, settings.guardrail_min_requests))
        user_level = report["user_level"]
        if user_level.get("verdict"):
            user_level["verdict"] = with_guardrails(user_level["verdict"], report["guardrails"])
        return report

    @api.get("/variants", response_model=Variants, dependencies=[needs("admin")], responses=refusals(401, 403))
    async def variants(self) -> dict[str, Any]:
        models = {name: await handle.describe.remote() for name, handle in self.handles.items()}
        return {
            "experiment": self.config.serve.experiment, "split": self.config.serve.split,
            "variants": {name: {**spec.model_dump(), "model": models.get(name)} for name, spec in self.specs.items()},
        }

    @api.get("/users", response_model=list[UserSummary], dependencies=[needs("admin")],
             responses=refusals(401, 403, 422))
    async def users(self, limit: int = Query(200, ge=1, le=5000)) -> list[dict[str, str]]:
        """The most active known users, each with a one-line summary of their history (for pickers); none erased."""
        await self._forget_erased()
        return self.users[:limit]

    async def _forget_erased(self) -> None:
        """Drop the users erased since the last read from what this replica lists: the store's tombstones, so an
        erasure answered by any ingress replica reaches every one."""
        erased: set[str] = set()
        for self.erasure_cursor, user in await self.store.erasures.remote(self.erasure_cursor):
            erased.add(user)
            self.run_events_of.pop(user, None)
        if erased:
            self.users = [u for u in self.users if u["user_id"] not in erased]

    @api.delete("/users/{user_id}", response_model=Erased, dependencies=[needs("admin")],
                responses=refusals(401, 403, 422))
    async def erase_user(self, user_id: str = Path(min_length=1, max_length=128)) -> Erased:
        """Erase a shopper (their id or pseudonym): every event and impression in the store; on every variant
        replica, their cached events and their history in the run (each reads the store's tombstone before its next
        answer), so they are a new shopper there; from ``/users``; and, through the tombstone, from the next
        pipeline run's tables. How many rows went where."""
        try:
            check_text(user_id)
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=[problem(["path", "user_id"], str(exc))]) from None
        user = self.pseudonyms.of(user_id)
        await self.impressions.flush()  # the user's queued impressions are in the store, then erased with the rest
        for request_id in [r for r, (owner, _) in self.shown.items() if owner == user]:
            del self.shown[request_id]
        await self._forget_erased()  # a user erased before has no run history left to mask
        run_events = self.run_events_of.get(user, 0)
        # on the app's clock, the one its impressions carry: what another ingress replica still queues is dropped
        erased = await self.store.erase.remote(user, dt.datetime.fromtimestamp(self.now_s(), dt.timezone.utc))
        await self._forget_erased()
        log.info("erased user %s: %s, %d events of the run's history masked", user, erased, run_events)
        return Erased(user=user, **erased, run_events=run_events, excluded_from_next_ingest=True)

    @api.post("/admin/events/restore", response_model=Restored, dependencies=[needs("admin")],
              responses=refusals(401, 403, 422))
    async def restore_events(self, body: RestoreRequest) -> Restored:
        """Restore the SQLite event store from a backup on the writer's host, without stopping the app: the writer
        finishes what it is writing, answers 503 (Retry-After) meanwhile, restores and goes on. The variants' user
        caches read on from their cursors (numbering continues after the replaced store's); users they hold keep
        the events they had read that the backup lacks until they leave the cache or the app is redeployed."""
        restored = await self.store.restore.remote(body.backup, body.replace)
        if isinstance(restored, str):
            raise rejected(["backup"], restored)
        log.info("event store restored from a backup: %d events", restored)
        return Restored(events=restored, backup=body.backup)

    @api.get("/healthz", response_model=Health)
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "variants": sorted(self.specs), "clock": self.now_s(),
                "impressions": self.impressions.summary()}

    async def __del__(self) -> None:
        """On a graceful shutdown, the queued impressions go to the store first (Serve awaits this)."""
        for task in self.background:
            task.cancel()
        try:
            await self.impressions.flush()
        except Exception:
            log.exception("%d impressions could not be written at shutdown", self.impressions.held)
