"""Tests of the file and ESCI readers: exact schemas out, row-precise errors for bad input."""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shoprank.config import EsciConfig, FilesConfig, SourceConfig, TableFile, load_config
from shoprank.data.readers import (
    EsciReader,
    FilesReader,
    SourceTables,
    read_esci,
    read_files,
    read_table,
    reader_for,
    validate_source,
)
from shoprank.data.schema import EVENT_SCHEMA, JUDGMENT_SCHEMA, PRODUCT_SCHEMA
from shoprank.errors import ConfigError, DataError
from shoprank.privacy import Pseudonyms

UTC = timezone.utc

# ------------------------------------------------------------------ catalog + events

PRODUCT_MAP = {"product_id": "sku", "title": "name"}
EVENT_MAP = {"product_id": "item", "ts": "timestamp", "event_type": "type"}

PRODUCT_ROWS: list[dict[str, Any]] = [
    {"sku": " P-001 ", "name": "Red Mug ", "description": "A mug.", "category": "Kitchen",
     "brand": "Acme", "price": 12.5, "attributes": {"color": "red"}},
    {"sku": "P-002", "name": "Blue Pen", "description": "", "category": "Office",
     "brand": "", "price": 1.0, "attributes": None},
    {"sku": "P-003", "name": "Lamp", "description": "Bright\nlamp", "category": "Home",
     "brand": "Lumo", "price": 30.0, "attributes": {"watts": 40}},
]
EXPECTED_PRODUCTS = [
    {"product_id": "P-001", "title": "Red Mug", "description": "A mug.", "category": "Kitchen",
     "brand": "Acme", "price": 12.5, "attributes": [("color", "red")]},
    {"product_id": "P-002", "title": "Blue Pen", "description": None, "category": "Office",
     "brand": None, "price": 1.0, "attributes": []},
    {"product_id": "P-003", "title": "Lamp", "description": "Bright\nlamp", "category": "Home",
     "brand": "Lumo", "price": 30.0, "attributes": [("watts", "40")]},
]

EPOCH = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp())
# (file value as text, value as JSON, value for a Parquet timestamp column, expected)
TS = [
    ("2026-01-02T10:00:00Z", "2026-01-02T10:00:00Z", datetime(2026, 1, 2, 10), datetime(2026, 1, 2, 10, tzinfo=UTC)),
    ("2026-01-02 10:00:05", "2026-01-02 10:00:05", datetime(2026, 1, 2, 10, 0, 5), datetime(2026, 1, 2, 10, 0, 5, tzinfo=UTC)),
    ("2026-01-03T12:00:00+02:00", "2026-01-03T12:00:00+02:00", datetime(2026, 1, 3, 10), datetime(2026, 1, 3, 10, tzinfo=UTC)),
    (str(EPOCH), EPOCH, datetime(2026, 1, 1), datetime(2026, 1, 1, tzinfo=UTC)),
]
EVENT_ROWS: list[dict[str, Any]] = [
    {"event_id": "e1", "user_id": "u1", "session_id": "s1", "item": "P-001", "type": "view", "query": "mug", "position": 1},
    {"event_id": "e2", "user_id": "u1", "session_id": "s1", "item": "P-001", "type": "click", "query": "mug", "position": 1},
    {"event_id": "e3", "user_id": "u2", "session_id": "s2", "item": "P-003", "type": "purchase", "query": None, "position": None},
    {"event_id": "e4", "user_id": "u2", "session_id": "s2", "item": "P-002", "type": "add_to_cart", "query": None, "position": None},
]
EXPECTED_EVENTS = [
    {"event_id": r["event_id"], "user_id": r["user_id"], "session_id": r["session_id"],
     "product_id": r["item"], "event_type": r["type"], "ts": ts[3], "query": r["query"],
     "position": r["position"], "request_id": None, "variant": None, "quantity": None}
    for r, ts in zip(EVENT_ROWS, TS)
]


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        value = json.dumps(value)
    text = str(value)
    if any(c in text for c in ',"\n'):
        text = '"' + text.replace('"', '""') + '"'
    return text


