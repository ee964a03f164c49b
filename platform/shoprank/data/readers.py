"""Readers that turn user files and the ESCI data set into exactly-typed record tables.

Everything downstream (preprocessing, training, serving) trusts the record schemas
of :mod:`shoprank.data.schema`: names, types and nullability. That trust is only
safe if every broken input is stopped *here*, at the edge, with a message a user
can act on without a debugger. So each check raises :class:`DataError` naming the
file, the file's column and the 1-based data row (the header is not counted) of
the first bad value, and shows that value.

Rules common to every reader:

* Values are validated and converted with vectorised :mod:`pyarrow.compute`; only
  on the error path do we fall back to Python, and only over the failing column,
  to find the first bad row.
* Text is kept as given apart from stripping leading/trailing whitespace; real
  normalisation (case, HTML, truncation) belongs to preprocessing, which must be
  able to change without re-reading inputs.
* A blank text value (empty after stripping, or an empty CSV cell) counts as
  missing: a required field that is blank is an error, an optional one is null.
* Columns of the file that no record field uses are ignored.
* Nothing is lost silently: rows are only ever dropped deliberately (events or
  judgments naming products the catalog does not have, ESCI products without a
  title), and every such drop is counted in :attr:`SourceTables.drops` and logged.

Fields that may be absent from a products file (documented defaults, because many
real catalogs lack them and a missing one does not stop any model from working):

* ``description`` -> ``""`` (the encoder then sees only title, brand and category);
* ``brand`` -> ``""``;
* ``attributes`` -> empty map. When present it is a column of JSON object strings
  (``{"color": "red"}``), or a map or struct column (Parquet, JSON Lines). Keys
  and values become strings (non-string values are written as JSON); null values
  are left out, so a struct with optional members becomes a map of what is set.

Every other field in :data:`REQUIRED_FIELDS` must have a column, and every row a
value. Optional event fields (``query``, ``position``, ``request_id``,
``variant``, ``quantity``) are filled with nulls when the file has no column for them.

Events fields a file may lack and the reader derives instead, when the events
table's config (:class:`~shoprank.config.EventsFile`) asks for it, because a
ratings-style export (user, item, rating, time) has none of them and a shop
should not have to rewrite its export:

* ``event_type``: one type for every row (``{value: click}``), or a column's values
  translated (``{column: rating, map: {"5": purchase, ...}}``); a value the map
  lacks is an error naming its row.
* ``event_id: hash``: 16 hex digits of a keyed SipHash of the event's record fields
  (user, product, type, time, query, position, request, variant, and the session
  when it comes from the file), so the same event always gets the same id whatever
  its row; the n-th exact repeat of an event (in file order) gets ``-n`` appended,
  which makes the ids unique by construction.
* ``session_id: {gap_minutes: 30}``: per user, events in time order, a new session
  after more than ``gap_minutes`` without an event. The id is
  ``"{user_id}@{time of the session's first event, ISO-8601 UTC}"``: it belongs to
  one user, sorts by time within the user, and does not change when later events
  are appended.

Given the run's :class:`~shoprank.privacy.Pseudonyms` (``users``, as the ingest stage
passes them), the events' user ids are replaced by their pseudonyms as soon as they are
read, before anything is derived from them: a derived session id is then
``"{pseudonym}@{time}"`` and an event id hashes the pseudonym, so no field of the run
holds or hashes a raw user id, and the ids stay the same for the same key.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.fs as pafs
import pyarrow.json as pjson
import pyarrow.parquet as pq

from shoprank.config import EsciConfig, EventsFile, EventTypeRule, FilesConfig, TableFile
from shoprank.data.schema import (
    ESCI_LABELS,
    EVENT_SCHEMA,
    EVENT_TYPES,
    JUDGMENT_SCHEMA,
    MAX_QUANTITY,
    PRODUCT_SCHEMA,
    REQUIRED_FIELDS,
    SCHEMAS,
    conform,
)
from shoprank.errors import DataError
from shoprank.privacy import Pseudonyms

logger = logging.getLogger(__name__)

Kind = Literal["products", "events", "judgments"]
OrphanPolicy = Literal["drop", "error"]
AnyArray = Union[pa.Array, pa.ChunkedArray]

FORMATS: tuple[str, ...] = ("csv", "parquet", "jsonl")
"""Formats a :class:`TableFile` may name explicitly."""

EXTENSIONS: dict[str, str] = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
"""File extensions recognised when ``format`` is ``auto``."""

COMPRESSION_EXTENSIONS: tuple[str, ...] = (".gz", ".bz2", ".zst", ".lz4", ".br")
"""Compression suffixes stripped before looking at the extension (``x.csv.gz`` is CSV);
Arrow decompresses CSV and JSON Lines streams by the same suffix."""

DEFAULTS: dict[str, dict[str, Any]] = {
    "products": {"description": "", "brand": "", "attributes": []},
    "events": {},
    "judgments": {},
}
"""Required record fields that may be missing from a file, and the value they get then."""

LABEL_RANGE: tuple[int, int] = (0, 3)
"""Graded relevance labels, 0 (irrelevant) .. 3 (exact), as :data:`ESCI_LABELS` uses."""

EPOCH_RANGE: tuple[float, float] = (0.0, 4_102_444_800.0)
"""Numeric ``ts`` values are epoch seconds in 1970..2099; anything outside is far more
likely milliseconds or microseconds than a real date, so it is an error, not a guess."""

ESCI_EXAMPLE_COLUMNS: tuple[str, ...] = (
    "query_id",
    "query",
    "product_id",
    "product_locale",
    "esci_label",
)
ESCI_PRODUCT_COLUMNS: tuple[str, ...] = (
    "product_id",
    "product_title",
    "product_description",
    "product_bullet_point",
    "product_brand",
    "product_color",
    "product_locale",
)
ESCI_CATEGORY = "Unknown"
"""ESCI has no category; every ESCI product gets this one so the schema stays non-null."""

DERIVABLE_EVENT_FIELDS: tuple[str, ...] = ("event_type", "event_id", "session_id")
"""Event fields an :class:`~shoprank.config.EventsFile` may derive instead of reading."""

EVENT_ID_HASH_KEY = "shoprank:event/1"
"""SipHash key of derived event ids (16 bytes), our own rather than pandas' default so the
ids depend on nothing but the event; changing it changes every derived id."""

_ATTRIBUTES_TYPE = PRODUCT_SCHEMA.field("attributes").type
_TS_TYPE = EVENT_SCHEMA.field("ts").type
_EPOCH_RE = r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$"
# A zone offset only counts after a time of day, so the "-05" of "2026-01-05" is a day.
_OFFSET_RE = r"\d{2}:\d{2}(?::\d{2}(?:[.,]\d*)?)?\s*(?:[zZ]|[+-]\d{2}(?::?\d{2})?)$"


@dataclass
class SourceTables:
    """The validated records of one source, ready for preprocessing.

    ``products``, ``events`` and ``judgments`` have exactly the record schemas
    (``events`` and ``judgments`` may have no rows: ESCI has no behaviour, and
    judgments are optional for user files). ``drops`` counts every row removed on
    purpose, by reason, so a run can report it and nothing disappears unseen; the
    keys ``events_unknown_product`` and ``judgments_unknown_product`` are always set.
    """

    products: pa.Table
    events: pa.Table
    judgments: pa.Table
    drops: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class TableOrigin:
    """Where a table's rows came from, so cross-table errors can name file, column and row.

    ``rows`` holds, per table row, its 1-based data row in ``file``; ``None`` means
    the table is the file in order (row ``i`` is data row ``i + 1``). Readers that
    filter rows (ESCI's locale filter) pass the surviving rows' numbers.
    """

    file: str
    product_id_column: str = "product_id"
    rows: np.ndarray | None = None


@dataclass(frozen=True)
class _Where:
    """A column of a file being converted; builds errors that point into it."""

    file: str
    column: str | None
    rows: np.ndarray | None = None

    def row(self, index: int) -> int:
        return int(self.rows[index]) if self.rows is not None else index + 1

    def error(self, message: str, index: int | None = None) -> DataError:
        return DataError(
            message,
            file=self.file,
            column=self.column,
            row=None if index is None else self.row(index),
        )


# --------------------------------------------------------------------------- public API


def read_table(spec: TableFile, kind: Kind, users: Pseudonyms | None = None) -> pa.Table:
    """Read one input file into a table of exactly the ``kind`` record schema.

    All single-file checks happen here (columns, types, nulls, allowed values, and
    unique ``product_id`` for products), so an error can point at the file row.
    Cross-table checks (events naming unknown products) need the catalog and live
    in :func:`validate_source`. An :class:`~shoprank.config.EventsFile` may derive
    ``event_type``, ``event_id`` and ``session_id`` instead (module docstring).
    With ``users``, the user ids are pseudonyms before anything is derived from them.
    """
    if kind not in SCHEMAS:
        raise ValueError(f"kind must be one of {', '.join(SCHEMAS)}, got {kind!r}")
    derived = _derived_fields(spec)
    if derived and kind != "events":
        raise ValueError(f"only an events table derives {', '.join(derived)}; this one is read as {kind}")
    _check_mapping(spec, kind)
    wanted = {spec.columns.get(f.name, f.name) for f in SCHEMAS[kind]}
    if not derived:
        raw, names = _read_raw(spec, wanted)
        return _pseudonymous(_records(raw, names, kind, spec.columns, file=spec.path), users)
    assert isinstance(spec, EventsFile)  # only an EventsFile derives fields
    rule = spec.event_type
    if rule is not None and rule.column is not None:
        wanted.add(rule.column)
    raw, names = _read_raw(spec, wanted)
    return _derive_events(raw, names, spec, derived, users)


def read_files(files: FilesConfig, orphan_events: OrphanPolicy = "drop", users: Pseudonyms | None = None) -> SourceTables:
    """Read a user's catalog, events and optional judgments files and validate them together.

    Without a judgments file the judgments table is empty: offline relevance is then
    measured from behaviour alone; without an events file the events table is empty.
    """
    products = read_table(files.products, "products")
    events = read_table(files.events, "events", users) if files.events is not None else EVENT_SCHEMA.empty_table()
    judgments = (
        read_table(files.judgments, "judgments")
        if files.judgments is not None
        else JUDGMENT_SCHEMA.empty_table()
    )
    origins = {"products": _origin(files.products)}
    if files.events is not None:
        origins["events"] = _origin(files.events)
    if files.judgments is not None:
        origins["judgments"] = _origin(files.judgments)
    return validate_source(
        products, events, judgments, orphan_events=orphan_events, origins=origins
    )


def read_esci(esci: EsciConfig, orphan_events: OrphanPolicy = "drop") -> SourceTables:
    """Read the Amazon Shopping Queries (ESCI) parquet files as products and judgments.

    Mapping, and why:

    * judgments: ``query_id`` (as text), ``query``, ``product_id`` and
      ``label = ESCI_LABELS[esci_label]`` (E 3, S 2, C 1, I 0).
    * products: ``title = product_title``; ``description`` is
      ``product_description`` and ``product_bullet_point`` joined by a newline (either
      alone when the other is missing; HTML is left for preprocessing to strip);
      ``brand = product_brand`` or ``""``; ``category = "Unknown"`` and
      ``price = NaN`` because ESCI has neither; ``attributes`` hold ``color`` (when
      set) and ``locale``.
    * events: none; ESCI has no behaviour, so the table is empty. ``orphan_events``
      is accepted for symmetry with :func:`read_files` and has nothing to act on.
    * Rows are kept only for ``esci.locale`` unless it is ``all``. Product ids are
      unique only within a locale, so with ``all`` they become ``"{locale}:{id}"``
      in both tables.
    * A product without a title cannot be encoded; it is dropped and counted in
      ``drops["products_without_title"]`` (its judgments then count as
      ``judgments_unknown_product``).
    """
    locale = esci.locale
    ex_file, pr_file = esci.examples_path, esci.products_path
    examples, ex_names = _read_parquet_file(ex_file, set(ESCI_EXAMPLE_COLUMNS))
    _require_columns(ex_names, ESCI_EXAMPLE_COLUMNS, ex_file)
    products, pr_names = _read_parquet_file(pr_file, set(ESCI_PRODUCT_COLUMNS))
    _require_columns(pr_names, ESCI_PRODUCT_COLUMNS, pr_file)

    examples, ex_rows, ex_locales = _filter_locale(examples, locale, ex_file)
    products, pr_rows, pr_locales = _filter_locale(products, locale, pr_file)

    # Judgments.
    label_where = _Where(ex_file, "esci_label", ex_rows)
    letters = _text(examples.column("esci_label"), label_where, "esci_label")
    _require_present(letters, label_where, "esci_label")
    keys = pa.array(list(ESCI_LABELS), pa.string())
    positions = pc.index_in(letters, value_set=keys)
    bad = _first_true(pc.is_null(positions))
    if bad >= 0:
        raise label_where.error(
            f"esci_label must be one of {', '.join(ESCI_LABELS)}, got {letters[bad].as_py()!r}",
            bad,
        )
    labels = pc.take(pa.array(list(ESCI_LABELS.values()), pa.int8()), positions)
    ex_ids = _text(examples.column("product_id"), _Where(ex_file, "product_id", ex_rows), "product_id")
    if locale == "all":
        ex_ids = pc.binary_join_element_wise(ex_locales, ex_ids, ":")
    raw_judgments = pa.table(
        {
            "query_id": examples.column("query_id"),
            "query": examples.column("query"),
            "product_id": ex_ids,
            "esci_label": labels,
        }
    )
    judgments = _records(
        raw_judgments,
        raw_judgments.column_names,
        "judgments",
        {"label": "esci_label"},
        file=ex_file,
        rows=ex_rows,
    )

    # Products.
    def text_of(name: str) -> AnyArray:
        return _text(products.column(name), _Where(pr_file, name, pr_rows), name)

    pr_ids = text_of("product_id")
    if locale == "all":
        pr_ids = pc.binary_join_element_wise(pr_locales, pr_ids, ":")
    titles = text_of("product_title")
    has_title = pc.is_valid(titles)
    without_title = len(titles) - pc.sum(has_title).as_py() if len(titles) else 0
    drops: dict[str, int] = {"products_without_title": without_title}
    if without_title:
        examples_ids = pc.unique(pc.filter(pr_ids, pc.invert(has_title)))[:5].to_pylist()
        logger.warning(
            "%s: dropped %d products without a title, e.g. %s",
            pr_file,
            without_title,
            ", ".join(map(str, examples_ids)),
        )
    description = text_of("product_description")
    bullets = text_of("product_bullet_point")
    joined = pc.coalesce(
        pc.binary_join_element_wise(description, bullets, "\n"),
        description,
        bullets,
        pa.scalar("", pa.string()),
    )
    n = len(pr_ids)
    raw_products = pa.table(
        {
            "product_id": pr_ids,
            "product_title": titles,
            "product_description": joined,
            "product_brand": text_of("product_brand"),
        }
    )
    fixed = {
        "category": pa.array([ESCI_CATEGORY] * n, pa.string()),
        "price": pa.array(np.full(n, np.nan), pa.float64()),
        "attributes": _esci_attributes(text_of("product_color"), pr_locales),
    }
    keep = has_title
    raw_products = raw_products.filter(keep)
    fixed = {name: pc.filter(values, keep) for name, values in fixed.items()}
    kept_rows = pr_rows[np.asarray(keep.to_numpy(zero_copy_only=False), dtype=bool)]
    product_table = _records(
        raw_products,
        raw_products.column_names,
        "products",
        {"title": "product_title", "description": "product_description", "brand": "product_brand"},
        file=pr_file,
        rows=kept_rows,
        fixed=fixed,
    )

    source = validate_source(
        product_table,
        EVENT_SCHEMA.empty_table(),
        judgments,
        orphan_events=orphan_events,
        origins={
            "products": TableOrigin(pr_file, "product_id", kept_rows),
            "judgments": TableOrigin(ex_file, "product_id", ex_rows),
        },
    )
    source.drops.update(drops)
    return source


def validate_source(
    products: pa.Table,
    events: pa.Table | None = None,
    judgments: pa.Table | None = None,
    *,
    orphan_events: OrphanPolicy = "drop",
    origins: Mapping[str, TableOrigin] | None = None,
) -> SourceTables:
    """Cross-table checks every source shares, ending in a :class:`SourceTables`.

    The tables must already hold valid values (the readers check those per file);
    here they are shaped to the exact schemas, product ids are checked to be unique,
    and rows naming products the catalog lacks are handled: events are dropped and
    counted (``orphan_events="drop"``) or stopped with an error naming the file,
    column, row and id (``"error"``); judgments are always dropped and counted,
    since ESCI's judged products are not all in its catalog. ``origins`` (keyed
    ``products`` / ``events`` / ``judgments``) says where rows came from so
    errors can point into the files; without it they name the table kind.
    """
    if orphan_events not in ("drop", "error"):
        raise ValueError(f"orphan_events must be 'drop' or 'error', got {orphan_events!r}")
    origins = origins or {}

    def origin(kind: str) -> TableOrigin:
        return origins.get(kind) or TableOrigin(kind)

    products = conform(products, "products")
    events = conform(events if events is not None else EVENT_SCHEMA.empty_table(), "events")
    judgments = conform(
        judgments if judgments is not None else JUDGMENT_SCHEMA.empty_table(), "judgments"
    )
    p_origin = origin("products")
    _check_unique(
        products.column("product_id"),
        _Where(p_origin.file, p_origin.product_id_column, p_origin.rows),
        "product_id",
    )
    catalog = products.column("product_id")
    events, dropped_events = _handle_orphans(
        events, catalog, origin("events"), p_origin.file, "events", orphan_events
    )
    judgments, dropped_judgments = _handle_orphans(
        judgments, catalog, origin("judgments"), p_origin.file, "judgments", "drop"
    )
    drops = {
        "events_unknown_product": dropped_events,
        "judgments_unknown_product": dropped_judgments,
    }
    return SourceTables(products=products, events=events, judgments=judgments, drops=drops)


# ------------------------------------------------------------------ cross-table checks


def _origin(spec: TableFile) -> TableOrigin:
    return TableOrigin(spec.path, spec.columns.get("product_id", "product_id"))


def _handle_orphans(
    table: pa.Table,
    catalog: AnyArray,
    origin: TableOrigin,
    catalog_file: str,
    what: str,
    policy: OrphanPolicy,
) -> tuple[pa.Table, int]:
    """Drop (and count, and log) or reject rows whose product_id is not in the catalog."""
    if table.num_rows == 0:
        return table, 0
    known = pc.is_in(table.column("product_id"), value_set=_combined(catalog))
    missing = table.num_rows - pc.sum(known).as_py()
    if missing == 0:
        return table, 0
    if policy == "error":
        index = _first_true(pc.invert(known))
        product_id = table.column("product_id")[index].as_py()
        raise _Where(origin.file, origin.product_id_column, origin.rows).error(
            f"product_id {product_id!r} is not in the catalog ({catalog_file}); "
            f"{missing} {what} row(s) name unknown products. Fix the ids, or set "
            "source.orphan_events: drop to drop and count them",
            index,
        )
    orphans = pc.filter(table.column("product_id"), pc.invert(known))
    examples = pc.unique(orphans)[:5].to_pylist()
    logger.warning(
        "%s: dropped %d %s naming products not in the catalog (%s), e.g. %s",
        origin.file,
        missing,
        what,
        catalog_file,
        ", ".join(map(str, examples)),
    )
    return table.filter(known), missing


def _check_unique(ids: AnyArray, where: _Where, field_name: str) -> None:
    """Product ids key everything downstream; a duplicate would silently merge two products."""
    if len(ids) == 0 or pc.count_distinct(ids, mode="all").as_py() == len(ids):
        return
    first_seen: dict[Any, int] = {}
    for index, value in enumerate(ids.to_pylist()):
        if value in first_seen:
            raise where.error(
                f"duplicate {field_name} {value!r}; first seen at row {where.row(first_seen[value])}",
                index,
            )
        first_seen[value] = index


# ------------------------------------------------------------------------ file reading


def _derived_fields(spec: TableFile) -> list[str]:
    """The event fields ``spec`` derives instead of reading (none for a plain table)."""
    if not isinstance(spec, EventsFile):
        return []
    return [name for name in DERIVABLE_EVENT_FIELDS if getattr(spec, name) is not None]


def _check_mapping(spec: TableFile, kind: str) -> None:
    """A typo in ``columns`` would otherwise be ignored and the default name used instead."""
    fields = SCHEMAS[kind].names
    for key in spec.columns:
        if key not in fields:
            raise DataError(
                f"columns maps {key!r}, which is not a {kind} record field; "
                f"fields are: {', '.join(fields)}",
                file=spec.path,
            )


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """Local paths and filesystem URIs (``s3://``, ``gs://``, ...) alike."""
    if "://" in path:
        try:
            return pafs.FileSystem.from_uri(path)
        except (pa.ArrowException, OSError) as exc:  # unknown scheme, bad URI
            raise DataError(f"cannot open: {exc}", file=path) from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def _format_of(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    name = path.rstrip("/").lower()
    for suffix in COMPRESSION_EXTENSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    ext = os.path.splitext(name)[1]
    if ext not in EXTENSIONS:
        raise DataError(
            f"cannot tell the format from the extension {ext or '(none)'!r}; "
            "use .csv, .parquet or .pq, .jsonl, .ndjson or .json, "
            f"or set format to one of: {', '.join(FORMATS)}",
            file=path,
        )
    return EXTENSIONS[ext]


def _stat(path: str) -> tuple[pafs.FileSystem, str, pafs.FileInfo]:
    fs, fs_path = _filesystem(path)
    try:
        info = fs.get_file_info(fs_path)
    except OSError as exc:
        raise DataError(f"cannot open: {exc}", file=path) from None
    if info.type == pafs.FileType.NotFound:
        raise DataError("file not found", file=path)
    return fs, fs_path, info


def _read_raw(spec: TableFile, wanted: set[str]) -> tuple[pa.Table, list[str]]:
    """The file's table (for Parquet only the ``wanted`` columns) and all its column names."""
    fs, fs_path, info = _stat(spec.path)
    fmt = _format_of(spec.path, spec.format)
    if info.type == pafs.FileType.Directory and fmt != "parquet":
        raise DataError("is a directory; only parquet inputs may be directories", file=spec.path)
    if info.type == pafs.FileType.File and info.size == 0:
        raise DataError("file is empty (0 bytes)", file=spec.path)
    if fmt == "csv":
        table = _read_csv(fs, fs_path, spec.path)
        names = table.column_names
    elif fmt == "jsonl":
        table = _read_jsonl(fs, fs_path, spec.path)
        names = table.column_names
    else:
        table, names = _read_parquet(fs, fs_path, info, spec.path, wanted)
    if table.num_rows == 0:
        raise DataError("file is empty: it has no data rows", file=spec.path)
    return table, names


def _read_csv(fs: pafs.FileSystem, fs_path: str, path: str) -> pa.Table:
    """Every column as text, so ids keep leading zeros and we convert with row-precise errors."""
    bad_rows: list[Any] = []

    def on_invalid(row: Any) -> str:
        bad_rows.append(row)
        return "error"

    parse = pcsv.ParseOptions(newlines_in_values=True, invalid_row_handler=on_invalid)
    try:
        with fs.open_input_stream(fs_path, compression="detect") as stream:
            names = pcsv.open_csv(stream, parse_options=parse).schema.names
        convert = pcsv.ConvertOptions(
            column_types={name: pa.string() for name in names},
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
            null_values=[""],
        )
        with fs.open_input_stream(fs_path, compression="detect") as stream:
            return pcsv.read_csv(stream, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            raise DataError("file is empty (no header)", file=path) from None
        if bad_rows:
            row = bad_rows[0]
            where = f"line {row.number}: " if row.number is not None else ""
            raise DataError(
                f"cannot read as CSV: {where}expected {row.expected_columns} columns, "
                f"got {row.actual_columns}: {row.text!r}",
                file=path,
            ) from None
        raise DataError(f"cannot read as CSV: {exc}", file=path) from None
    except OSError as exc:
        raise DataError(f"cannot read: {exc}", file=path) from None


def _read_jsonl(fs: pafs.FileSystem, fs_path: str, path: str) -> pa.Table:
    """Arrow's fast reader first; a Python parse when it gives up (mixed types, a JSON array)."""
    try:
        with fs.open_input_stream(fs_path, compression="detect") as stream:
            return pjson.read_json(stream)
    except pa.ArrowInvalid:
        pass
    except OSError as exc:
        raise DataError(f"cannot read: {exc}", file=path) from None
    with fs.open_input_stream(fs_path, compression="detect") as stream:
        data = stream.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"is not UTF-8 text: {exc}", file=path) from None
    records: list[Any]
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"line {exc.lineno} is not valid JSON: {exc.msg}", file=path) from None
        if not isinstance(records, list):
            raise DataError("must hold JSON objects, one per line", file=path)
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue  # as Arrow does: blank lines are not rows
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"line {lineno} is not valid JSON: {exc.msg}", file=path, row=len(records) + 1
                ) from None
    names: dict[str, None] = {}
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(
                f"each row must be a JSON object, got {type(record).__name__}",
                file=path,
                row=index + 1,
            )
        names.update(dict.fromkeys(record))
    return pa.table({name: _py_column([r.get(name) for r in records]) for name in names})


