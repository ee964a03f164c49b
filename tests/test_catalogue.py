"""The catalogue as live data (issue 38, item 1): change files read and validated as ingest validates a catalogue
(``read_changes``), ``shoprank catalogue sync`` into the change log, ``PUT /products`` and ``DELETE /products/{id}``
refusing a bad batch whole and naming the problem, the ingress following the log, and the next pipeline run folding
the log into its catalogue."""

from __future__ import annotations

import csv
import datetime as dt
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import App
from shoprank.cli import main, sync_through_app
from shoprank.config import Config, load_config
from shoprank.data.catalogue import CATALOGUE_SEQ, read_changes, recorded_catalogue_seq
from shoprank.data.io import read_table
from shoprank.errors import DataError
from shoprank.serving.api import MAX_PRODUCTS_PER_REQUEST
from shoprank.stages import run_stages, stage_hash
from shoprank.store.events import SqliteEventStore, event_db_location, open_event_store
from shoprank.store.run import Run
from shoprank.webui.client import ServeClient

FIELDS = ["product_id", "title", "description", "category", "brand", "price", "attributes", "deleted"]


def change_rows(bad_price_at: int | None = None) -> list[dict[str, Any]]:
    """Eight rows of a change file: seven products put, the last a delete (``deleted`` true, only an id); with
    ``bad_price_at``, that 1-based row's price is no number."""
    rows: list[dict[str, Any]] = [
        {"product_id": f"LIVE-{i}", "title": f"  Zorblax lantern {i} ", "description": "A lantern." if i % 2 else None,
         "category": "Outdoors > Lights", "brand": "Acme" if i != 3 else None, "price": 10.0 + i,
         "attributes": {"colour": "red"} if i == 1 else None, "deleted": False} for i in range(1, 8)]
    rows.append({"product_id": "OLD-1", "deleted": True})
    if bad_price_at is not None:
        rows[bad_price_at - 1]["price"] = "cheap"
    return rows


