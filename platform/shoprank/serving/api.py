"""The HTTP contract of the Serve app: request and response models (OpenAPI at ``/openapi.json``).

Validation that needs no state happens here (types, ``k`` in 1..100, a blank query,
unknown fields); what needs the app's state (the configured query length, the
variants, the catalogue) is checked by the ingress, which answers with the same
4xx shape, :class:`Refusal`: ``{"detail": [{"loc": [...], "msg": ..., "type": ...}]}``. The routes document it
(:func:`refusals`) in place of FastAPI's own ``HTTPValidationError``, which echoes the input and is not what a
client gets.
"""

from __future__ import annotations

import datetime as dt
import unicodedata
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi import Body, HTTPException
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoprank.data.schema import ALL_EVENT_TYPES, MAX_QUANTITY
from shoprank.recsys.messages import Strategy
from shoprank.serving.variants import VariantSpec

MAX_K = 100
MAX_EVENTS_PER_REQUEST = 1000
MAX_PRODUCTS_PER_REQUEST = 1000
"""The most products one ``PUT /products`` may carry: a batch is one transaction, and every variant replica embeds
its new text before the batch shows in answers (``shoprank catalogue sync`` sends a file in chunks of this size)."""
Identifier = Field(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")
TEXT = r"^[^\x00-\x1f\x7f-\x9f]*$"
"""What :func:`check_text` accepts, as a JSON-schema pattern: no control character (Unicode category Cc)."""
SOME_TEXT = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
"""The same, with at least one character that is not whitespace (a query)."""


def check_text(value: str) -> str:
    """``value`` if it is text a person could type: no lone surrogate (not Unicode text at all: it cannot be
    encoded, so a tokenizer or a database would fail on it later) and no control character (NUL, BEL, ...)."""
    for position, char in enumerate(value):
        code = ord(char)
        if 0xD800 <= code <= 0xDFFF:
            raise ValueError(f"not valid Unicode text: a lone surrogate (U+{code:04X}) at position {position}")
        if unicodedata.category(char) == "Cc":
            raise ValueError(f"contains a control character (U+{code:04X}) at position {position}")
    return value


def document_text(schema: dict[str, Any]) -> None:
    """Each string field of a request's JSON schema names what :func:`check_text` refuses (``TEXT``) unless its own
    pattern already says more: the documented contract is what the app accepts. Only the schema: the check itself
    stays in :class:`Strict`, whose message names the character and its position."""
    for field in schema.get("properties", {}).values():
        for option in field.get("anyOf", [field]):
            if option.get("type") == "string" and "format" not in option:  # a date-time says enough
                option.setdefault("pattern", TEXT)


class Strict(BaseModel):
    """A request body: unknown fields refused, every string checked by :func:`check_text`."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=document_text)

    @field_validator("*")
    @classmethod
    def text_only(cls, value: object) -> object:
        return check_text(value) if isinstance(value, str) else value


class SearchRequest(Strict):
    query: str = Field(max_length=10_000, json_schema_extra={"pattern": SOME_TEXT},
                       description="What the shopper typed (not blank; at most serve.max_query_chars).")
    user_id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")
    k: int = Field(10, ge=1, le=MAX_K)
    variant: str | None = Field(None, max_length=64,
                                description="Force a variant (side-by-side views); left out of the A/B report.")
    ts: dt.datetime | None = Field(None, description="When the shopper viewed the page (a client replaying or "
                                   "simulating visits); the app's clock when omitted. As an event's ts: at most "
                                   "serve.clock_skew_s (serve.simulated_days) ahead of it.")

    @field_validator("query")
    @classmethod
    def not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("query is empty or only whitespace")
        return value.strip()


class RecommendRequest(Strict):
    user_id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$",
                                description="Omitted or unknown: a cold-start answer (popular and trending).")
    k: int = Field(10, ge=1, le=MAX_K)
    variant: str | None = Field(None, max_length=64)
    ts: dt.datetime | None = Field(None, description="When the shopper viewed the page (a client replaying or "
                                   "simulating visits); the app's clock when omitted. As an event's ts: at most "
                                   "serve.clock_skew_s (serve.simulated_days) ahead of it.")


class EventIn(Strict):
    user_id: str = Identifier
    product_id: str = Identifier
    event_type: Literal[ALL_EVENT_TYPES] = Field(  # type: ignore[valid-type]
        description="Behaviour (view, click, add_to_cart, purchase), or the shopper hiding the product "
                    "(not_interested), every product of its brand (not_interested_brand) or of its category "
                    "(not_interested_category): left out of that shopper's answers in every variant from the next "
                    "one on, for good (docs/serving.md, Not interested).")
    event_id: str | None = Field(None, min_length=1, max_length=128, description="Generated when omitted.")
    session_id: str | None = Field(None, min_length=1, max_length=128)
    ts: dt.datetime | None = Field(None, description="The server's clock when omitted.")
    query: str | None = Field(None, max_length=10_000)
    position: int | None = Field(None, ge=1, le=10_000)
    request_id: str | None = Field(None, max_length=128, description="The answer the event reacts to (A/B).")
    variant: str | None = Field(None, max_length=64)
    quantity: int | None = Field(None, ge=1, le=MAX_QUANTITY,
                                 description="Items bought (a purchase); its revenue is price x quantity (1 if omitted).")


EventBatch = Annotated[list[EventIn], Body(min_length=1, max_length=MAX_EVENTS_PER_REQUEST,
                                            description="Stored all or nothing.")]
"""The body of ``POST /events``: 1 to ``MAX_EVENTS_PER_REQUEST`` events."""


class ProductIn(Strict):
    """A product put into the catalogue: its record row (docs/data.md, "Records"), validated as ingest validates a
    catalogue file (text stripped, blank = missing; a title and a finite price >= 0 required)."""

    product_id: str = Identifier
    title: str = Field(min_length=1, max_length=2000)
    description: str | None = Field(None, max_length=100_000, description="Cut to preprocess.description_chars "
                                    "when shown and embedded, as the pipeline cuts it.")
    category: str | None = Field(None, max_length=1000, description="A path, `Home > Cookware > Woks`; null when "
                                 "unknown (a replica with a categoriser fills it for its own answers).")
    brand: str | None = Field(None, max_length=1000)
    price: float = Field(ge=0, allow_inf_nan=False)
    attributes: dict[str, str] = Field(default_factory=dict, description="Free-form attributes, text to text.")

    @field_validator("attributes")
    @classmethod
    def attributes_are_text(cls, value: dict[str, str]) -> dict[str, str]:
        for pair in value.items():
            for text in pair:
                check_text(text)
        return value


ProductBatch = Annotated[list[ProductIn], Body(min_length=1, max_length=MAX_PRODUCTS_PER_REQUEST,
                                                description="Stored all or nothing; each product id at most once.")]
"""The body of ``PUT /products``: 1 to ``MAX_PRODUCTS_PER_REQUEST`` products."""


class CatalogueChanged(BaseModel):
    stored: int = Field(description="Changes this request added to the catalogue change log: 0 when its "
                                    "`Idempotency-Key` was stored already (a retry changes the log once).")
    seq: int = Field(description="The change log's position once the request is stored: every replica whose "
                                 "cursor reached it answers with the change.")


class ProductDeleted(BaseModel):
    product_id: str
    deleted: bool = Field(description="False when the product was deleted already (a retry): nothing changed.")
    seq: int = Field(description="The change log's position once the request is stored.")


class Item(BaseModel):
    rank: int
    product_id: str
    title: str
    category: str | None = Field(description="Null when the catalogue has none for the product.")
    category_predicted: bool = Field(False, description="The category is a prediction, not the catalogue's: ingest's "
                                     "for a product without one (docs/data.md), or the variant's head's for a "
                                     "product put live without one.")
    brand: str | None = Field(description="Null when the catalogue has none for the product.")
    price: float
    score: float = Field(description="The score that ordered the list.")
    contributions: dict[str, float] = Field(
        description="The score's parts, largest first: the features that moved it most (the ranker's SHAP values, "
        "or the baseline's terms), 'other features' (the rest together) and 'base' (an average candidate's score); "
        "they add up to the score. '<feature> (no value)': the product has no value for it (a rate over nothing).")
    explored: bool = Field(
        False, description="Placed by an exploration slot (serve.explore: a product added while serving, with little "
        "exposure yet), not by its score: its score and its one contribution are a draw of its click rate.")


class Answer(BaseModel):
    request_id: str
    variant: str
    forced: bool
    kind: Literal["search", "recommend"]
    items: list[Item]
    note: str | None = Field(None, description="What the answer fell back to, when it could not personalise "
                                              "(a user with no history, a run with no behaviour events).")


MAX_CATEGORIES = 10
TITLE_CHARS = 2000
DESCRIPTION_CHARS = 100_000


class CategorizeRequest(Strict):
    """A listing to categorise: its title (and description), as a product put into the catalogue has them."""

    title: str = Field(max_length=TITLE_CHARS, json_schema_extra={"pattern": SOME_TEXT},
                       description="The listing's title (not blank).")
    description: str | None = Field(None, max_length=DESCRIPTION_CHARS, description="Cut to "
                                    "preprocess.description_chars, as the catalogue's descriptions are.")
    k: int = Field(3, ge=1, le=MAX_CATEGORIES, description="How many categories, most likely first.")

    @field_validator("title")
    @classmethod
    def not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("title is empty or only whitespace")
        return value.strip()


class CategoryGuess(BaseModel):
    category: str = Field(description="A category path of the run's tree (`Home > Kitchen > Mugs`).")
    probability: float = Field(ge=0.0, le=1.0, description="head: the softmax of the category head's logits over "
                               "the whole tree; neighbours: the category's share of the nearest products' votes.")


class Categorized(BaseModel):
    categories: list[CategoryGuess] = Field(description="Most likely first; empty when the run has no labelled "
                                            "product to answer from.")
    method: Literal["head", "neighbours"] = Field(
        description="head: the fine-tuned encoder's category head; neighbours: the categories of the nearest "
                    "labelled products (source.categories.neighbours) vote, where the run has no head (head.npz) or "
                    "its evaluation measured them ahead of it (serve.categorize_method).")
    variant: str = Field(description="The variant whose encoder and run answered (serve.categorize_variant).")
    note: str | None = Field(None, description="Why the answer is not the head's, when it is not.")


class EventsAccepted(BaseModel):
    stored: int = Field(description="Events of the request now in the store (a retried event counts, stored once).")
    event_ids: list[str]


class Erased(BaseModel):
    user: str = Field(description="The erased shopper's pseudonym (user ids are stored only as keyed hashes).")
    events: int = Field(description="Events deleted from the store.")
    impressions: int = Field(description="Impressions deleted from the store.")
    run_events: int = Field(description="The shopper's events in the history of the runs served: no serving replica "
                                        "reads them once it has read the erasure's tombstone, which each does before "
                                        "its next answer (the run's files keep them until the next pipeline run).")
    excluded_from_next_ingest: bool = Field(
        description="The tombstone stays in the event store: the next pipeline run's ingest leaves the shopper out "
                    "of every table it writes. Backups and exports made earlier are outside erasure "
                    "(docs/security.md).")


class RestoreRequest(Strict):
    backup: str = Field(min_length=1, max_length=4096, description="The SQLite backup to restore (`shoprank events "
                        "backup`): a path on the host of the app's event store writer.")
    replace: bool = Field(False, description="Overwrite a store that holds events.")


class Restored(BaseModel):
    events: int = Field(description="Events in the restored store (the backup's).")
    backup: str


class UserSummary(BaseModel):
    user_id: str
    summary: str = Field(description="'N events; mostly <category>; last: <event> <title>'.")


class FollowedCatalogue(BaseModel):
    """Where the answering replica's catalogue stands against the catalogue change log."""

    products: int = Field(description="Products its catalogue lists: the run's, plus puts, less deletes.")
    cursor: int = Field(description="The last change it applied (sequence number of the change log).")
    lag_s: float = Field(description="How long a change it knows of has waited to be applied; 0: caught up.")


class LoadedRanker(BaseModel):
    """What a variant's replica has loaded now (it follows its registry alias)."""

    strategy: Strategy
    ranker_run: str
    trees: int = Field(description="The XGBoost ranker's boosted rounds; 0 for the retrieval baseline.")
    catalogue: FollowedCatalogue


class ServedVariant(VariantSpec):
    model: LoadedRanker


class Variants(BaseModel):
    experiment: str
    split: dict[str, float]
    control: str | None = Field(None, description="The variant every other is compared with (serve.control).")
    variants: dict[str, ServedVariant]


class QueueState(BaseModel):
    """This ingress replica's impression queue (:class:`shoprank.serving.impressions.ImpressionQueue`)."""

    waiting: int
    dropped: int
    capacity: int


class Health(BaseModel):
    status: Literal["ok"]
    variants: list[str]
    clock: float = Field(description="The app's clock, epoch seconds (serve.clock).")
    impressions: QueueState


class Problem(BaseModel):
    """One thing wrong with a request."""

    loc: list[str | int] = Field(description="Where: `body`, `query` or `header`, then the path to the field "
                                             "(an event's index in a batch, its field).")
    msg: str = Field(description="Why, in words; never the input itself.")
    type: str = Field(description="What kind of problem, for programs: pydantic's error type (`missing`, "
                                  "`string_too_long`, ...) or the app's (`value_error`, `unauthorized`, `forbidden`, "
                                  "`conflict`, `not_found`, `too_large`).")


class Refusal(BaseModel):
    """Every 4xx of the app: each problem of the request, none of its input."""

    detail: list[Problem]


class Failure(BaseModel):
    """A 5xx of the app: why (503: retry after `Retry-After` seconds; 500: a bug, with the error id the log names)."""

    detail: str


REFUSALS: dict[int, str] = {
    401: "No API key, or an unknown one (`WWW-Authenticate: Bearer`).",
    403: "The key's role may not call this endpoint.",
    404: "What the path names does not exist (a product id the catalogue never listed).",
    409: "An `event_id` of the batch is already stored; nothing of the batch was stored.",
    413: "The body is larger than `serve.max_body_bytes`; refused before it is parsed.",
    422: "The request is invalid: each field at fault and why.",
}


CHALLENGE = {"WWW-Authenticate": {"description": "`Bearer`: how to send a key.", "schema": {"type": "string"}}}


def refusals(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The 4xx answers a route documents in its OpenAPI ``responses``, each a :class:`Refusal`."""
    return {status: {"model": Refusal, "description": REFUSALS[status],
                     **({"headers": CHALLENGE} if status == 401 else {})} for status in statuses}


PLAIN_TEXT = {"text/plain": {"schema": {"type": "string"}}}
FAILURES: dict[int | str, dict[str, Any]] = {
    408: {"description": "The request took longer than `serve.request_timeout_s` (Serve's proxy answers).",
          "content": PLAIN_TEXT},
    413: {"model": Refusal, "description": REFUSALS[413]},
    500: {"model": Failure, "description": "A bug: an error id that the app's log names beside the stack trace."},
    503: {"model": Failure, "content": PLAIN_TEXT,
          "headers": {"Retry-After": {"description": "Seconds to wait (`serve.retry_after_s`); absent when a "
                                                     "replica is restarting.", "schema": {"type": "integer"}}},
          "description": "Overloaded (Serve's proxy answers, in plain text) or a part is unavailable (a replica "
                         "restarting, the event store unreachable); retry after `Retry-After` seconds."},
}
"""What any route may answer, whatever it does: documented app-wide."""


def problem(loc: list[str | int], message: str, error_type: str = "value_error") -> dict[str, Any]:
    """One :class:`Problem`, as JSON."""
    return {"loc": loc, "msg": message, "type": error_type}


def rejected(loc: list[str | int], message: str, status: int = 422, error_type: str = "value_error") -> HTTPException:
    """A :class:`Refusal` naming the body's field at ``loc``."""
    return HTTPException(status_code=status, detail=[problem(["body", *loc], message, error_type)])


def invalid(errors: Sequence[Any]) -> dict[str, list[dict[str, Any]]]:
    """FastAPI's validation errors as a :class:`Refusal`: where and why, without the input itself, which may not be
    representable in JSON (``1e400`` parses to infinity, a lone surrogate cannot be encoded)."""
    return {"detail": [problem(list(error.get("loc", ())), str(error.get("msg", "invalid")),
                               str(error.get("type", "value_error"))) for error in errors]}


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 before it is read whole or parsed.

    A declared ``content-length`` over the limit is refused at once; a body without one (chunked) is
    counted as it arrives and refused as soon as it passes the limit (an :class:`HTTPException`, which
    FastAPI passes through its body reading). ``max_bytes`` is ``serve.max_body_bytes``, given to each app
    built (:func:`shoprank.serving.routes.http_api`).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await JSONResponse(status_code=413, content=self._refusal())(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(status_code=413, detail=self._refusal()["detail"])
            return message

        await self.app(scope, counted, send)

    def _refusal(self) -> dict[str, list[dict[str, Any]]]:
        return {"detail": [problem(["body"], f"request body larger than {self.max_bytes} bytes "
                                             "(serve.max_body_bytes); send fewer items per request", "too_large")]}