def _py_column(values: list[Any]) -> pa.Array:
    """An Arrow array of parsed JSON values; a column of mixed types becomes text to convert later."""
    try:
        return pa.array(values)
    except (pa.ArrowException, ValueError, TypeError):
        return pa.array(
            [v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in values],
            pa.string(),
        )


def _read_parquet(
    fs: pafs.FileSystem, fs_path: str, info: pafs.FileInfo, path: str, wanted: set[str]
) -> tuple[pa.Table, list[str]]:
    try:
        if info.type == pafs.FileType.File:
            with fs.open_input_file(fs_path) as handle:
                parquet = pq.ParquetFile(handle)
                names = parquet.schema_arrow.names
                if parquet.metadata.num_rows == 0:
                    raise DataError("file is empty: it has no data rows", file=path)
                return parquet.read(columns=[n for n in names if n in wanted]), names
        table = pq.read_table(fs_path, filesystem=fs)
        return table.select([n for n in table.column_names if n in wanted]), table.column_names
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"cannot read as Parquet: {exc}", file=path) from None


def _read_parquet_file(path: str, wanted: set[str]) -> tuple[pa.Table, list[str]]:
    fs, fs_path, info = _stat(path)
    table, names = _read_parquet(fs, fs_path, info, path, wanted)
    if table.num_rows == 0:
        raise DataError("file is empty: it has no data rows", file=path)
    return table, names


