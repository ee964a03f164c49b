"""The HTTP API of the ingress: one FastAPI app per ingress replica, its routes in routers by concern.

* ``answer_routes``: ``/search`` and ``/recommend`` (validate, route to a variant, ask it, queue the impressions),
  and ``/categorize`` (a listing's likely categories, from the variant ``serve.categorize_variant`` names);
* ``event_routes``: ``/events`` (validated, pseudonymised, written by the event store's writer);
* ``experiment_routes``: ``/ab/report`` and ``/variants``;
* ``user_routes``: ``/users`` (the pickers' list) and ``DELETE /users/{user_id}`` (erasure);
* ``catalogue_routes``: ``PUT /products`` and ``DELETE /products/{product_id}`` (the catalogue change log);
* ``admin_routes``: ``/admin/events/restore`` and ``/healthz``.

:func:`http_api` builds the app and its middleware from ``serve`` settings; the ingress replica
(:class:`shoprank.serving.deployments.Ingress`) builds its own (Serve's ``__serve_build_asgi_app__``) and puts
itself in ``app.state.ingress``, where every route finds it through the :data:`Replica` dependency. So each
replica's state (keys, limits, guardrail window, catalogue) is its instance's, never a class attribute or a module
global: Serve pickles the ingress class by value, and a replica gets copies of the globals it names.

This module has no ``from __future__ import annotations``: FastAPI reads the routes' signatures at runtime and
would take string annotations for query parameters.
"""

import asyncio
import datetime as dt
import logging
import math
import sqlite3
import uuid
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Path, Query, Request, Response, Security
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shoprank.config import ServeConfig
from shoprank.data.catalogue import product_rows, validated_products
from shoprank.errors import DataError
from shoprank.experiment.assignment import assign
from shoprank.experiment.guardrails import GuardrailLimits, GuardrailWindow, with_guardrails
from shoprank.experiment.report_model import ABReport
from shoprank.recsys.messages import Answered, Asked
from shoprank.serving.api import (
    FAILURES, Answer, BodyLimit, CatalogueChanged, Categorized, CategorizeRequest, Erased, EventBatch, EventsAccepted, Health, ProductBatch,
    ProductDeleted, RecommendRequest, Restored, RestoreRequest, SearchRequest, UserSummary, Variants, check_text,
    invalid, problem, refusals, rejected,
)
from shoprank.serving.keys import Role, allows
from shoprank.serving.metrics import (
    VARIANT_HEADER, RequestMetrics, endpoint_of, record_answer, record_events, record_explored,
)
from shoprank.store.events import Impression, StoreBusy

if TYPE_CHECKING:
    from shoprank.serving.deployments import Ingress

log = logging.getLogger(__name__)

SHOWN_MEMORY = 100_000
"""Answers an ingress replica remembers (request id -> user and products shown) to check the engagements that name
them without a query; older ones are looked up in the store's impressions."""

DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


def replica(request: Request) -> "Ingress":
    """The ingress replica that serves this app (a route dependency)."""
    return request.app.state.ingress


Replica = Annotated["Ingress", Depends(replica)]


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

    async def check(ingress: Replica, sent_bearer: HTTPAuthorizationCredentials | None = Security(bearer),
                    sent_header: str | None = Security(header)) -> None:
        held = ingress.keys.role_of(sent_bearer.credentials if sent_bearer is not None else sent_header)
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
    """ASGI middleware: ``/docs`` and ``/openapi.json`` answer 404 unless ``docs`` (``serve.docs``)."""

    def __init__(self, app: Any, docs: bool) -> None:
        self.app = app
        self.docs = docs

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and not self.docs:
            path, root = scope["path"], scope.get("root_path", "")
            if (path[len(root):] if root and path.startswith(root) else path) in DOCS_PATHS:
                await JSONResponse(status_code=404, content={"detail": "API docs are off (serve.docs)"})(
                    scope, receive, send)
                return
        await self.app(scope, receive, send)


