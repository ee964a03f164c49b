"""The real-format fixtures of :mod:`shapes` through the real readers, and the derived event fields.

Fast and without Ray: each fixture's ``--set`` overrides become a config, the reader
turns its files into record tables, and the tables are checked against what the
files say (counts per locale, labels, ratings mapped to event types, sessions).
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, get_args

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from shapes import (
    ESCI_JUDGED_PER_QUERY,
    ESCI_LOCALES,
    ESCI_PRODUCTS_PER_LOCALE,
    ESCI_QUERIES_PER_LOCALE,
    JSONL_LIST_SIZE,
    JSONL_PRODUCTS,
    RATING_EVENT_TYPES,
    SESSION_GAP_MINUTES,
    write_esci,
    write_jsonl_shop,
    write_ratings,
)

from shoprank.config import EventsFile, EventTypeName, FilesConfig, SourceConfig, TableFile, load_config
from shoprank.data.readers import SourceTables, read_esci, read_files, read_table
from shoprank.data.schema import ESCI_LABELS, EVENT_SCHEMA, EVENT_TYPES, JUDGMENT_SCHEMA, PRODUCT_SCHEMA
from shoprank.errors import ConfigError, DataError


def _source(overrides: list[str]) -> SourceConfig:
    return load_config(None, overrides).source


def _read(overrides: list[str]) -> SourceTables:
    source = _source(overrides)
    if source.kind == "esci":
        return read_esci(source.esci)
    assert source.files is not None
    return read_files(source.files)


def _assert_schemas(tables: SourceTables) -> None:
    assert tables.products.schema == PRODUCT_SCHEMA
    assert tables.events.schema == EVENT_SCHEMA
    assert tables.judgments.schema == JUDGMENT_SCHEMA


def test_config_event_types_are_the_schemas() -> None:
    assert get_args(EventTypeName) == EVENT_TYPES


# ------------------------------------------------------------------------------ ESCI


def test_esci_fixture_has_the_public_layout(tmp_path: Path) -> None:
    write_esci(tmp_path)
    examples = pq.read_table(tmp_path / "shopping_queries_dataset_examples.parquet")
    products = pq.read_table(tmp_path / "shopping_queries_dataset_products.parquet")
    assert [(f.name, str(f.type)) for f in examples.schema] == [
        ("example_id", "int64"), ("query", "string"), ("query_id", "int64"), ("product_id", "string"),
        ("product_locale", "string"), ("esci_label", "string"), ("small_version", "int64"),
        ("large_version", "int64"), ("split", "string"),
    ]
    assert [(f.name, str(f.type)) for f in products.schema] == [
        (name, "string") for name in (
            "product_id", "product_title", "product_description", "product_bullet_point",
            "product_brand", "product_color", "product_locale",
        )
    ]
    assert set(examples.column("esci_label").to_pylist()) == set(ESCI_LABELS)
    assert set(examples.column("split").to_pylist()) == {"train", "test"}
    assert Counter(products.column("product_locale").to_pylist()) == ESCI_PRODUCTS_PER_LOCALE
    for column in ("product_description", "product_bullet_point", "product_brand", "product_color"):
        assert products.column(column).null_count > 0, column  # nulls, as in the real data
    ids = defaultdict(set)
    for row in products.to_pylist():
        ids[row["product_locale"]].add(row["product_id"])
    assert ids["us"] & ids["es"] and ids["us"] & ids["jp"]  # one ASIN, two markets
    titles = {row["product_locale"]: row["product_title"] for row in products.to_pylist()}
    assert re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", titles["jp"])
    write_esci(tmp_path / "again")
    again = pq.read_table(tmp_path / "again" / "shopping_queries_dataset_examples.parquet")
    assert again.equals(examples)  # deterministic


@pytest.mark.parametrize("locale", ESCI_LOCALES)
def test_esci_each_locale(tmp_path: Path, locale: str) -> None:
    overrides = write_esci(tmp_path, locale=locale)
    tables = _read(overrides)
    _assert_schemas(tables)
    assert tables.events.num_rows == 0
    assert tables.products.num_rows == ESCI_PRODUCTS_PER_LOCALE[locale]
    assert tables.judgments.num_rows == ESCI_QUERIES_PER_LOCALE[locale] * ESCI_JUDGED_PER_QUERY
    assert pc.count_distinct(tables.judgments.column("query_id")).as_py() == ESCI_QUERIES_PER_LOCALE[locale]
    assert all(v == 0 for v in tables.drops.values())

    written = [
        r for r in pq.read_table(tmp_path / "shopping_queries_dataset_examples.parquet").to_pylist()
        if r["product_locale"] == locale
    ]
    assert tables.judgments.to_pylist() == [
        {"query_id": str(r["query_id"]), "query": r["query"], "product_id": r["product_id"],
         "label": ESCI_LABELS[r["esci_label"]]}
        for r in written
    ]
    assert {dict(a)["locale"] for a in tables.products.column("attributes").to_pylist()} == {locale}


def test_esci_all_locales(tmp_path: Path) -> None:
    tables = _read(write_esci(tmp_path, locale="all"))
    _assert_schemas(tables)
    assert tables.events.num_rows == 0
    product_ids = tables.products.column("product_id").to_pylist()
    assert len(set(product_ids)) == len(product_ids) == sum(ESCI_PRODUCTS_PER_LOCALE.values())
    assert Counter(p.split(":")[0] for p in product_ids) == ESCI_PRODUCTS_PER_LOCALE
    judged = Counter(p.split(":")[0] for p in tables.judgments.column("product_id").to_pylist())
    assert judged == {loc: n * ESCI_JUDGED_PER_QUERY for loc, n in ESCI_QUERIES_PER_LOCALE.items()}
    assert sorted(set(tables.judgments.column("label").to_pylist())) == [0, 1, 2, 3]
    assert all(v == 0 for v in tables.drops.values())


# --------------------------------------------------------------------------- ratings


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _expected_sessions(rows: list[dict[str, str]], gap_s: float) -> list[str]:
    """Sessions recomputed the plain way: per user, by time, a new one after more than the gap."""
    by_user: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        by_user[row["user"]].append(index)
    sessions = [""] * len(rows)
    for user, indices in by_user.items():
        indices.sort(key=lambda i: int(rows[i]["timestamp"]))
        start = previous = None
        for i in indices:
            ts = int(rows[i]["timestamp"])
            if previous is None or ts - previous > gap_s:
                start = ts
            previous = ts
            began = datetime.fromtimestamp(start, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
            sessions[i] = f"{user}@{began}.000000Z"
    return sessions


def test_ratings_become_events(tmp_path: Path) -> None:
    tables = _read(write_ratings(tmp_path))
    _assert_schemas(tables)
    rows = _csv_rows(tmp_path / "ratings.csv")
    events = tables.events
    assert events.num_rows == len(rows) and tables.judgments.num_rows == 0
    assert tables.drops == {"events_unknown_product": 0, "judgments_unknown_product": 0}
    assert events.column("user_id").to_pylist() == [r["user"] for r in rows]
    assert events.column("product_id").to_pylist() == [r["item"] for r in rows]
    assert events.column("event_type").to_pylist() == [RATING_EVENT_TYPES[r["rating"]] for r in rows]
    assert "view" not in events.column("event_type").to_pylist()
    assert [int(t.timestamp()) for t in events.column("ts").to_pylist()] == [int(r["timestamp"]) for r in rows]

    ids = events.column("event_id").to_pylist()
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)
    sessions = events.column("session_id").to_pylist()
    assert sessions == _expected_sessions(rows, SESSION_GAP_MINUTES * 60)
    assert 1 < len(set(sessions)) < len(rows)  # several sessions per user, several events per session
    assert tables.products.column("category").to_pylist()[0] == "Books > Mystery"


def test_derived_ids_are_stable(tmp_path: Path) -> None:
    """Same file, same ids; the same rows in another order keep their ids and sessions."""
    overrides = write_ratings(tmp_path)
    first = _read(overrides).events
    assert _read(overrides).events.equals(first)

    rows = _csv_rows(tmp_path / "ratings.csv")
    reordered = tmp_path / "ratings_by_time.csv"
    with reordered.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (int(r["timestamp"]), r["user"]), reverse=True))
    moved = _read(overrides + [f"source.files.events.path={json.dumps(str(reordered))}"]).events

    def keyed(table: pa.Table) -> dict[tuple[str, str], tuple[str, str]]:
        return {
            (r["user_id"], r["product_id"]): (r["event_id"], r["session_id"]) for r in table.to_pylist()
        }

    assert keyed(moved) == keyed(first)


def _ratings_with(tmp_path: Path, row: int, rating: str) -> tuple[list[str], Path]:
    """The ratings fixture with data row ``row`` (1-based) rated ``rating``."""
    overrides = write_ratings(tmp_path)
    path = tmp_path / "ratings.csv"
    rows = _csv_rows(path)
    rows[row - 1]["rating"] = rating
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return overrides, path


@pytest.mark.parametrize("bad", ["6", "4.5", "great"])
def test_unmapped_rating_names_file_column_row_value(tmp_path: Path, bad: str) -> None:
    overrides, path = _ratings_with(tmp_path, 37, bad)
    with pytest.raises(DataError) as info:
        _read(overrides)
    msg = str(info.value)
    assert msg.startswith(f"file {path}, column 'rating', row 37:")
    assert repr(bad) in msg and "event_type.map" in msg and "'5', '4', '3', '2', '1'" in msg


def test_missing_rating_names_row(tmp_path: Path) -> None:
    overrides, path = _ratings_with(tmp_path, 5, "")
    with pytest.raises(DataError) as info:
        _read(overrides)
    assert str(info.value).startswith(f"file {path}, column 'rating', row 5:")
    assert "no value" in str(info.value)


def test_event_type_column_missing_from_file(tmp_path: Path) -> None:
    overrides = write_ratings(tmp_path) + ['source.files.events.event_type={column: stars, map: {"5": purchase}}']
    with pytest.raises(DataError) as info:
        _read(overrides)
    msg = str(info.value)
    assert str(tmp_path / "ratings.csv") in msg and "'stars'" in msg and "event_type.column" in msg
    assert "user, item, rating, timestamp" in msg


def test_constant_event_type(tmp_path: Path) -> None:
    overrides = write_ratings(tmp_path) + ["source.files.events.event_type={value: click}"]
    events = _read(overrides).events
    assert set(events.column("event_type").to_pylist()) == {"click"}


# ----------------------------------------------------------- derivation on small files

RATINGS_HEADER = "user,item,rating,timestamp\n"
CATALOG = "product_id,title,category,price\na,A,c,1\nb,B,c,2\n"


def _events(tmp_path: Path, body: str, **derive: Any) -> pa.Table:
    (tmp_path / "p.csv").write_text(CATALOG)
    (tmp_path / "r.csv").write_text(RATINGS_HEADER + body)
    files = FilesConfig(
        products=TableFile(path=str(tmp_path / "p.csv")),
        events=EventsFile(
            path=str(tmp_path / "r.csv"),
            columns={"user_id": "user", "product_id": "item", "ts": "timestamp"},
            **derive,
        ),
    )
    return read_files(files).events


DERIVE_ALL: dict[str, Any] = {
    "event_type": {"value": "purchase"}, "event_id": "hash", "session_id": {"gap_minutes": 30},
}


def test_exact_repeats_get_numbered_ids(tmp_path: Path) -> None:
    body = "u,a,5,1767225600\nu,b,5,1767225600\nu,a,5,1767225600\nu,a,5,1767225600\n"
    ids = _events(tmp_path, body, **DERIVE_ALL).column("event_id").to_pylist()
    assert ids[2] == f"{ids[0]}-1" and ids[3] == f"{ids[0]}-2" and ids[1] != ids[0]
    assert len(set(ids)) == 4


def test_session_gap_is_exclusive_and_per_user(tmp_path: Path) -> None:
    t0 = 1767225600
    body = "".join(
        f"{user},a,5,{t0 + offset}\n"
        for user, offset in [("u", 0), ("u", 1800), ("u", 3601), ("v", 1800), ("u", 3601 + 60)]
    )
    sessions = _events(tmp_path, body, **DERIVE_ALL).column("session_id").to_pylist()
    assert sessions == [
        "u@2026-01-01T00:00:00.000000Z",  # 30 minutes later is still the same visit
        "u@2026-01-01T00:00:00.000000Z",
        "u@2026-01-01T01:00:01.000000Z",  # 30 minutes and a second later is not
        "v@2026-01-01T00:30:00.000000Z",
        "u@2026-01-01T01:00:01.000000Z",
    ]


def test_derived_field_ignores_same_named_column(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "p.csv").write_text(CATALOG)
    (tmp_path / "r.csv").write_text("user,item,timestamp,event_id\nu,a,1767225600,x1\nu,b,1767225660,x2\n")
    files = FilesConfig(
        products=TableFile(path=str(tmp_path / "p.csv")),
        events=EventsFile(
            path=str(tmp_path / "r.csv"),
            columns={"user_id": "user", "product_id": "item", "ts": "timestamp"},
            **DERIVE_ALL,
        ),
    )
    with caplog.at_level(logging.WARNING, logger="shoprank.data.readers"):
        events = read_files(files).events
    assert "x1" not in events.column("event_id").to_pylist()
    assert "column 'event_id' is ignored" in caplog.text


def test_without_derivation_the_columns_stay_required(tmp_path: Path) -> None:
    (tmp_path / "r.csv").write_text(RATINGS_HEADER + "u,a,5,1767225600\n")
    spec = EventsFile(path=str(tmp_path / "r.csv"), columns={"user_id": "user", "product_id": "item", "ts": "timestamp"})
    with pytest.raises(DataError) as info:
        read_table(spec, "events")
    assert "missing column 'event_id' for record field 'event_id' (required)" in str(info.value)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("source.files.events.event_type.colum=rating",
         "source.files.events.event_type.colum: unknown key; allowed keys here: column, map, value"),
        ("source.files.products.session_id.gap_minutes=30",
         "source.files.products.session_id: unknown key; allowed keys here: columns, format, path"),
        ("source.files.events.event_type={value: click, column: rating}", "set either `value`"),
        ("source.files.events.event_type={column: rating}", "needs a non-empty `map`"),
        ("source.files.events.event_type={column: rating, map: {5: like}}",
         "source.files.events.event_type.map.5: Input should be 'view', 'click', 'add_to_cart' or 'purchase'"),
        ("source.files.events.event_id=uuid", "source.files.events.event_id: Input should be 'hash'"),
        ("source.files.events.session_id.gap_minutes=0", "greater than 0"),
        ("source.files.events.columns={session_id: visit}",
         "session_id is both derived (`session_id:`) and read from a column (`columns.session_id`)"),
    ],
)
def test_config_rejects_bad_derivations(tmp_path: Path, override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*write_ratings(tmp_path), override])
    assert expected in str(info.value)


def test_map_keys_are_text(tmp_path: Path) -> None:
    rule = _source(
        write_ratings(tmp_path) + ["source.files.events.event_type={column: rating, map: {5: purchase, 1.5: click}}"]
    ).files.events.event_type  # type: ignore[union-attr]
    assert rule is not None and rule.map == {"5": "purchase", "1.5": "click"}


# ------------------------------------------------------------------------ JSON Lines


def test_jsonl_shop(tmp_path: Path) -> None:
    tables = _read(write_jsonl_shop(tmp_path))
    _assert_schemas(tables)
    assert tables.products.num_rows == JSONL_PRODUCTS
    assert tables.drops == {"events_unknown_product": 0, "judgments_unknown_product": 0}
    events = tables.events
    written = (tmp_path / "events.jsonl").read_text().splitlines()
    assert events.num_rows == len(written)
    types = Counter(events.column("event_type").to_pylist())
    assert set(types) == set(EVENT_TYPES) and types["view"] > types["click"] > types["purchase"]
    assert events.column("event_id").to_pylist()[0] == "ev-00000"  # the file's own ids and sessions
    assert len(set(events.column("session_id").to_pylist())) * JSONL_LIST_SIZE == types["view"]
    views = events.filter(pc.equal(events.column("event_type"), "view"))
    assert set(views.column("position").to_pylist()) == set(range(1, JSONL_LIST_SIZE + 1))
    assert events.column("query").null_count > 0 and events.column("query").null_count < events.num_rows
    assert tables.judgments.num_rows > 100
    assert sorted(set(tables.judgments.column("label").to_pylist())) == [0, 1, 2, 3]
    assert dict(tables.products.column("attributes")[0].as_py()).keys() == {"color", "material"}