def _require_columns(names: list[str], required: Iterable[str], file: str) -> None:
    for name in required:
        if name not in names:
            raise DataError(
                f"missing column {name!r}; the file has columns: {', '.join(names) or '(none)'}",
                file=file,
                column=name,
            )


def _filter_locale(
    table: pa.Table, locale: str, file: str
) -> tuple[pa.Table, np.ndarray, AnyArray]:
    """Rows of one locale (all for ``all``), with their 1-based file rows and locale values."""
    where = _Where(file, "product_locale")
    locales = _text(table.column("product_locale"), where, "product_locale")
    _require_present(locales, where, "product_locale")
    rows = np.arange(1, table.num_rows + 1)
    if locale == "all":
        return table, rows, locales
    mask = pc.equal(locales, locale)
    keep = np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)
    if not keep.any():
        present = sorted(pc.unique(locales).to_pylist())
        raise where.error(
            f"no rows with product_locale {locale!r}; the file has: {', '.join(present)}"
        )
    return table.filter(mask), rows[keep], pc.filter(locales, mask)


def _esci_attributes(colors: AnyArray, locales: AnyArray) -> pa.Array:
    """``{"color": c, "locale": l}`` per product (no color key when it is missing), vectorised."""
    n = len(locales)
    has_color = np.asarray(pc.is_valid(colors).to_numpy(zero_copy_only=False), dtype=bool)
    sizes = 1 + has_color.astype(np.int32)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(sizes, out=offsets[1:])
    # Entry j takes its value from colors[k] (k < n) or locales[k - n].
    source = np.empty(offsets[-1], dtype=np.int64)
    source[offsets[:-1][has_color]] = np.nonzero(has_color)[0]
    source[offsets[1:] - 1] = n + np.arange(n)
    values = pc.take(
        pa.concat_arrays([_combined(pc.cast(colors, pa.string())), _combined(pc.cast(locales, pa.string()))]),
        pa.array(source),
    )
    keys = pa.array(np.where(source < n, "color", "locale"), pa.string())
    return pa.MapArray.from_arrays(pa.array(offsets), keys, values, type=_ATTRIBUTES_TYPE)