async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each field and why; FastAPI's own answer echoes the input and fails (a 5xx) on one that JSON
    cannot carry."""
    return JSONResponse(status_code=422, content=invalid(exc.errors()))


async def refused(request: Request, exc: StarletteHTTPException) -> Response:
    """An HTTP exception as FastAPI answers it, in the documented refusal's shape (a list of problems), and a body
    that could not be parsed at all (not UTF-8 text, or nested deeper than the parser goes), which FastAPI answers
    with a 400 of another shape, as a 422 naming the body: it is malformed JSON like any other. A path no route
    matches (the router's own 404, a bare string) names the path: ``DELETE /products/{id}`` with an id no route
    pattern takes (a line break in it) is refused in the shape its schema documents."""
    if exc.status_code == 400 and isinstance(exc.__cause__, (ValueError, RecursionError)):
        return JSONResponse(status_code=422, content={"detail": [problem(
            ["body"], f"the body is not JSON text ({type(exc.__cause__).__name__}): send UTF-8 JSON", "json_invalid")]})
    if isinstance(exc.detail, str):
        return JSONResponse(status_code=exc.status_code, headers=exc.headers, content={"detail": [problem(
            ["path"], f"{exc.detail}: no endpoint takes {request.method} at this path",
            "not_found" if exc.status_code == 404 else "http_error")]})
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


async def unexpected(request: Request, exc: Exception) -> JSONResponse:
    """503 with Retry-After (``serve.retry_after_s`` of the app's ``state.serve``) when the service cannot answer
    now (:func:`unavailable`); else a bug: 500 with an error id that the log names beside the stack trace, which
    the client never sees. The log names the route's template (``/users/{user_id}``), never the path, which may
    hold a raw user id."""
    reason = unavailable(exc)
    if reason is not None:
        log.warning("%s %s: 503, %s (%s)", request.method, endpoint_of(request.scope), reason, type(exc).__name__)
        return JSONResponse(status_code=503, content={"detail": f"{reason}; retry shortly"},
                            headers={"Retry-After": str(math.ceil(request.app.state.serve.retry_after_s))})
    error_id = uuid.uuid4().hex
    log.error("%s %s: 500, error %s", request.method, endpoint_of(request.scope), error_id, exc_info=exc)
    return JSONResponse(status_code=500, content={"detail": f"internal error {error_id}: the app's log has it"})


# ---------------------------------------------------------------------------------------------------- answers

answer_routes = APIRouter()


def _variant(ingress: "Ingress", forced: str | None, user_id: str | None, request_id: str) -> str:
    if forced is not None:
        if forced not in ingress.specs:
            raise rejected(["variant"], f"unknown variant {forced!r}; known: {', '.join(sorted(ingress.specs))}")
        return forced
    return assign(user_id or request_id, ingress.config.serve.experiment, ingress.config.serve.split)


def _note(ingress: "Ingress", kind: str, run_uri: str, history_events: int) -> str | None:
    """Why a recommendation is not personal, when it is not."""
    if kind != "recommend" or history_events:
        return None
    if run_uri in ingress.without_behaviour:
        return ("this run has no behaviour events (judged queries only): popular products, by how many "
                "queries judged them relevant")
    return "no history for this user: popular and trending products"


async def _answer(ingress: "Ingress", kind: str, user_id: str | None, query: str | None, k: int, forced: str | None,
                  ts: dt.datetime | None, response: Response) -> Answer:
    ingress.start_background()
    request_id = uuid.uuid4().hex
    user_id = ingress.pseudonyms.of(user_id) if user_id else None
    variant = _variant(ingress, forced, user_id, request_id)
    shown_at = _dated(ingress.config.serve, ingress.now_s(), ts, ["ts"], "nothing was answered")
    answered: Answered = await ingress.handles[variant].answer.remote(
        Asked(user_id, [], query, k, shown_at.timestamp(), request_id=request_id))
    ranked = answered.items
    ingress.impressions.put([
        Impression(request_id, user_id or "anonymous", variant, r.product_id, i + 1, shown_at, forced is not None)
        for i, r in enumerate(ranked)
    ])
    ingress.shown[request_id] = (user_id or "anonymous", frozenset(r.product_id for r in ranked))
    if len(ingress.shown) > SHOWN_MEMORY:
        ingress.shown.popitem(last=False)
    response.headers["x-shoprank-replica"] = answered.replica
    response.headers[VARIANT_HEADER] = variant
    record_answer(variant, forced is not None, len(ranked))
    record_explored(variant, sum(r.explored for r in ranked))
    # the product as the replica that ranked it lists it (a change put a moment ago included)
    items = [{"rank": i + 1, **({"product_id": r.product_id, **r.shown} if r.shown else ingress.products[r.product_id]),
              "score": r.score, "contributions": r.contributions, "explored": r.explored} for i, r in enumerate(ranked)]
    return Answer(request_id=request_id, variant=variant, forced=forced is not None, kind=kind, items=items,
                  note=_note(ingress, kind, ingress.specs[variant].run, answered.history_events))


@answer_routes.post("/search", response_model=Answer, dependencies=[needs("client")], responses=refusals(401, 403, 422))
async def search(body: SearchRequest, response: Response, ingress: Replica) -> Answer:
    limit = ingress.config.serve.max_query_chars
    if len(body.query) > limit:
        raise rejected(["query"], f"query is {len(body.query)} characters; at most {limit} (serve.max_query_chars)")
    return await _answer(ingress, "search", body.user_id, body.query, body.k, body.variant, body.ts, response)


@answer_routes.post("/recommend", response_model=Answer, dependencies=[needs("client")],
                    responses=refusals(401, 403, 422))
async def recommend(body: RecommendRequest, response: Response, ingress: Replica) -> Answer:
    return await _answer(ingress, "recommend", body.user_id, None, body.k, body.variant, body.ts, response)


def categorizing_variant(ingress: "Ingress") -> str:
    """The variant that answers ``/categorize``: ``serve.categorize_variant``, else the first served variant whose
    encoder is fine-tuned (its run has the category head), else the first."""
    named = ingress.config.serve.categorize_variant
    if named is not None:
        return named
    return next((name for name, spec in ingress.specs.items() if spec.encoder == "fine_tuned"), next(iter(ingress.specs)))


@answer_routes.post("/categorize", response_model=Categorized, dependencies=[needs("client")],
                    responses=refusals(401, 403, 422))
async def categorize(body: CategorizeRequest, response: Response, ingress: Replica) -> Categorized:
    """A listing's most likely categories of the served run's tree, with probabilities: the fine-tuned encoder's
    category head over the listing's text, embedded as the catalogue's products are; where the run has no head,
    the nearest labelled products vote (``method`` says which)."""
    variant = categorizing_variant(ingress)
    found = await ingress.handles[variant].categorize.remote(body.title, body.description, body.k)
    response.headers[VARIANT_HEADER] = variant
    return Categorized(**found, variant=variant)


# ---------------------------------------------------------------------------------------------------- events

event_routes = APIRouter()


@event_routes.post("/events", response_model=EventsAccepted, dependencies=[needs("client")],
             responses=refusals(401, 403, 409, 422))
async def events(body: EventBatch, ingress: Replica) -> EventsAccepted:
    ingress.start_background()
    settings = ingress.config.serve
    now = ingress.now_s()
    rows = []
    followed = False
    for i, event in enumerate(body):
        user = ingress.pseudonyms.of(event.user_id)
        if event.product_id not in ingress.products and not followed:
            # put a moment ago, maybe through another ingress replica: this one reads the change log once
            await ingress.follow_catalogue()
            followed = True
        # a product deleted since stays known (ingress.products keeps it): a late click on a withdrawn listing, or
        # a purchase of one, is still what the shopper did, and the A/B report and the next run's data count it
        if event.product_id not in ingress.products:
            raise rejected([i, "product_id"], f"unknown product {event.product_id!r}; nothing of this request "
                                              "was stored")
        if event.variant is not None and event.variant not in ingress.specs:
            raise rejected([i, "variant"], f"unknown variant {event.variant!r}; nothing of this request was stored")
        ts = _dated(settings, now, event.ts, [i, "ts"], "nothing of this request was stored")
        if event.request_id is not None and event.event_type != "view" and settings.unattributed == "reject":
            why = await _unattributed(ingress, user, event.request_id, event.product_id)
            if why is not None:
                raise rejected([i, "request_id"], f"{why} (serve.unattributed=reject); nothing of this request "
                                                  "was stored")
        rows.append({
            **event.model_dump(), "user_id": user, "ts": ts, "event_id": event.event_id or uuid.uuid4().hex,
            "session_id": event.session_id or f"live-{user}",
        })
    outcome = await ingress.store.append.remote(rows)
    if isinstance(outcome, str):
        raise (rejected([], outcome, status=409, error_type="conflict") if "already stored" in outcome
               else rejected([], outcome))
    record_events(rows, ingress.prices)
    return EventsAccepted(stored=outcome, event_ids=[r["event_id"] for r in rows])


def _dated(settings: ServeConfig, now: float, ts: dt.datetime | None, loc: list[str | int],
           consequence: str) -> dt.datetime:
    """``ts`` as the app accepts it (UTC; the app's clock ``now`` when None), or a 422 naming ``loc`` and saying
    ``consequence``: an answer or an event dated further ahead of the app's clock than ``serve.clock_skew_s`` (or
    ``serve.simulated_days``, a simulated shop's returning shoppers) would outweigh every other in its shopper's
    history, and one older than ``serve.retention_days`` would be purged at once."""
    if ts is None:
        return dt.datetime.fromtimestamp(now, dt.timezone.utc)
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=dt.timezone.utc)
    ahead_s = max(settings.clock_skew_s, settings.simulated_days * 86_400)
    if ts.timestamp() > now + ahead_s:
        served = dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat(timespec="seconds")
        raise rejected(loc, f"{ts.isoformat()} is later than the app's clock ({served}, serve.clock={settings.clock}) "
                            f"by more than serve.clock_skew_s ({settings.clock_skew_s:g} s) and serve.simulated_days "
                            f"({settings.simulated_days:g}); {consequence}")
    if ts.timestamp() < now - settings.retention_days * 86_400:
        raise rejected(loc, f"{ts.isoformat()} is older than serve.retention_days ({settings.retention_days:g}); "
                            f"{consequence}")
    return ts


async def _unattributed(ingress: "Ingress", user: str, request_id: str, product_id: str) -> str | None:
    """Why an engagement naming ``request_id`` is not with a product that answer showed to ``user``, or None.

    The answer is looked up in this replica's memory, else in the store's impressions (this replica's queue
    flushed first); one not found there may still wait in another ingress replica's queue, which flushes
    within ``serve.impression_flush_s``: so it is looked up once more after that long.
    """
    shown = ingress.shown.get(request_id)
    if shown is None:
        await ingress.impressions.flush()
        shown = await ingress.store.shown.remote(request_id)
        if shown is None:
            await asyncio.sleep(ingress.config.serve.impression_flush_s)
            shown = await ingress.store.shown.remote(request_id)
        if shown is None:
            return f"request_id {request_id!r} names no answer of this app"
        ingress.shown[request_id] = shown = (shown[0], frozenset(shown[1]))
    owner, products = shown
    if owner != user:
        return f"answer {request_id!r} was not shown to this user"
    if product_id not in products:
        return f"answer {request_id!r} did not show product {product_id!r}"
    return None


# ---------------------------------------------------------------------------------------------------- experiment

experiment_routes = APIRouter()


@experiment_routes.get("/ab/report", response_model=ABReport, response_model_exclude_unset=True,
                dependencies=[needs("admin")], responses=refusals(401, 403))
async def ab_report(ingress: Replica) -> dict[str, Any]:
    await ingress.impressions.flush()  # this replica's answers so far are in the report
    await ingress.forget_erased()  # an erased shopper's history in the run is no covariate
    settings = ingress.config.serve
    report = await ingress.store.report.remote(settings.split, ingress.prices, ingress.pre_period,
                                               settings.decision_metric, ingress.planned, settings.control_variant)
    report["experiment"] = settings.experiment
    report["offline"] = ingress.offline
    report["guardrails"] = ingress.guardrails.figures(GuardrailLimits(
        settings.guardrail_p99_ms, settings.guardrail_error_rate, settings.guardrail_min_requests))
    for section in (report["user_level"], report.get("comparisons") or {}):  # A/B/n: the same verdict in both
        if section.get("verdict"):
            section["verdict"] = with_guardrails(section["verdict"], report["guardrails"], settings.control_variant)
    return report


@experiment_routes.get("/variants", response_model=Variants, dependencies=[needs("admin")],
                       responses=refusals(401, 403))
async def variants(ingress: Replica) -> dict[str, Any]:
    models = {name: await handle.describe.remote() for name, handle in ingress.handles.items()}
    return {
        "experiment": ingress.config.serve.experiment, "split": ingress.config.serve.split,
        "control": ingress.config.serve.control_variant,
        "variants": {name: {**spec.model_dump(), "model": models.get(name)} for name, spec in ingress.specs.items()},
    }


# ---------------------------------------------------------------------------------------------------- users

user_routes = APIRouter()


@user_routes.get("/users", response_model=list[UserSummary], dependencies=[needs("admin")],
           responses=refusals(401, 403, 422))
async def users(ingress: Replica, limit: int = Query(200, ge=1, le=5000)) -> list[dict[str, str]]:
    """The most active known users, each with a one-line summary of their history (for pickers); none erased."""
    await ingress.forget_erased()
    return ingress.users[:limit]


@user_routes.delete("/users/{user_id}", response_model=Erased, dependencies=[needs("admin")],
              responses=refusals(401, 403, 422))
async def erase_user(ingress: Replica, user_id: str = Path(min_length=1, max_length=128)) -> Erased:
    """Erase a shopper (their id or pseudonym): every event and impression in the store; on every variant
    replica, their cached events and their history in the run (each reads the store's tombstone before its next
    answer), so they are a new shopper there; from ``/users``; and, through the tombstone, from the next
    pipeline run's tables. How many rows went where."""
    try:
        check_text(user_id)
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=[problem(["path", "user_id"], str(exc))]) from None
    user = ingress.pseudonyms.of(user_id)
    await ingress.impressions.flush()  # the user's queued impressions are in the store, then erased with the rest
    for request_id in [r for r, (owner, _) in ingress.shown.items() if owner == user]:
        del ingress.shown[request_id]
    await ingress.forget_erased()  # a user erased before has no run history left to mask
    run_events = ingress.run_events_of.get(user, 0)
    # on the app's clock, the one its impressions carry: what another ingress replica still queues is dropped
    erased = await ingress.store.erase.remote(user, dt.datetime.fromtimestamp(ingress.now_s(), dt.timezone.utc))
    await ingress.forget_erased()
    log.info("erased user %s: %s, %d events of the run's history masked", user, erased, run_events)
    return Erased(user=user, **erased, run_events=run_events, excluded_from_next_ingest=True)


# ---------------------------------------------------------------------------------------------------- catalogue

catalogue_routes = APIRouter()

IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$",
    description="The batch's id in the change log: a request sent again under the same key (a retry after a lost "
                "answer) changes nothing. A new id when omitted.")]


