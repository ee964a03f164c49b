"""A shop's own files: its catalogue, events and optional judgments, as CSV, Parquet or JSON Lines.

Each file is read as its format holds it (:mod:`~shoprank.data.readers.formats`), its
columns mapped to the record fields by the table's ``columns`` and checked
(:mod:`~shoprank.data.readers.records`), the events' derivable fields derived where the
config asks (:mod:`~shoprank.data.readers.derive`), rows dropped and a catalogue derived from the
events where it asks (:mod:`~shoprank.data.readers.transactions`), and the three tables checked
together (:func:`~shoprank.data.readers.tables.validate_source`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from shoprank.config import EventsFile, FilesConfig, ProductsFromEvents, TableFile
from shoprank.data.readers.derive import derive_events, derived_fields
from shoprank.data.readers.formats import read_raw
from shoprank.data.readers.records import Kind, pseudonymous, record_table
from shoprank.data.readers.tables import OrphanPolicy, SourceTables, TableOrigin, validate_source
from shoprank.data.readers.transactions import catalogue_from_events, filter_rows
from shoprank.data.schema import EVENT_SCHEMA, JUDGMENT_SCHEMA, SCHEMAS
from shoprank.errors import DataError
from shoprank.privacy import Pseudonyms


def read_table(spec: TableFile, kind: Kind, users: Pseudonyms | None = None) -> pa.Table:
    """Read one input file into a table of exactly the ``kind`` record schema.

    All single-file checks happen here (columns, types, nulls, allowed values, and
    unique ``product_id`` for products), so an error can point at the file row.
    Cross-table checks (events naming unknown products) need the catalog and live
    in :func:`validate_source`. An :class:`~shoprank.config.EventsFile` may derive
    ``event_type``, ``event_id`` and ``session_id`` instead (:mod:`~shoprank.data.readers.derive`)
    and drop rows by its ``keep`` filters (:mod:`~shoprank.data.readers.transactions`).
    With ``users``, the user ids are pseudonyms before anything is derived from them.
    """
    return _read(spec, kind, users).table


@dataclass(frozen=True)
class _Read:
    """One file read: its records, the raw (filtered) columns they came from, their file rows and the drops."""

    table: pa.Table
    raw: pa.Table
    names: list[str]
    rows: np.ndarray | None
    drops: dict[str, int]


def _read(spec: TableFile, kind: Kind, users: Pseudonyms | None, also: tuple[str, ...] = ()) -> _Read:
    """:func:`read_table`'s work, keeping what a catalogue derived from the events needs (``also``: the raw
    columns it reads)."""
    if kind not in SCHEMAS:
        raise ValueError(f"kind must be one of {', '.join(SCHEMAS)}, got {kind!r}")
    derived = derived_fields(spec)
    filtered = isinstance(spec, EventsFile) and bool(spec.keep)
    if (derived or filtered) and kind != "events":
        what = ", ".join(derived) if derived else "keep filters"
        raise ValueError(f"only an events table derives {what}; this one is read as {kind}")
    _check_mapping(spec, kind)
    wanted = {spec.columns.get(f.name, f.name) for f in SCHEMAS[kind]} | set(also)
    if isinstance(spec, EventsFile):
        wanted |= {rule.column for rule in spec.keep}
        if spec.event_type is not None and spec.event_type.column is not None:
            wanted.add(spec.event_type.column)
    raw, names = read_raw(spec, wanted)
    rows: np.ndarray | None = None
    drops: dict[str, int] = {}
    if isinstance(spec, EventsFile):
        raw, rows, drops = filter_rows(raw, names, spec)
    if not derived:
        table = pseudonymous(record_table(raw, names, kind, spec.columns, file=spec.path, rows=rows), users)
    else:
        assert isinstance(spec, EventsFile)  # only an EventsFile derives fields
        table = derive_events(raw, names, spec, derived, users, rows)
    return _Read(table, raw, names, rows, drops)


def read_files(
    files: FilesConfig, orphan_events: OrphanPolicy = "drop", users: Pseudonyms | None = None
) -> SourceTables:
    """Read a user's catalog, events and optional judgments files and validate them together.

    Without a judgments file the judgments table is empty: offline relevance is then
    measured from behaviour alone; without an events file the events table is empty.
    The catalog is a file, or derived from the events (``products.from_events``).
    """
    drops: dict[str, int] = {}
    origins: dict[str, TableOrigin] = {}
    if isinstance(files.products, TableFile):  # the catalogue first: its errors come before the events'
        products = read_table(files.products, "products")
        origins["products"] = _origin(files.products)
    if files.events is not None:
        derive = files.products.from_events if isinstance(files.products, ProductsFromEvents) else None
        also = (derive.title, derive.price) if derive is not None else ()
        read = _read(files.events, "events", users, also)
        events = read.table
        drops.update(read.drops)
        origins["events"] = _origin(files.events, read.rows)
    else:
        events = EVENT_SCHEMA.empty_table()
    if isinstance(files.products, ProductsFromEvents):
        assert files.events is not None  # checked by the config
        products, first_rows, derive_drops = catalogue_from_events(
            read.raw, read.names, events, read.rows, files.products.from_events, files.events.path)
        drops.update(derive_drops)
        origins["products"] = _origin(files.events, first_rows)
    judgments = (
        read_table(files.judgments, "judgments")
        if files.judgments is not None
        else JUDGMENT_SCHEMA.empty_table()
    )
    if files.judgments is not None:
        origins["judgments"] = _origin(files.judgments)
    source = validate_source(
        products, events, judgments, orphan_events=orphan_events, origins=origins
    )
    source.drops.update(drops)
    return source


@dataclass(frozen=True)
class FilesReader:
    """A shop's own files (``source.kind: files``) as a :class:`~shoprank.data.readers.tables.Reader`."""

    files: FilesConfig

    def read(self, orphan_events: OrphanPolicy = "drop", users: Pseudonyms | None = None) -> SourceTables:
        return read_files(self.files, orphan_events=orphan_events, users=users)


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


def _origin(spec: TableFile, rows: np.ndarray | None = None) -> TableOrigin:
    return TableOrigin(spec.path, spec.columns.get("product_id", "product_id"), rows)