# ------------------------------------------------------------------- record building


def _records(
    raw: pa.Table,
    file_columns: list[str],
    kind: str,
    mapping: Mapping[str, str],
    *,
    file: str,
    rows: np.ndarray | None = None,
    fixed: Mapping[str, AnyArray] | None = None,
) -> pa.Table:
    """Convert ``raw`` (columns as in the file) to the ``kind`` schema, checking every value.

    ``file_columns`` are all the file's columns (for messages; Parquet reads only
    the needed ones). ``fixed`` supplies fields a reader derives itself (ESCI's
    constant category and NaN price), taken as they are.
    """
    schema = SCHEMAS[kind]
    fixed = fixed or {}
    defaults = DEFAULTS[kind]
    arrays: list[AnyArray] = []
    for f in schema:
        if f.name in fixed:
            arrays.append(fixed[f.name])
            continue
        column = mapping.get(f.name, f.name)
        where = _Where(file, column, rows)
        index = _column_index(raw, column, where)
        if index is None:
            explicit = f.name in mapping
            required = f.name in REQUIRED_FIELDS[kind] and f.name not in defaults
            if explicit or required:
                how = f"mapped by columns.{f.name}" if explicit else "required"
                raise where.error(
                    f"missing column {column!r} for record field {f.name!r} ({how}); "
                    f"the file has columns: {', '.join(file_columns) or '(none)'}"
                )
            arrays.append(_default_array(f, defaults.get(f.name), raw.num_rows))
            continue
        arrays.append(_convert(raw.column(index), f, kind, where))
    table = pa.Table.from_arrays(arrays, schema=schema)
    if kind == "products":
        _check_unique(
            table.column("product_id"),
            _Where(file, mapping.get("product_id", "product_id"), rows),
            "product_id",
        )
    return table


