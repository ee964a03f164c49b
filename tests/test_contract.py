"""The API's contract, fuzzed: schemathesis reads the live app's ``/openapi.json`` and, for each of its operations,
sends requests generated from the schema, valid ones and (for an operation that takes input) invalid ones, and checks
every answer against what the schema documents for it (schemathesis's default checks): no 5xx, no status code the
operation does not list, no body outside the documented model, no undocumented content type or header, an invalid
request refused with a 4xx, and an operation that declares a key refusing the same request without one.

Each operation is called with a key of the role its security requirement names (``clientKey`` or ``adminKey``), so
the admin endpoints are exercised past their 403. Half of the valid requests get product ids and variants that the
app knows (:func:`with_known_values`), so that the answers past validation (events stored, forced variants) are
fuzzed too. The operations are those of the app's FastAPI definition, one test each; the live schema must hold every
one of them.

schemathesis's own pytest loader for a schema from a fixture (``schemathesis.pytest.from_fixture``) fails on pytest 9.2
(it sets ``Node._nodeid``, which pytest 9.2 no longer has), so each test draws its cases from the operation's
strategy (``APIOperation.as_strategy``) under Hypothesis's ``@given``, the documented way to use schemathesis
outside its loader.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.generation.case import Case
from schemathesis.specs.openapi.checks import positive_data_acceptance

from conftest import App, bearer
from shoprank.config import load_config
from shoprank.experiment.guardrails import GuardrailWindow
from shoprank.serving.routes import http_api
from shoprank.store.events import open_event_store

SCHEMA = http_api(load_config("tiny").serve, GuardrailWindow(1)).openapi()
"""The app's schema as FastAPI defines it (an app built outside Serve: the routes are the same)."""
OPERATIONS = sorted((method.upper(), path) for path, methods in SCHEMA["paths"].items() for method in methods)
CASES_PER_OPERATION = 25


def live_schema(app: App) -> Any:
    """The schema as the deployed app serves it (``serve.docs`` is on in the tiny preset), read with schemathesis's
    default configuration rather than one a stray ``schemathesis.toml`` might set."""
    return schemathesis.openapi.from_url(f"{app.url}/openapi.json", config=SchemathesisConfig(), timeout=30)


def fuzzed_app(request: pytest.FixtureRequest, method: str, path: str) -> App:
    """The app an operation is fuzzed on: the in-memory shop's for a catalogue change (:data:`CATALOGUE_CHANGES`),
    else the session's trained app."""
    return request.getfixturevalue("fake_app" if (method, path) in CATALOGUE_CHANGES else "app")


def role_of(definition: dict[str, Any]) -> str:
    """The role an operation's security requirement names (``clientKey``, ``clientKeyHeader`` -> ``client``)."""
    roles = {name.removesuffix("Header").removesuffix("Key")
             for requirement in definition.get("security", []) for name in requirement}
    assert len(roles) <= 1, f"several roles for one operation: {roles}"
    return roles.pop() if roles else "client"  # /healthz needs no key and ignores one


CATALOGUE_CHANGES = {("PUT", "/products"), ("DELETE", "/products/{product_id}")}
"""Operations that change the catalogue: fuzzed on the in-memory shop's app (``fake_app``), never on the session's
trained app, whose answers other tests compare with the offline evaluation; and never with known product ids, which
would overwrite or delete the shop's products."""


def with_known_values(case: Case, app: App, data: st.DataObject) -> None:
    """A valid request's ``product_id`` and ``variant`` fields replaced by ones the deployed app knows, half of the
    time: the schema cannot name the catalogue or the variants, so without this nearly every generated event batch
    and forced answer stops at the ingress's 422 and what lies beyond goes unfuzzed."""
    if case.meta is None or case.meta.generation.mode is not GenerationMode.POSITIVE or not data.draw(st.booleans()):
        return
    if (case.method.upper(), case.path) in CATALOGUE_CHANGES:
        return
    for fields in case.body if isinstance(case.body, list) else [case.body]:
        if not isinstance(fields, dict):
            continue
        if "product_id" in fields:
            fields["product_id"] = data.draw(st.sampled_from(sorted(app.category_of)))
        if fields.get("variant") is not None:
            fields["variant"] = data.draw(st.sampled_from(sorted(app.config.serve.variants)))


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_every_answer_is_one_the_schema_documents(request: pytest.FixtureRequest, method: str, path: str) -> None:
    app = fuzzed_app(request, method, path)
    operation = live_schema(app)[path][method]
    definition = operation.definition.raw
    cases = operation.as_strategy(GenerationMode.POSITIVE)
    if definition.get("parameters") or definition.get("requestBody"):
        cases = st.one_of(cases, operation.as_strategy(GenerationMode.NEGATIVE))
    headers = bearer(app.keys[role_of(definition)])

    @given(case=cases, data=st.data())
    @settings(max_examples=CASES_PER_OPERATION, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    def answered_as_documented(case: Case, data: st.DataObject) -> None:
        with_known_values(case, app, data)
        # positive_data_acceptance is left out: it wants a 2xx for every request the schema allows, but what the
        # app's state decides is not in a static schema (the catalogue's product ids, the deployed variants,
        # serve.max_query_chars), and such a request gets the documented 422 naming the field.
        case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])

    try:
        answered_as_documented()
    finally:
        if (method, path) in CATALOGUE_CHANGES:
            withdraw_fuzzed_products(app)


def withdraw_fuzzed_products(app: App) -> None:
    """Delete every product the fuzzing put into ``app``'s catalogue (the shop's own are never overwritten: see
    :func:`with_known_values`), through its event store's change log, which its replicas follow: a deleted product
    leaves every answer, so the in-memory shop answers as before for the tests after this one."""
    store = open_event_store(app.db)
    try:
        state = store.catalogue_state(store.last_catalogue_change()[0])
        fuzzed = sorted(product for product, row in state.items() if row is not None and product not in app.category_of)
        if fuzzed:
            store.change_catalogue([], fuzzed, dt.datetime.now(dt.timezone.utc), f"contract-{uuid.uuid4().hex}")
    finally:
        store.close()


@pytest.mark.parametrize("body", [b"\xdb\x89]\xff", b"[" * 100_000], ids=["not-utf-8", "nested-too-deep"])
def test_a_body_that_cannot_be_parsed_is_a_documented_422(app: App, body: bytes) -> None:
    """Found by the fuzzing above: FastAPI answered a body it could not decode with a 400 of another shape."""
    answer = app.http.post("/events", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"][0]["loc"] == ["body"] and answer.json()["detail"][0]["type"] == "json_invalid"
