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
from shoprank.cli import main
from shoprank.config import Config, load_config
from shoprank.data.catalogue import CATALOGUE_SEQ, read_changes, recorded_catalogue_seq
from shoprank.data.io import read_table
from shoprank.errors import DataError
from shoprank.serving.api import MAX_PRODUCTS_PER_REQUEST
from shoprank.stages import run_stages, stage_hash
from shoprank.store.events import SqliteEventStore, event_db_location, open_event_store
from shoprank.store.run import Run

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
    """A bad row 7 stores nothing and says where it is; the good file is stored whole; the same file again stores
    nothing; while the Serve app writes the SQLite store, a direct sync is refused (send it through the app)."""
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
    assert "stored before: nothing changed" in capsys.readouterr().out
    assert len(store.catalogue_changes(0)) == 8
    store.close()

    writer = SqliteEventStore(database, writer=True)
    try:
        assert shoprank(["catalogue", "sync", str(good), *overrides]) == 2
        assert "the Serve app is writing to it" in capsys.readouterr().err
    finally:
        writer.close()