def _column_index(raw: pa.Table, column: str, where: _Where) -> int | None:
    """Position of ``column`` in ``raw``, None when absent; a header naming it twice is ambiguous."""
    matches = [i for i, name in enumerate(raw.column_names) if name == column]
    if len(matches) > 1:
        raise where.error(f"the header names this column {len(matches)} times")
    return matches[0] if matches else None


def _default_array(f: pa.Field, default: Any, n: int) -> pa.Array:
    if default is None:
        return pa.nulls(n, f.type)
    return pa.array([default] * n, f.type)


# ------------------------------------------------------------------ derived event fields


def _derive_events(raw: pa.Table, names: list[str], spec: EventsFile, derived: list[str],
                   users: Pseudonyms | None) -> pa.Table:
    """Events whose ``derived`` fields are computed (see the module docstring), the rest read.

    The event type comes first, from the raw file; ids and sessions need the converted
    user (its pseudonym, with ``users``), product and time, so they are computed on the
    record table and replace placeholders that never leave this function.
    """
    for name in derived:
        if name in names:
            logger.warning("%s: column %r is ignored: the config derives %s instead", spec.path, name, name)
    n = raw.num_rows
    fixed: dict[str, AnyArray] = {name: pa.nulls(n, pa.string()) for name in derived}
    if spec.event_type is not None:
        fixed["event_type"] = _derived_event_types(raw, names, spec.event_type, spec.path)
    table = _pseudonymous(_records(raw, names, "events", spec.columns, file=spec.path, fixed=fixed), users)
    if spec.session_id is not None:
        sessions = _derived_sessions(table.column("user_id"), table.column("ts"), spec.session_id.gap_minutes)
        table = _replace(table, "session_id", sessions)
    if spec.event_id is not None:
        table = _replace(table, "event_id", _derived_event_ids(table, with_session=spec.session_id is None))
    return table


