"""A shop's own files: its catalogue, events and optional judgments, as CSV, Parquet or JSON Lines.

Each file is read as its format holds it (:mod:`~shoprank.data.readers.formats`), its
columns mapped to the record fields by the table's ``columns`` and checked
(:mod:`~shoprank.data.readers.records`), the events' derivable fields derived where the
config asks (:mod:`~shoprank.data.readers.derive`), and the three tables checked
together (:func:`~shoprank.data.readers.tables.validate_source`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from shoprank.config import EventsFile, FilesConfig, TableFile
from shoprank.data.readers.derive import derive_events, derived_fields
from shoprank.data.readers.formats import read_raw
from shoprank.data.readers.records import Kind, pseudonymous, record_table
from shoprank.data.readers.tables import OrphanPolicy, SourceTables, TableOrigin, validate_source
from shoprank.data.schema import EVENT_SCHEMA, JUDGMENT_SCHEMA, SCHEMAS
from shoprank.errors import DataError
from shoprank.privacy import Pseudonyms


def read_table(spec: TableFile, kind: Kind, users: Pseudonyms | None = None) -> pa.Table:
    """Read one input file into a table of exactly the ``kind`` record schema.

    All single-file checks happen here (columns, types, nulls, allowed values, and
    unique ``product_id`` for products), so an error can point at the file row.
    Cross-table checks (events naming unknown products) need the catalog and live
    in :func:`validate_source`. An :class:`~shoprank.config.EventsFile` may derive
    ``event_type``, ``event_id`` and ``session_id`` instead (:mod:`~shoprank.data.readers.derive`).
    With ``users``, the user ids are pseudonyms before anything is derived from them.
    """
    if kind not in SCHEMAS:
        raise ValueError(f"kind must be one of {', '.join(SCHEMAS)}, got {kind!r}")
    derived = derived_fields(spec)
    if derived and kind != "events":
        raise ValueError(f"only an events table derives {', '.join(derived)}; this one is read as {kind}")
    _check_mapping(spec, kind)
    wanted = {spec.columns.get(f.name, f.name) for f in SCHEMAS[kind]}
    if not derived:
        raw, names = read_raw(spec, wanted)
        return pseudonymous(record_table(raw, names, kind, spec.columns, file=spec.path), users)
    assert isinstance(spec, EventsFile)  # only an EventsFile derives fields
    rule = spec.event_type
    if rule is not None and rule.column is not None:
        wanted.add(rule.column)
    raw, names = read_raw(spec, wanted)
    return derive_events(raw, names, spec, derived, users)


def read_files(
    files: FilesConfig, orphan_events: OrphanPolicy = "drop", users: Pseudonyms | None = None
) -> SourceTables:
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


def _origin(spec: TableFile) -> TableOrigin:
    return TableOrigin(spec.path, spec.columns.get("product_id", "product_id"))