def _where(exc: DataError) -> str:
    """A :class:`DataError`'s reason, without the file, column and row it names (a refusal's ``loc`` says where)."""
    message = str(exc)
    prefix = ", ".join(part for part in (f"file {exc.file}" if exc.file is not None else None,
                                         f"column {exc.column!r}" if exc.column is not None else None,
                                         f"row {exc.row}" if exc.row is not None else None) if part)
    return message[len(prefix) + 2:] if prefix and message.startswith(prefix + ": ") else message


async def _change_catalogue(ingress: "Ingress", puts: list[dict[str, Any]], deletes: list[str],
                            batch_id: str | None) -> tuple[int, int]:
    """Append a batch to the change log (one transaction) and follow the log at once, so this replica's ``/events``
    knows a product put here from the very next request: (changes stored, the log's position after them)."""
    at = dt.datetime.fromtimestamp(ingress.now_s(), dt.timezone.utc)
    try:
        stored = await ingress.store.change_catalogue.remote(puts, deletes, at, batch_id or uuid.uuid4().hex)
    except RayTaskError as exc:
        if isinstance(exc.cause, DataError):  # validated before: the store's last line, refused as a 422 still
            raise rejected([exc.cause.row - 1 if exc.cause.row else 0, exc.cause.column or "product_id"],
                           f"{_where(exc.cause)}; nothing of this request was stored") from None
        raise
    return stored, await ingress.follow_catalogue()