def _pseudonymous(records: pa.Table, users: Pseudonyms | None) -> pa.Table:
    """``records`` with their user ids replaced by pseudonyms when ``users`` is given (a table without users as
    it is)."""
    return users.table(records) if users is not None else records


def _replace(table: pa.Table, name: str, values: AnyArray) -> pa.Table:
    index = table.schema.get_field_index(name)
    return table.set_column(index, table.schema.field(name), values)


def _derived_event_types(raw: pa.Table, names: list[str], rule: EventTypeRule, file: str) -> AnyArray:
    """One type for every row, or ``rule.column``'s values (as text) through ``rule.map``."""
    if rule.value is not None:
        return pa.repeat(pa.scalar(rule.value, pa.string()), raw.num_rows)
    assert rule.column is not None and rule.map is not None  # checked by the config
    where = _Where(file, rule.column)
    index = _column_index(raw, rule.column, where)
    if index is None:
        raise where.error(
            f"missing column {rule.column!r} for record field 'event_type' (named by event_type.column); "
            f"the file has columns: {', '.join(names) or '(none)'}"
        )
    text = _text(raw.column(index), where, rule.column)
    _require_present(text, where, rule.column)
    positions = pc.index_in(text, value_set=pa.array(list(rule.map), pa.string()))
    bad = _first_true(pc.is_null(positions))
    if bad >= 0:
        raise where.error(
            f"event_type.map has no entry for {text[bad].as_py()!r}; it maps: {', '.join(map(repr, rule.map))}",
            bad,
        )
    return pc.take(pa.array(list(rule.map.values()), pa.string()), positions)


def _derived_sessions(users: AnyArray, ts: AnyArray, gap_minutes: float) -> AnyArray:
    """``"{user}@{first event's time}"`` per event, a new session after more than the gap."""
    users = _combined(users)
    # Group by user code (any order of users will do), then by time; lexsort is stable,
    # so events of one user at one instant keep their file order.
    codes = np.asarray(pc.dictionary_encode(users).indices)
    micros = np.asarray(pc.cast(ts, pa.int64()).to_numpy(zero_copy_only=False))
    order = np.lexsort((micros, codes))
    sorted_codes, sorted_micros = codes[order], micros[order]
    starts = np.ones(len(order), dtype=bool)  # at least one row: an empty file is refused when read
    starts[1:] = (sorted_codes[1:] != sorted_codes[:-1]) | (
        np.diff(sorted_micros) > round(gap_minutes * 60 * 1_000_000)
    )
    names = pc.binary_join_element_wise(
        pc.take(users, pa.array(order[starts])), _iso_utc(sorted_micros[starts]), "@"
    )
    session_of_sorted = np.cumsum(starts) - 1
    session_of_row = np.empty(len(order), dtype=np.int64)
    session_of_row[order] = session_of_sorted
    return pc.take(names, pa.array(session_of_row))


def _iso_utc(micros: np.ndarray) -> pa.Array:
    """Epoch microseconds as ``2026-01-05T09:12:00.000000Z``; Arrow's cast is far faster than strftime."""
    text = pc.cast(pa.array(micros, pa.timestamp("us")), pa.string())
    return pc.binary_join_element_wise(pc.replace_substring(text, " ", "T"), "Z", "")


def _derived_event_ids(events: pa.Table, *, with_session: bool) -> AnyArray:
    """A keyed SipHash of each event's record fields as 16 hex digits, ``-n`` on the n-th repeat."""
    n = events.num_rows
    fields = ["user_id", "product_id", "event_type", "ts", "query", "position", "request_id", "variant"]
    if with_session:
        fields.append("session_id")
    parts = []
    for name in fields:
        column = events.column(name)
        if pa.types.is_timestamp(column.type):
            column = pc.cast(column, pa.int64())
        parts.append(pc.cast(column, pa.string()))
    # Unit separator between fields, NUL for a null, so fields cannot run into each other.
    # Rows with one hash are numbered in file order: exact repeats (or, vanishingly
    # rarely, a collision) get -1, -2, ..., so the ids are unique whatever the hash does.
    rows = pc.binary_join_element_wise(*parts, "\x1f", null_handling="replace", null_replacement="\x00")
    hashes = pd.util.hash_array(
        np.asarray(rows.to_numpy(zero_copy_only=False), dtype=object), hash_key=EVENT_ID_HASH_KEY, categorize=False
    )
    order = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[order]
    starts = np.ones(n, dtype=bool)
    starts[1:] = sorted_hashes[1:] != sorted_hashes[:-1]
    repeat = np.empty(n, dtype=np.int64)
    repeat[order] = np.arange(n) - np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    ids = _hex64(hashes)
    suffixed = pc.binary_join_element_wise(ids, pc.cast(pa.array(repeat), pa.string()), "-")
    return pc.if_else(pa.array(repeat == 0), ids, suffixed)