def write_csv(path: Path, rows: list[dict[str, Any]], header: list[str] | None = None) -> Path:
    header = header or list(rows[0])
    lines = [",".join(header)] + [",".join(_csv_cell(r.get(h)) for h in header) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_catalog(tmp_path: Path, fmt: str) -> tuple[TableFile, TableFile]:
    """The same catalog and events in ``fmt``, with non-record column names."""
    if fmt == "csv":
        products = write_csv(tmp_path / "products.csv", PRODUCT_ROWS)
        events = write_csv(
            tmp_path / "events.csv",
            [dict(r, timestamp=ts[0]) for r, ts in zip(EVENT_ROWS, TS)],
        )
    elif fmt == "jsonl":
        products = write_jsonl(tmp_path / "products.jsonl", PRODUCT_ROWS)
        events = write_jsonl(
            tmp_path / "events.ndjson",
            [dict(r, timestamp=ts[1]) for r, ts in zip(EVENT_ROWS, TS)],
        )
    else:  # parquet: attributes as a struct column, ts as a naive timestamp column
        products = tmp_path / "products.parquet"
        pq.write_table(pa.Table.from_pylist(PRODUCT_ROWS), products)
        events = tmp_path / "events.pq"
        pq.write_table(
            pa.Table.from_pylist([dict(r, timestamp=ts[2]) for r, ts in zip(EVENT_ROWS, TS)]),
            events,
        )
    return (
        TableFile(path=str(products), columns=PRODUCT_MAP),
        TableFile(path=str(events), columns=EVENT_MAP),
    )


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_round_trip_with_column_mapping(tmp_path: Path, fmt: str) -> None:
    products, events = write_catalog(tmp_path, fmt)
    source = read_files(FilesConfig(products=products, events=events))

    assert isinstance(source, SourceTables)
    assert source.products.schema == PRODUCT_SCHEMA
    assert source.events.schema == EVENT_SCHEMA
    assert source.judgments.schema == JUDGMENT_SCHEMA
    assert source.products.equals(pa.Table.from_pylist(EXPECTED_PRODUCTS, schema=PRODUCT_SCHEMA))
    assert source.events.to_pylist() == EXPECTED_EVENTS
    assert source.events.equals(pa.Table.from_pylist(EXPECTED_EVENTS, schema=EVENT_SCHEMA))
    assert source.judgments.num_rows == 0
    assert source.drops == {"events_unknown_product": 0, "judgments_unknown_product": 0}


def test_judgments_file_and_explicit_format(tmp_path: Path) -> None:
    products, events = write_catalog(tmp_path, "csv")
    judgments = write_csv(
        tmp_path / "judgments.txt",
        [
            {"qid": 7, "query": " red mug ", "product_id": "P-001", "label": 3},
            {"qid": 7, "query": "red mug", "product_id": "P-002", "label": 0},
        ],
    )
    source = read_files(
        FilesConfig(
            products=products,
            events=events,
            judgments=TableFile(path=str(judgments), format="csv", columns={"query_id": "qid"}),
        )
    )
    assert source.judgments.schema == JUDGMENT_SCHEMA
    assert source.judgments.to_pylist() == [
        {"query_id": "7", "query": "red mug", "product_id": "P-001", "label": 3},
        {"query_id": "7", "query": "red mug", "product_id": "P-002", "label": 0},
    ]


def test_products_without_optional_columns_get_defaults(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "p.csv",
        [{"product_id": "a", "title": "A", "category": "c", "price": "2"}],
    )
    table = read_table(TableFile(path=str(path)), "products")
    assert table.schema == PRODUCT_SCHEMA
    assert table.to_pylist() == [
        {"product_id": "a", "title": "A", "description": None, "category": "c",
         "brand": None, "price": 2.0, "attributes": []}
    ]


# ------------------------------------------------------------------------------ ESCI

ESCI_PRODUCTS = [
    {"product_id": "B001", "product_title": "Mug", "product_description": "Big mug",
     "product_bullet_point": "Dishwasher safe", "product_brand": "Acme",
     "product_color": "red", "product_locale": "us"},
    {"product_id": "B002", "product_title": "Pen", "product_description": None,
     "product_bullet_point": "Blue ink", "product_brand": None,
     "product_color": None, "product_locale": "us"},
    {"product_id": "B003", "product_title": "Lamp", "product_description": None,
     "product_bullet_point": None, "product_brand": "Lumo",
     "product_color": "white", "product_locale": "us"},
    {"product_id": "B001", "product_title": "Taza", "product_description": "Taza grande",
     "product_bullet_point": None, "product_brand": "Acme",
     "product_color": "rojo", "product_locale": "es"},
    {"product_id": "B004", "product_title": "Lápiz", "product_description": "",
     "product_bullet_point": "", "product_brand": None,
     "product_color": None, "product_locale": "es"},
]
ESCI_EXAMPLES = [
    # (query_id, query, product_id, locale, label)
    (1, "mug", "B001", "us", "E"),
    (1, "mug", "B002", "us", "I"),
    (3, "taza", "B001", "es", "E"),
    (1, "mug", "B003", "us", "C"),
    (2, "pen", "B002", "us", "E"),
    (2, "pen", "B999", "us", "S"),  # judged product missing from the catalog
    (3, "taza", "B004", "es", "S"),
]


def write_esci(tmp_path: Path, examples: list[tuple[Any, ...]] = ESCI_EXAMPLES,
               products: list[dict[str, Any]] = ESCI_PRODUCTS,
               drop_column: str | None = None) -> tuple[str, str]:
    """Both ESCI parquet files, in the public data set's column layout."""
    ex = pa.table(
        {
            "example_id": list(range(len(examples))),
            "query": [e[1] for e in examples],
            "query_id": pa.array([e[0] for e in examples], pa.int64()),
            "product_id": [e[2] for e in examples],
            "product_locale": [e[3] for e in examples],
            "esci_label": [e[4] for e in examples],
            "small_version": [1] * len(examples),
            "large_version": [1] * len(examples),
            "split": ["train"] * len(examples),
        }
    )
    pr = pa.Table.from_pylist(products, schema=pa.schema([(c, pa.string()) for c in products[0]]))
    if drop_column is not None:
        ex = ex.drop_columns([drop_column]) if drop_column in ex.column_names else ex
        pr = pr.drop_columns([drop_column]) if drop_column in pr.column_names else pr
    ex_path = tmp_path / "shopping_queries_dataset_examples.parquet"
    pr_path = tmp_path / "shopping_queries_dataset_products.parquet"
    pq.write_table(ex, ex_path)
    pq.write_table(pr, pr_path)
    return str(ex_path), str(pr_path)


def _esci(tmp_path: Path, locale: str, **kw: Any) -> SourceTables:
    ex, pr = write_esci(tmp_path, **kw)
    return read_esci(EsciConfig(examples_path=ex, products_path=pr, locale=locale))


def _without_price(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    assert all(math.isnan(r["price"]) for r in rows)
    return [{k: v for k, v in r.items() if k != "price"} for r in rows]


def test_esci_single_locale(tmp_path: Path) -> None:
    source = _esci(tmp_path, "us")
    assert source.products.schema == PRODUCT_SCHEMA
    assert source.events.schema == EVENT_SCHEMA and source.events.num_rows == 0
    assert source.judgments.schema == JUDGMENT_SCHEMA
    assert source.judgments.to_pylist() == [
        {"query_id": "1", "query": "mug", "product_id": "B001", "label": 3},
        {"query_id": "1", "query": "mug", "product_id": "B002", "label": 0},
        {"query_id": "1", "query": "mug", "product_id": "B003", "label": 1},
        {"query_id": "2", "query": "pen", "product_id": "B002", "label": 3},
    ]
    assert _without_price(source.products.to_pylist()) == [
        {"product_id": "B001", "title": "Mug", "description": "Big mug\nDishwasher safe",
         "category": None, "brand": "Acme",
         "attributes": [("color", "red"), ("locale", "us")]},
        {"product_id": "B002", "title": "Pen", "description": "Blue ink",
         "category": None, "brand": None, "attributes": [("locale", "us")]},
        {"product_id": "B003", "title": "Lamp", "description": None,
         "category": None, "brand": "Lumo",
         "attributes": [("color", "white"), ("locale", "us")]},
    ]
    assert source.drops["judgments_unknown_product"] == 1  # B999
    assert source.drops["events_unknown_product"] == 0


def test_esci_locale_filter_and_all(tmp_path: Path) -> None:
    es = _esci(tmp_path, "es")
    assert es.products.column("product_id").to_pylist() == ["B001", "B004"]
    assert es.products.column("title").to_pylist() == ["Taza", "Lápiz"]
    assert es.products.column("description").to_pylist() == ["Taza grande", None]
    assert es.judgments.to_pylist() == [
        {"query_id": "3", "query": "taza", "product_id": "B001", "label": 3},
        {"query_id": "3", "query": "taza", "product_id": "B004", "label": 2},
    ]
    assert es.drops["judgments_unknown_product"] == 0

    both = _esci(tmp_path, "all")
    assert both.products.column("product_id").to_pylist() == [
        "us:B001", "us:B002", "us:B003", "es:B001", "es:B004"
    ]
    assert both.judgments.column("product_id").to_pylist() == [
        "us:B001", "us:B002", "es:B001", "us:B003", "us:B002", "es:B004"
    ]
    assert sorted(set(both.judgments.column("label").to_pylist())) == [0, 1, 2, 3]
    assert both.drops["judgments_unknown_product"] == 1


def test_esci_unknown_label_names_row(tmp_path: Path) -> None:
    examples = list(ESCI_EXAMPLES) + [(3, "taza", "B001", "es", "X")]  # data row 8
    with pytest.raises(DataError) as info:
        _esci(tmp_path, "es", examples=examples)
    msg = str(info.value)
    assert "shopping_queries_dataset_examples.parquet" in msg
    assert "'esci_label'" in msg and "row 8" in msg and "'X'" in msg


@pytest.mark.parametrize("column", ["esci_label", "product_title"])
def test_esci_missing_column(tmp_path: Path, column: str) -> None:
    with pytest.raises(DataError) as info:
        _esci(tmp_path, "us", drop_column=column)
    msg = str(info.value)
    assert f"'{column}'" in msg and "missing column" in msg and "the file has columns" in msg
    expected_file = "examples" if column == "esci_label" else "products"
    assert f"shopping_queries_dataset_{expected_file}.parquet" in msg


# ------------------------------------------------------------------------ bad inputs

GOOD_PRODUCTS = [
    {"product_id": "a", "title": "A", "category": "c", "price": "1.5"},
    {"product_id": "b", "title": "B", "category": "c", "price": "2"},
    {"product_id": "c", "title": "C", "category": "c", "price": "3"},
]
GOOD_EVENTS = [
    {"event_id": "e1", "user_id": "u", "session_id": "s", "product_id": "a",
     "event_type": "view", "ts": "2026-01-01T00:00:00Z"},
    {"event_id": "e2", "user_id": "u", "session_id": "s", "product_id": "b",
     "event_type": "click", "ts": "2026-01-01T00:01:00Z"},
    {"event_id": "e3", "user_id": "u", "session_id": "s", "product_id": "c",
     "event_type": "purchase", "ts": "2026-01-01T00:02:00Z"},
]


def _error(spec: TableFile, kind: str) -> str:
    with pytest.raises(DataError) as info:
        read_table(spec, kind)  # type: ignore[arg-type]
    return str(info.value)


def test_missing_required_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "p.csv", [{k: v for k, v in r.items() if k != "price"} for r in GOOD_PRODUCTS])
    msg = _error(TableFile(path=str(path)), "products")
    assert str(path) in msg and "'price'" in msg and "missing column" in msg
    assert "the file has columns: product_id, title, category" in msg


def test_missing_mapped_column_names_field_and_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "p.csv", GOOD_PRODUCTS)
    msg = _error(TableFile(path=str(path), columns={"product_id": "sku"}), "products")
    assert str(path) in msg and "'sku'" in msg and "'product_id'" in msg
    assert "columns.product_id" in msg and "product_id, title, category, price" in msg