@catalogue_routes.put("/products", response_model=CatalogueChanged, dependencies=[needs("admin")],
                      responses=refusals(401, 403, 413, 422))
async def put_products(body: ProductBatch, ingress: Replica, idempotency_key: IdempotencyKey = None
                       ) -> CatalogueChanged:
    """Add products to the catalogue, or change them (a product id already listed is replaced whole): every variant
    replica answers with them once it reads the change log (within about a second), and the next pipeline run
    ingests them. Validated as ingest validates a catalogue file; stored all or nothing."""
    ingress.start_background()
    first: dict[str, int] = {}
    for i, product in enumerate(body):
        if product.product_id in first:
            raise rejected([i, "product_id"], f"product {product.product_id!r} is given twice in this request "
                                              f"(first at {first[product.product_id]}); nothing was stored")
        first[product.product_id] = i
    try:
        table = validated_products([product.model_dump() for product in body], "request")
    except DataError as exc:
        raise rejected([exc.row - 1 if exc.row else 0, exc.column or "product_id"],
                       f"{_where(exc)}; nothing of this request was stored") from None
    stored, seq = await _change_catalogue(ingress, product_rows(table), [], idempotency_key)
    log.info("catalogue: %d products put (%d changes stored), log at %d", len(body), stored, seq)
    return CatalogueChanged(stored=stored, seq=seq)