def _hex64(values: np.ndarray) -> pa.Array:
    """uint64 values as 16 lowercase hex digits each, without a Python loop."""
    n = len(values)
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    octets = values.astype(">u8").view(np.uint8).reshape(n, 8)
    chars = np.empty((n, 16), dtype=np.uint8)
    chars[:, 0::2] = digits[octets >> 4]
    chars[:, 1::2] = digits[octets & 15]
    offsets = np.arange(0, 16 * (n + 1), 16, dtype=np.int64)
    return pc.cast(
        pa.Array.from_buffers(pa.large_string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(chars.tobytes())]),
        pa.string(),
    )


def _convert(arr: AnyArray, f: pa.Field, kind: str, where: _Where) -> AnyArray:
    """Dispatch by record field to the converter that knows its rules."""
    name = f.name
    default = DEFAULTS[kind].get(name)
    required = not f.nullable and default is None
    if name == "attributes":
        return _attributes(arr, where)
    if name == "price":
        return _price(arr, where)
    if name == "ts":
        return _timestamp(arr, where, name)
    if name == "label":
        return _integer(arr, where, name, LABEL_RANGE, pa.int8(), required=True)
    if name == "position":
        return _integer(arr, where, name, (0, 2**31 - 1), pa.int32(), required=False)
    if name == "quantity":
        return _integer(arr, where, name, (1, MAX_QUANTITY), pa.int32(), required=False)
    text = _text(arr, where, name)
    if required:
        _require_present(text, where, name)
    elif default is not None:
        text = pc.fill_null(text, default)
    if name == "event_type":
        allowed = pa.array(EVENT_TYPES, pa.string())
        bad = _first_true(pc.invert(pc.is_in(text, value_set=allowed)))
        if bad >= 0:
            raise where.error(
                f"event_type must be one of {', '.join(EVENT_TYPES)}; got {text[bad].as_py()!r}",
                bad,
            )
    return text


# ------------------------------------------------------------------------- converters


def _combined(arr: AnyArray) -> pa.Array:
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def _first_true(mask: AnyArray) -> int:
    """Index of the first true value, or -1."""
    if len(mask) == 0:
        return -1
    return int(pc.index(pc.fill_null(mask, False), True).as_py())


def _is_textual(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or (
        hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t)
    )


def _decode(arr: AnyArray) -> AnyArray:
    """Dictionary-encoded columns (pandas categoricals) behave like their values."""
    if pa.types.is_dictionary(arr.type):
        return pc.cast(arr, arr.type.value_type)
    return arr