def test_unknown_mapping_key(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "p.csv", GOOD_PRODUCTS)
    msg = _error(TableFile(path=str(path), columns={"prodct_id": "sku"}), "products")
    assert "'prodct_id'" in msg and "product_id" in msg


def test_wrong_type_price_names_row_column_value(tmp_path: Path) -> None:
    rows = [dict(r) for r in GOOD_PRODUCTS]
    rows[2]["price"] = "abc"
    path = write_csv(tmp_path / "p.csv", rows)
    msg = _error(TableFile(path=str(path)), "products")
    assert msg.startswith(f"file {path}, column 'price', row 3:")
    assert "'abc'" in msg


def test_wrong_type_in_jsonl_names_row(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [dict(r, price=float(r["price"])) for r in GOOD_PRODUCTS]
    rows[1]["price"] = "abc"  # mixed types: Arrow's reader gives up, ours still names the row
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    msg = _error(TableFile(path=str(path)), "products")
    assert msg.startswith(f"file {path}, column 'price', row 2:") and "'abc'" in msg


def test_missing_required_value(tmp_path: Path) -> None:
    rows = [dict(r) for r in GOOD_PRODUCTS]
    rows[1]["title"] = "   "
    path = write_csv(tmp_path / "p.csv", rows)
    msg = _error(TableFile(path=str(path)), "products")
    assert msg.startswith(f"file {path}, column 'title', row 2:") and "required" in msg


def test_bad_ts(tmp_path: Path) -> None:
    rows = [dict(r) for r in GOOD_EVENTS]
    rows[1]["ts"] = "yesterday"
    rows = [dict((("when" if k == "ts" else k), v) for k, v in r.items()) for r in rows]
    path = write_csv(tmp_path / "e.csv", rows)
    msg = _error(TableFile(path=str(path), columns={"ts": "when"}), "events")
    assert msg.startswith(f"file {path}, column 'when', row 2:")
    assert "'yesterday'" in msg and "ISO-8601" in msg


def test_epoch_milliseconds_rejected(tmp_path: Path) -> None:
    rows = [dict(r) for r in GOOD_EVENTS]
    rows[2]["ts"] = str(EPOCH * 1000)
    path = write_csv(tmp_path / "e.csv", rows)
    msg = _error(TableFile(path=str(path)), "events")
    assert "column 'ts', row 3" in msg and "milliseconds" in msg


def test_bad_event_type_lists_allowed(tmp_path: Path) -> None:
    rows = [dict(r) for r in GOOD_EVENTS]
    rows[2]["event_type"] = "like"
    path = write_csv(tmp_path / "e.csv", rows)
    msg = _error(TableFile(path=str(path)), "events")
    assert msg.startswith(f"file {path}, column 'event_type', row 3:")
    assert "'like'" in msg and "view, click, add_to_cart, purchase" in msg


@pytest.mark.parametrize("bad", ["7", "x", "-1", "2.5"])
def test_label_out_of_range(tmp_path: Path, bad: str) -> None:
    rows = [
        {"query_id": "q", "query": "mug", "product_id": "a", "label": "3"},
        {"query_id": "q", "query": "mug", "product_id": "b", "label": bad},
    ]
    path = write_csv(tmp_path / "j.csv", rows)
    msg = _error(TableFile(path=str(path)), "judgments")
    assert msg.startswith(f"file {path}, column 'label', row 2:")
    assert repr(bad) in msg and "0..3" in msg


def test_duplicate_product_id_names_both_rows(tmp_path: Path) -> None:
    rows = [dict(r) for r in GOOD_PRODUCTS] + [{"id": "b", "title": "B2", "category": "c", "price": "4"}]
    rows = [{("id" if k == "product_id" else k): v for k, v in r.items()} for r in rows]
    path = write_csv(tmp_path / "p.csv", rows)
    msg = _error(TableFile(path=str(path), columns={"product_id": "id"}), "products")
    assert msg.startswith(f"file {path}, column 'id', row 4:")
    assert "duplicate product_id 'b'" in msg and "row 2" in msg


def _orphan_files(tmp_path: Path) -> tuple[FilesConfig, list[dict[str, Any]]]:
    products = write_csv(tmp_path / "p.csv", GOOD_PRODUCTS)
    events = [dict(r) for r in GOOD_EVENTS]
    events.insert(1, dict(GOOD_EVENTS[0], event_id="x1", product_id="ghost-1"))  # row 2
    events.append(dict(GOOD_EVENTS[0], event_id="x2", product_id="ghost-2"))  # row 5
    path = write_csv(tmp_path / "e.csv", events)
    files = FilesConfig(products=TableFile(path=str(products)), events=TableFile(path=str(path)))
    return files, events


def test_orphan_events_dropped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    files, _ = _orphan_files(tmp_path)
    valid = read_table(TableFile(path=str(write_csv(tmp_path / "valid.csv", GOOD_EVENTS))), "events")
    with caplog.at_level(logging.WARNING, logger="shoprank.data.readers"):
        source = read_files(files, orphan_events="drop")
    assert source.drops["events_unknown_product"] == 2
    assert source.events.equals(valid)  # nothing else lost, order kept
    assert source.products.num_rows == 3
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "dropped 2 events" in warning and "ghost-1" in warning and "ghost-2" in warning


def test_orphan_events_error_mode(tmp_path: Path) -> None:
    files, _ = _orphan_files(tmp_path)
    with pytest.raises(DataError) as info:
        read_files(files, orphan_events="error")
    msg = str(info.value)
    assert msg.startswith(f"file {files.events.path}, column 'product_id', row 2:")
    assert "'ghost-1'" in msg


def _same_tables(a: SourceTables, b: SourceTables) -> bool:
    """Same schemas, values and drops; by pandas, where ESCI's NaN prices equal each other (not in Arrow)."""
    return a.drops == b.drops and all(
        getattr(a, t).schema == getattr(b, t).schema and getattr(a, t).to_pandas().equals(getattr(b, t).to_pandas())
        for t in ("products", "events", "judgments")
    )


def test_every_read_source_kind_has_a_reader(tmp_path: Path) -> None:
    """Ingest reads each source kind through ``reader_for(source).read``: it must hand the reader the orphan
    policy and the pseudonyms, and give what the source's own read function gives."""
    users = Pseudonyms(bytes(range(32)))
    files, _ = _orphan_files(tmp_path)
    reader = reader_for(SourceConfig(kind="files", files=files))
    assert isinstance(reader, FilesReader)
    source = reader.read(orphan_events="drop", users=users)
    assert _same_tables(source, read_files(files, orphan_events="drop", users=users))
    assert source.drops["events_unknown_product"] == 2
    assert all(user.startswith("ps_") for user in source.events.column("user_id").to_pylist())
    with pytest.raises(DataError, match="ghost-1"):
        reader.read(orphan_events="error", users=users)

    ex, pr = write_esci(tmp_path)
    esci = EsciConfig(examples_path=ex, products_path=pr, locale="us")
    reader = reader_for(SourceConfig(kind="esci", esci=esci))
    assert isinstance(reader, EsciReader)
    assert _same_tables(reader.read(users=users), read_esci(esci))

    with pytest.raises(ValueError, match="'synthetic' is generated, not read"):
        reader_for(SourceConfig(kind="synthetic"))


def test_orphan_judgments_always_dropped(tmp_path: Path) -> None:
    products = read_table(TableFile(path=str(write_csv(tmp_path / "p.csv", GOOD_PRODUCTS))), "products")
    judgments = pa.Table.from_pylist(
        [
            {"query_id": "q", "query": "x", "product_id": "a", "label": 3},
            {"query_id": "q", "query": "x", "product_id": "zz", "label": 1},
        ],
        schema=JUDGMENT_SCHEMA,
    )
    source = validate_source(products, None, judgments, orphan_events="error")
    assert source.drops == {"events_unknown_product": 0, "judgments_unknown_product": 1}
    assert source.judgments.column("product_id").to_pylist() == ["a"]
    assert source.events.schema == EVENT_SCHEMA


@pytest.mark.parametrize("kind", ["zero_bytes", "header_only", "empty_parquet", "empty_jsonl"])
def test_empty_file(tmp_path: Path, kind: str) -> None:
    if kind == "zero_bytes":
        path = tmp_path / "p.csv"
        path.write_bytes(b"")
    elif kind == "header_only":
        path = tmp_path / "p.csv"
        path.write_text("product_id,title,category,price\n")
    elif kind == "empty_jsonl":
        path = tmp_path / "p.jsonl"
        path.write_text("\n\n")
    else:
        path = tmp_path / "p.parquet"
        pq.write_table(PRODUCT_SCHEMA.empty_table(), path)
    msg = _error(TableFile(path=str(path)), "products")
    assert msg.startswith(f"file {path}:") and "file is empty" in msg


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "products.xlsx"
    path.write_text("whatever")
    msg = _error(TableFile(path=str(path)), "products")
    assert str(path) in msg and "'.xlsx'" in msg
    for allowed in (".csv", ".parquet", ".jsonl", "csv, parquet, jsonl"):
        assert allowed in msg


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    msg = _error(TableFile(path=str(path)), "products")
    assert str(path) in msg and "not found" in msg


def test_ragged_csv_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("product_id,title,category,price\na,A,c,1\nb,B,c,2,extra\n")
    msg = _error(TableFile(path=str(path)), "products")
    assert str(path) in msg and "expected 4 columns, got 5" in msg


def test_timestamps_many_forms_in_jsonl(tmp_path: Path) -> None:
    forms = ["2026-01-01", "2026-01-01T00:00:00.5", 1767225600.25, "1767225600"]
    rows = [dict(GOOD_EVENTS[0], event_id=f"e{i}", ts=v) for i, v in enumerate(forms)]
    table = read_table(TableFile(path=str(write_jsonl(tmp_path / "e.jsonl", rows))), "events")
    base = datetime(2026, 1, 1, tzinfo=UTC)
    assert table.column("ts").to_pylist() == [
        base, base + timedelta(milliseconds=500), base + timedelta(milliseconds=250), base
    ]


# A transactions export (one row per product line of an invoice, as UCI Online Retail): a
# cancellation, a guest order, a non-product code, a zero quantity, two spellings of one code and
# an empty description.
TRANSACTIONS = """InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country
536365,85123A,WHITE HEART,6,2010-12-01 08:26:00,2.55,17850.0,United Kingdom
536366,85123A,WHITE HEART,2,2010-12-02 09:00:00,2.95,17850.0,United Kingdom
536367,85123A,WHITE HEART HOLDER,1,2010-12-03 10:00:00,3.25,13047.0,France
C536368,85123A,WHITE HEART,-1,2010-12-03 10:30:00,2.95,13047.0,France
536369,22423,,1,2010-12-03 11:00:00,12.75,13047.0,France
536370,22423,REGENCY CAKESTAND,1,2010-12-04 11:00:00,12.75,13047.0,France
536371,22423,CAKESTAND 3 TIER,1,2010-12-05 11:00:00,10.95,17850.0,United Kingdom
536372,85123A,WHITE HEART,1,2010-12-05 12:00:00,2.55,,United Kingdom
536373,POST,POSTAGE,1,2010-12-05 13:00:00,18.00,17850.0,United Kingdom
536374,22423,REGENCY CAKESTAND,0,2010-12-06 13:00:00,12.75,17850.0,United Kingdom
"""

TRANSACTIONS_CONFIG = """
source:
  kind: files
  files:
    products:
      from_events: {title: Description, price: UnitPrice}
    events:
      path: %s
      columns: {product_id: StockCode, user_id: CustomerID, ts: InvoiceDate, quantity: Quantity, session_id: InvoiceNo}
      event_type: {value: purchase}
      event_id: hash
      keep:
        - {column: InvoiceNo, not_matches: "^C", drop_as: cancellation}
        - {column: CustomerID, present: true, drop_as: guest_order}
        - {column: StockCode, matches: "^[0-9]{5}", drop_as: not_a_product}
        - {column: Quantity, above: 0, drop_as: quantity_not_positive}
        - {column: UnitPrice, above: 0, drop_as: price_not_positive}
"""


def _transactions_config(tmp_path: Path, text: str = TRANSACTIONS, config: str = TRANSACTIONS_CONFIG) -> FilesConfig:
    path = tmp_path / "transactions.csv"
    path.write_text(text)
    (tmp_path / "config.yaml").write_text(config % path)
    files = load_config(tmp_path / "config.yaml").source.files
    assert files is not None
    return files


def test_transactions_export_filters_rows_and_derives_its_catalogue(tmp_path: Path) -> None:
    source = read_files(_transactions_config(tmp_path))

    assert source.drops == {
        "events_unknown_product": 0, "judgments_unknown_product": 0,
        "events_cancellation": 1, "events_guest_order": 1, "events_not_a_product": 1,
        "events_quantity_not_positive": 1, "events_price_not_positive": 0,
        "products_without_title": 0, "products_without_price": 0,
    }
    # the most frequent spelling; a tie goes to the latest; the empty description is no spelling;
    # the price is the median of the kept rows' prices; nothing else is known, so nothing else is set
    assert source.products.to_pylist() == [
        {"product_id": "85123A", "title": "WHITE HEART", "description": None, "category": None, "brand": None,
         "price": 2.95, "attributes": []},
        {"product_id": "22423", "title": "CAKESTAND 3 TIER", "description": None, "category": None, "brand": None,
         "price": 12.75, "attributes": []},
    ]
    events = source.events
    assert events.column("session_id").to_pylist() == ["536365", "536366", "536367", "536369", "536370", "536371"]
    assert set(events.column("event_type").to_pylist()) == {"purchase"}
    assert events.column("user_id").to_pylist()[:3] == ["17850.0", "17850.0", "13047.0"]
    assert events.column("quantity").to_pylist() == [6, 2, 1, 1, 1, 1]
    assert events.column("ts")[0].as_py() == datetime(2010, 12, 1, 8, 26, tzinfo=timezone.utc)
    assert len(set(events.column("event_id").to_pylist())) == 6


def test_transactions_export_errors_point_at_the_file_row_past_dropped_rows(tmp_path: Path) -> None:
    lines = TRANSACTIONS.splitlines()
    lines[5] = "536369,22423,,1,yesterday,12.75,13047.0,France"  # data row 5, after the dropped cancellation
    with pytest.raises(DataError, match=r"row 5.*'yesterday'|'yesterday'.*row 5") as caught:
        read_files(_transactions_config(tmp_path, "\n".join(lines) + "\n"))
    assert "InvoiceDate" in str(caught.value)


def test_transactions_export_without_any_title_drops_and_counts_the_product(tmp_path: Path) -> None:
    text = TRANSACTIONS + "536375,21730,,1,2010-12-07 09:00:00,4.25,17850.0,United Kingdom\n"
    source = read_files(_transactions_config(tmp_path, text))
    assert source.drops["products_without_title"] == 1
    assert source.drops["events_unknown_product"] == 1  # its event names no product of the catalogue
    assert "21730" not in source.products.column("product_id").to_pylist()


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ('{column: StockCode, matches: "^[0-9", drop_as: code}', r"keep.*matches.*not a regular expression"),
        ("{column: StockCode, drop_as: code}", r"keep.*no test"),
        ("{column: StockCode, matches: x, drop_as: Bad Reason}", r"keep.*drop_as"),
        ("{column: StockCode, present: false, drop_as: code}", r"keep.*present"),
    ],
)
def test_bad_keep_filter_is_a_config_error_naming_the_key(tmp_path: Path, rule: str, message: str) -> None:
    config = TRANSACTIONS_CONFIG.replace('- {column: InvoiceNo, not_matches: "^C", drop_as: cancellation}', "- " + rule)
    with pytest.raises(ConfigError, match=message):
        _transactions_config(tmp_path, config=config)


def test_keep_filter_on_a_missing_column_names_it(tmp_path: Path) -> None:
    config = TRANSACTIONS_CONFIG.replace("column: InvoiceNo", "column: Invoice")
    with pytest.raises(DataError, match=r"missing column 'Invoice' named by the keep filter 'cancellation'"):
        read_files(_transactions_config(tmp_path, config=config))


def test_catalogue_from_events_needs_events(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="from_events"):
        load_config(overrides=["source.kind=files", "source.files={products: {from_events: {title: t, price: p}}}"])