# ``:path``: a product id may hold a slash (any printable character but a space), sent percent-encoded
@catalogue_routes.delete("/products/{product_id:path}", response_model=ProductDeleted, dependencies=[needs("admin")],
                         responses=refusals(401, 403, 404, 422))
async def delete_product(ingress: Replica, product_id: str = Path(min_length=1, max_length=128),
                         idempotency_key: IdempotencyKey = None) -> ProductDeleted:
    """Withdraw a product (a recall, a listing sold out for good): no variant replica proposes it again once it reads
    the change log, from any candidate source, and the next pipeline run leaves it out. Deleting a product deleted
    already changes nothing (a retry); one the catalogue never listed is a 404."""
    ingress.start_background()
    try:
        check_text(product_id)
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=[problem(["path", "product_id"], str(exc))]) from None
    seq = await ingress.follow_catalogue()  # put or deleted a moment ago through another ingress replica
    if product_id not in ingress.products:
        raise HTTPException(status_code=404, detail=[problem(
            ["path", "product_id"], f"no product {product_id!r} was ever listed: not in the served runs' catalogue, "
                                    "nor put since", "not_found")])
    if product_id in ingress.withdrawn:
        return ProductDeleted(product_id=product_id, deleted=False, seq=seq)
    stored, seq = await _change_catalogue(ingress, [], [product_id], idempotency_key)
    log.info("catalogue: product deleted, log at %d", seq)
    # stored 0: the Idempotency-Key names a batch stored before (a retry), and this delete was not stored now
    return ProductDeleted(product_id=product_id, deleted=stored > 0, seq=seq)