def _text(arr: AnyArray, where: _Where, name: str) -> AnyArray:
    """A column as stripped text, blanks as null. Numbers and booleans are written as text
    (an id stored as an integer is still an id); nested values are an error."""
    arr = _decode(arr)
    t = arr.type
    if pa.types.is_null(t):
        return pa.nulls(len(arr), pa.string())
    if not (
        _is_textual(t)
        or pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
        or pa.types.is_decimal(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
    ):
        raise where.error(f"{name} must be text, but the column holds {t}")
    arr = _cast_or_raise(arr, pa.string(), where, lambda v: f"{name} is not UTF-8 text: {v!r}")
    arr = pc.utf8_trim_whitespace(arr)
    return pc.if_else(pc.equal(arr, ""), pa.scalar(None, pa.string()), arr)


def _require_present(arr: AnyArray, where: _Where, name: str) -> None:
    bad = _first_true(pc.is_null(arr))
    if bad >= 0:
        raise where.error(f"{name} is required but this row has no value", bad)


def _try_cast(arr: AnyArray, to: pa.DataType) -> tuple[AnyArray | None, int]:
    """Cast, or return the index of the first value that does not convert.

    The failing index is found by halving: a cast that fails on a range fails on one of
    its halves, so O(n) values are re-cast in total and no Python loop runs over them.
    """
    try:
        return pc.cast(arr, to), -1
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    lo, hi = 0, len(arr)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            pc.cast(arr.slice(lo, mid - lo), to)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            hi = mid
        else:
            lo = mid
    return None, lo


def _cast_or_raise(
    arr: AnyArray, to: pa.DataType, where: _Where, message: Callable[[Any], str]
) -> AnyArray:
    result, bad = _try_cast(arr, to)
    if result is None:
        raise where.error(message(arr[bad].as_py()), bad)
    return result


def _numbers(arr: AnyArray, where: _Where, name: str, what: str) -> AnyArray:
    """A numeric column as float64/int64, text parsed; nulls (and NaN) stay missing."""
    arr = _decode(arr)
    t = arr.type
    if pa.types.is_null(t):
        return pa.nulls(len(arr), pa.float64())
    if _is_textual(t):
        text = _text(arr, where, name)
        return _cast_or_raise(text, pa.float64(), where, lambda v: f"{name} must be {what}, got {v!r}")
    if pa.types.is_integer(t):
        return pc.cast(arr, pa.int64())
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return pc.cast(arr, pa.float64())
    raise where.error(f"{name} must be {what}, but the column holds {t}")


def _price(arr: AnyArray, where: _Where) -> AnyArray:
    """Prices are required, finite and not negative: a missing price is not zero."""
    values = pc.cast(_numbers(arr, where, "price", "a number"), pa.float64())
    _require_present(values, where, "price")
    bad = _first_true(pc.or_(pc.invert(pc.is_finite(values)), pc.less(values, 0.0)))
    if bad >= 0:
        raise where.error(f"price must be a finite number >= 0, got {values[bad].as_py()!r}", bad)
    return values


def _integer(
    arr: AnyArray,
    where: _Where,
    name: str,
    bounds: tuple[int, int],
    out: pa.DataType,
    *,
    required: bool,
) -> AnyArray:
    """Whole numbers within ``bounds``; text and integral floats (3.0, as pandas writes) accepted."""
    lo, hi = bounds
    what = f"an integer {lo}..{hi}"
    original = _decode(arr)
    if pa.types.is_boolean(original.type):
        raise where.error(f"{name} must be {what}, but the column holds booleans")
    values = _numbers(original, where, name, what)
    if pa.types.is_floating(values.type):
        values = pc.if_else(pc.is_nan(values), pa.scalar(None, values.type), values)
    if required:
        _require_present(values, where, name)
    if pa.types.is_floating(values.type):
        result, bad = _try_cast(values, pa.int64())
        if result is None:
            raise where.error(f"{name} must be {what}, got {original[bad].as_py()!r}", bad)
        values = result
    bad = _first_true(pc.or_(pc.less(values, lo), pc.greater(values, hi)))
    if bad >= 0:
        raise where.error(f"{name} must be {what}, got {original[bad].as_py()!r}", bad)
    return pc.cast(values, out)


def _epoch(seconds: AnyArray, where: _Where, name: str, shown: AnyArray) -> AnyArray:
    """Epoch seconds (int or float) to microsecond UTC timestamps."""
    lo, hi = EPOCH_RANGE
    floats = pc.cast(seconds, pa.float64())
    bad = _first_true(
        pc.or_(pc.invert(pc.is_finite(floats)), pc.or_(pc.less(floats, lo), pc.greater_equal(floats, hi)))
    )
    if bad >= 0:
        raise where.error(
            f"{name} {shown[bad].as_py()!r} as epoch seconds is not in 1970..2099 "
            "(epoch values must be seconds, not milliseconds)",
            bad,
        )
    if pa.types.is_integer(seconds.type):
        micros = pc.multiply_checked(pc.cast(seconds, pa.int64()), 1_000_000)
    else:
        micros = pc.cast(pc.round(pc.multiply(floats, 1e6)), pa.int64())
    return pc.cast(pc.cast(micros, pa.timestamp("us")), _TS_TYPE)


def _timestamp(arr: AnyArray, where: _Where, name: str) -> AnyArray:
    """Timestamps, ISO-8601 text (naive means UTC) or epoch seconds, as timestamp[us, UTC]."""
    arr = _decode(arr)
    t = arr.type
    cast_naive = pc.CastOptions(pa.timestamp("us"), allow_time_truncate=True)
    if pa.types.is_timestamp(t):
        _require_present(arr, where, name)
        if t.tz is None:  # naive timestamps are UTC wall-clock times
            return pc.cast(pc.cast(arr, options=cast_naive), _TS_TYPE)
        return pc.cast(arr, options=pc.CastOptions(_TS_TYPE, allow_time_truncate=True))
    if pa.types.is_date(t):
        _require_present(arr, where, name)
        return pc.cast(pc.cast(arr, pa.timestamp("us")), _TS_TYPE)
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        if pa.types.is_floating(t):
            arr = pc.if_else(pc.is_nan(arr), pa.scalar(None, t), arr)
        _require_present(arr, where, name)
        return _epoch(arr, where, name, arr)
    if not (_is_textual(t) or pa.types.is_null(t)):
        raise where.error(f"{name} must be a timestamp, ISO-8601 text or epoch seconds, but the column holds {t}")
    text = _text(arr, where, name)
    _require_present(text, where, name)
    null_text = pa.scalar(None, pa.string())
    numeric = pc.match_substring_regex(text, _EPOCH_RE)
    aware = pc.and_(pc.invert(numeric), pc.match_substring_regex(text, _OFFSET_RE))
    naive = pc.invert(pc.or_(numeric, aware))
    message = (
        f"{name} must be an ISO-8601 date-time (e.g. 2026-01-31T12:00:00Z; no zone means UTC) "
        "or epoch seconds, got {!r}"
    )
    numbers, bad_number = _try_cast(pc.if_else(numeric, text, null_text), pa.float64())
    aware_ts, bad_aware = _try_cast(
        pc.if_else(aware, text, null_text), pa.timestamp("us", tz="UTC")
    )
    naive_ts, bad_naive = _try_cast(pc.if_else(naive, text, null_text), pa.timestamp("us"))
    failures = [b for b in (bad_number, bad_aware, bad_naive) if b >= 0]
    if failures:
        bad = min(failures)
        raise where.error(message.format(text[bad].as_py()), bad)
    assert numbers is not None and aware_ts is not None and naive_ts is not None
    if pc.any(numeric).as_py():
        from_epoch = _epoch(pc.fill_null(numbers, 0.0), where, name, text)
    else:
        from_epoch = pa.nulls(len(text), _TS_TYPE)
    from_naive = pc.cast(naive_ts, _TS_TYPE)
    return pc.if_else(numeric, from_epoch, pc.if_else(aware, aware_ts, from_naive))


def _attr_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _attr_pairs(obj: Mapping[Any, Any] | Iterable[tuple[Any, Any]]) -> list[tuple[str, str]]:
    items = obj.items() if isinstance(obj, Mapping) else obj
    return [(str(k), _attr_value(v)) for k, v in items if v is not None]


def _attributes(arr: AnyArray, where: _Where) -> AnyArray:
    """Free-form product attributes as map<string, string>; null or blank means none."""
    arr = _decode(arr)
    t = arr.type
    n = len(arr)
    if pa.types.is_null(t):
        return pa.array([[] for _ in range(n)], _ATTRIBUTES_TYPE)
    out: list[list[tuple[str, str]]] = []
    if _is_textual(t):
        for index, text in enumerate(_text(arr, where, "attributes").to_pylist()):
            if text is None:
                out.append([])
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise where.error(
                    f"attributes must be a JSON object, got {text!r} ({exc.msg})", index
                ) from None
            if not isinstance(obj, dict):
                raise where.error(f"attributes must be a JSON object, got {text!r}", index)
            out.append(_attr_pairs(obj))
    elif pa.types.is_map(t) or pa.types.is_struct(t):
        for value in arr.to_pylist():
            out.append(_attr_pairs(value) if value else [])
    else:
        raise where.error(
            f"attributes must be JSON object text, a map or a struct, but the column holds {t}"
        )
    return pa.array(out, _ATTRIBUTES_TYPE)