def write_changes(rows: list[dict[str, Any]], path: Path) -> Path:
    """``rows`` as the file ``path``'s extension names (CSV cells as text, attributes as JSON text)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n" for row in rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as out:
            writer = csv.DictWriter(out, FIELDS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, dict) else "" if v is None else
                                 str(v).lower() if isinstance(v, bool) else v for k, v in row.items()})
    else:
        prices = [row.get("price") for row in rows]
        table = pa.table({
            **{name: pa.array([row.get(name) for row in rows], pa.string())
               for name in ("product_id", "title", "description", "category", "brand")},
            "price": (pa.array([None if p is None else str(p) for p in prices], pa.string()) if "cheap" in prices
                      else pa.array(prices, pa.float64())),
            "attributes": pa.array([list((row.get("attributes") or {}).items()) for row in rows],
                                   pa.map_(pa.string(), pa.string())),
            "deleted": pa.array([row["deleted"] for row in rows], pa.bool_())})
        pq.write_table(table, path)
    return path


def shoprank(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exited:
        return int(exited.code)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_a_change_file_is_read_as_ingest_reads_a_catalogue(tmp_path: Path, suffix: str) -> None:
    puts, deletes = read_changes(str(write_changes(change_rows(), tmp_path / f"changes{suffix}")))
    assert puts.column("product_id").to_pylist() == [f"LIVE-{i}" for i in range(1, 8)] and deletes == ["OLD-1"]
    first = puts.slice(0, 1).to_pylist()[0]
    assert first == {"product_id": "LIVE-1", "title": "Zorblax lantern 1", "description": "A lantern.",
                     "category": "Outdoors > Lights", "brand": "Acme", "price": 11.0, "attributes": [("colour", "red")]}
    assert puts.column("brand").to_pylist()[2] is None  # blank is missing, never made up


@pytest.mark.parametrize(("change", "error"), [
    (lambda rows: rows[6].update(price="cheap"), "column 'price', row 7: price must be a number, got 'cheap'"),
    (lambda rows: rows[4].update(title=" "), "column 'title', row 5: title is required"),
    (lambda rows: rows[5].update(product_id="LIVE-2"), "column 'product_id', row 6: duplicate product_id 'LIVE-2'; "
                                                       "first seen at row 2"),
    (lambda rows: rows[7].update(product_id="LIVE-3"), "column 'product_id', row 8: duplicate product_id 'LIVE-3'"),
    (lambda rows: rows[7].update(deleted="maybe"), "column 'deleted', row 8: deleted must be true or false"),
    (lambda rows: rows[1].update(product_id=None), "column 'product_id', row 2: product_id is required"),
], ids=["price", "blank-title", "put-twice", "put-and-deleted", "deleted-not-boolean", "no-id"])
def test_a_bad_change_file_names_its_column_and_row(tmp_path: Path, change: Callable[[list[dict]], None],
                                                    error: str) -> None:
    rows = change_rows()
    change(rows)
    path = write_changes(rows, tmp_path / "changes.jsonl")
    with pytest.raises(DataError, match=f"^file {path}, {error}"):
        read_changes(str(path))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_catalogue_sync_validates_the_whole_file_first(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       suffix: str) -> None:
    """A bad row 7 stores nothing and says where it is; the good file is stored whole; the same file again is stored
    again (its own batch: a repeated delete, a recall after a re-listing, is never taken for a retry of the first);
    while the Serve app writes the SQLite store, a direct sync is refused (send it through the app)."""
    overrides = ["--config", "tiny", "--set", f"run.root={tmp_path / 'runs'}"]
    database = Path(event_db_location(load_config("tiny", [f"run.root={tmp_path / 'runs'}"])))
    bad = write_changes(change_rows(bad_price_at=7), tmp_path / f"bad{suffix}")
    assert shoprank(["catalogue", "sync", str(bad), *overrides]) == 2
    assert f"file {bad}, column 'price', row 7: price must be a" in capsys.readouterr().err
    assert not database.exists() or SqliteEventStore(database).catalogue_changes(0) == []

    good = write_changes(change_rows(), tmp_path / f"good{suffix}")
    assert shoprank(["catalogue", "sync", str(good), *overrides]) == 0
    assert "7 products put, 1 deleted" in capsys.readouterr().out
    store = SqliteEventStore(database)
    changes = store.catalogue_changes(0)
    assert [(c.op, c.product_id) for c in changes] == [("put", f"LIVE-{i}") for i in range(1, 8)] + [("delete", "OLD-1")]
    assert changes[0].product["title"] == "Zorblax lantern 1" and changes[0].product["attributes"] == {"colour": "red"}
    assert shoprank(["catalogue", "sync", str(good), *overrides]) == 0
    assert "7 products put, 1 deleted" in capsys.readouterr().out
    assert [c.op for c in store.catalogue_changes(8)] == ["put"] * 7 + ["delete"]
    store.close()

    writer = SqliteEventStore(database, writer=True)
    try:
        assert shoprank(["catalogue", "sync", str(good), *overrides]) == 2
        assert "the Serve app is writing to it" in capsys.readouterr().err
    finally:
        writer.close()


def live_product(product_id: str, **changes: Any) -> dict[str, Any]:
    return {"product_id": product_id, "title": "Qwuxle skillet", "description": "Cast iron.",
            "category": "Kitchen > Cookware", "brand": "Acme", "price": 42.0, "attributes": {"size": "26 cm"},
            **changes}


def logged_changes(app: App) -> int:
    store = open_event_store(app.db)
    try:
        return len(store.catalogue_changes(0))
    finally:
        store.close()


def test_products_put_and_deleted_through_the_api(fake_app: App) -> None:
    """A put is stored once per Idempotency-Key and known to every ingress replica's /events at once; a delete is
    idempotent, an id never listed is a 404, and events naming a deleted product are still accepted (a late click on
    a withdrawn listing is real behaviour)."""
    before = logged_changes(fake_app)
    batch = [live_product("API-LIVE-1"), live_product("API-LIVE-2", brand=None, attributes={})]
    put = fake_app.http.put("/products", json=batch, headers={"Idempotency-Key": "api-test-batch-1"})
    assert put.status_code == 200, put.text
    assert put.json()["stored"] == 2 and put.json()["seq"] >= before + 2
    again = fake_app.http.put("/products", json=batch, headers={"Idempotency-Key": "api-test-batch-1"})
    assert again.status_code == 200 and again.json()["stored"] == 0
    assert logged_changes(fake_app) == before + 2
    for _ in range(4):  # either ingress replica: the one that did not store it reads the log on the miss
        event = fake_app.post("/events", [{"user_id": "U000001", "product_id": "API-LIVE-1", "event_type": "view"}])
        assert event.status_code == 200, event.text
    deleted = fake_app.http.delete("/products/API-LIVE-1")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True, deleted.text
    retried = fake_app.http.delete("/products/API-LIVE-1")
    assert retried.status_code == 200 and retried.json()["deleted"] is False
    assert fake_app.post("/events", [{"user_id": "U000001", "product_id": "API-LIVE-1",
                                      "event_type": "click"}]).status_code == 200
    missing = fake_app.http.delete("/products/NEVER-LISTED-1")
    assert missing.status_code == 404 and missing.json()["detail"][0]["loc"] == ["path", "product_id"]
    assert logged_changes(fake_app) == before + 3
    fake_app.http.delete("/products/API-LIVE-2")


MANY = [{"product_id": f"BULK-{i:05d}", "title": "t", "price": 1} for i in range(10_000)]
"""10,000 small products: under serve.max_body_bytes, past MAX_PRODUCTS_PER_REQUEST."""
HUGE = [live_product(f"HUGE-{i:04d}", description="x" * 2500) for i in range(1000)]
"""1000 products of 2.5 KB: past serve.max_body_bytes."""


@pytest.mark.parametrize(("body", "status", "loc", "message"), [
    ([{"title": "Pan", "price": 3}], 422, ["body", 0, "product_id"], "Field required"),
    ([live_product("BAD-1"), live_product("BAD-2", price="cheap")], 422, ["body", 1, "price"], "valid number"),
    ([live_product("BAD-1", price=-1)], 422, ["body", 0, "price"], "greater than or equal to 0"),
    ([live_product("BAD-1", title="   ")], 422, ["body", 0, "title"], "title is required"),
    ([live_product("BAD-1"), live_product("BAD-1")], 422, ["body", 1, "product_id"], "given twice in this request"),
    ([live_product("BAD-1", title="Pan\x07")], 422, ["body", 0, "title"], "control character"),
    ([live_product("BAD-1", attributes={"size": "26\x00"})], 422, ["body", 0, "attributes"], "control character"),
    ([live_product("BAD-1", colour="red")], 422, ["body", 0, "colour"], "Extra inputs"),
    (MANY, 422, ["body"], f"at most {MAX_PRODUCTS_PER_REQUEST} items"),
    (HUGE, 413, ["body"], "send fewer items per request"),
], ids=["no-id", "price-text", "price-negative", "blank-title", "duplicate-id", "control-character",
        "attribute-nul", "unknown-field", "10000-products", "too-large"])
def test_bad_product_batches_are_refused_naming_the_problem(fake_app: App, body: list[dict], status: int,
                                                            loc: list, message: str) -> None:
    before = logged_changes(fake_app)
    answer = fake_app.http.put("/products", json=body)
    assert answer.status_code == status, answer.text
    problem = answer.json()["detail"][0]
    assert problem["loc"] == loc and message in problem["msg"], problem
    assert logged_changes(fake_app) == before, "a refused batch changes nothing"
    assert fake_app.post("/events", [{"user_id": "U000001", "product_id": "BAD-1",
                                      "event_type": "view"}]).status_code == 422


def test_the_next_ingest_folds_the_catalogue_log(tiny_run: tuple[Config, Run], make_tiny_config: Callable[..., Config],
                                                 tmp_path: Path) -> None:
    """A pipeline run after catalogue changes ingests again (the log's last change is part of the stage's identity):
    the put product is in its catalogue as preprocess normalises it, the changed price is the new one, the deleted
    product is gone with the events naming it (counted), and the change folded up to is recorded."""
    session_config, session = tiny_run
    shutil.copytree(Path(session.path()).parent / "secrets", tmp_path / "secrets")
    config = make_tiny_config(tmp_path)
    unchanged = stage_hash(config, "ingest")
    base = read_table(session, "data", "records", "products")
    events = read_table(session, "data", "records", "events", columns=["product_id"]).column("product_id").to_pylist()
    withdrawn = max(set(events), key=events.count)
    changed = next(p for p in base.column("product_id").to_pylist() if p != withdrawn)
    row = next(r for r in base.to_pylist() if r["product_id"] == changed)
    store = open_event_store(event_db_location(config))
    try:
        store.change_catalogue([{**row, "attributes": dict(row["attributes"]), "price": 1234.5},
                                live_product("LIVE-NEW", title="  Qwuxle   SKILLET ")], [withdrawn],
                               dt.datetime.now(dt.timezone.utc), "fold-test")
    finally:
        store.close()
    assert stage_hash(config, "ingest") != unchanged
    run = run_stages(config, until="preprocess")
    products = {p["product_id"]: p for p in read_table(run, "data", "products").to_pylist()}
    assert withdrawn not in products and products[changed]["price"] == 1234.5
    assert products["LIVE-NEW"]["title"] == "qwuxle skillet" and products["LIVE-NEW"]["leaf"] == "cookware"
    assert len(products) == base.num_rows  # one added, one deleted
    after = read_table(run, "data", "records", "events", columns=["product_id"]).column("product_id").to_pylist()
    assert withdrawn not in after and len(after) == len(events) - events.count(withdrawn)
    stage = run.manifest()["stages"]["ingest"]
    assert stage["drops"]["events_of_withdrawn_products"] == events.count(withdrawn) > 0
    assert stage["drops"]["products_deleted_by_the_catalogue_log"] == 1
    assert stage["metrics"][CATALOGUE_SEQ] == 3 == recorded_catalogue_seq(run)


def test_catalogue_sync_through_the_app_sends_batches_that_fit_a_request(fake_app: App, tmp_path: Path) -> None:
    """``--app``: batches of at most MAX_PRODUCTS_PER_REQUEST products and under serve.max_body_bytes; a product
    deleted, put back and deleted again is deleted both times (each sync's batches have ids of their own); a row
    the app's request model refuses stops the sync before anything is sent."""
    rows = [live_product(f"SYNC-{i:04d}", description="y" * 900) for i in range(2400)]  # about 2.4 MB: 3 batches
    before = logged_changes(fake_app)
    client = ServeClient(fake_app.url, fake_app.keys["admin"])
    try:
        deleted, seq = sync_through_app(client, fake_app.config.serve.max_body_bytes, rows, [])
        assert deleted == 0 and seq >= before + 2400 and logged_changes(fake_app) == before + 2400
        assert sync_through_app(client, fake_app.config.serve.max_body_bytes, [], ["SYNC-0000"])[0] == 1
        assert sync_through_app(client, fake_app.config.serve.max_body_bytes, rows[:1], [])[0] == 0
        assert sync_through_app(client, fake_app.config.serve.max_body_bytes, [], ["SYNC-0000"])[0] == 1
        assert logged_changes(fake_app) == before + 2403
        refused = [live_product("SYNC-OK"), live_product("SYNC-BAD", description="two\u0007lines")]
        with pytest.raises(DataError, match="product 'SYNC-BAD', field 'description': .*nothing was sent"):
            sync_through_app(client, fake_app.config.serve.max_body_bytes, refused, [])
        assert logged_changes(fake_app) == before + 2403, "nothing of a sync with a refused row was sent"
    finally:
        store = open_event_store(fake_app.db)  # the shop answers as before for the tests after this one
        store.change_catalogue([], [r["product_id"] for r in rows[1:]], dt.datetime.now(dt.timezone.utc), "sync-test")
        store.close()
        client.close()