# ---------------------------------------------------------------------------------------------------- admin

admin_routes = APIRouter()


@admin_routes.post("/admin/events/restore", response_model=Restored, dependencies=[needs("admin")],
            responses=refusals(401, 403, 422))
async def restore_events(body: RestoreRequest, ingress: Replica) -> Restored:
    """Restore the SQLite event store from a backup on the writer's host, without stopping the app: the writer
    finishes what it is writing, answers 503 (Retry-After) meanwhile, restores and goes on. The variants' user
    caches read on from their cursors (numbering continues after the replaced store's); users they hold keep
    the events they had read that the backup lacks until they leave the cache or the app is redeployed."""
    restored = await ingress.store.restore.remote(body.backup, body.replace)
    if isinstance(restored, str):
        raise rejected(["backup"], restored)
    log.info("event store restored from a backup: %d events", restored)
    return Restored(events=restored, backup=body.backup)


@admin_routes.get("/healthz", response_model=Health)
async def healthz(ingress: Replica) -> dict[str, Any]:
    return {"status": "ok", "variants": sorted(ingress.specs), "clock": ingress.now_s(),
            "impressions": ingress.impressions.summary()}


def http_api(settings: ServeConfig, guardrails: GuardrailWindow) -> FastAPI:
    """The app of one ingress replica: every router, its middleware set from ``settings`` (``serve``), and the
    answers' latencies and errors observed into ``guardrails``. The caller puts the replica in
    ``app.state.ingress`` before the first request; the routes reach it through :data:`Replica`."""
    app = FastAPI(title="shoprank", description="Search, recommendations, events and the A/B report of the shop. "
                                                "Every endpoint but /healthz needs an API key (Authorization: Bearer).",
                  responses=FAILURES)
    app.state.serve = settings
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(DocsSwitch, docs=settings.docs)
    app.add_middleware(RequestMetrics, guardrails=guardrails)  # the outermost: it sees the others' refusals too
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, refused)
    app.add_exception_handler(Exception, unexpected)
    for router in (answer_routes, event_routes, experiment_routes, user_routes, catalogue_routes, admin_routes):
        app.include_router(router)
    return app
