"""Event fields a file lacks, derived: event type, event id and session id.

A ratings-style export (user, item, rating, time) has none of them, and a shop should
not have to rewrite its export, so an events table's config
(:class:`~shoprank.config.EventsFile`) may ask for them to be derived instead of read:

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

import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from shoprank.config import EventsFile, EventTypeRule, TableFile
from shoprank.data.readers.records import column_index, pseudonymous, record_table
from shoprank.data.readers.values import AnyArray, Where, as_text, combined, first_true, require_present
from shoprank.privacy import Pseudonyms

logger = logging.getLogger(__name__)

DERIVABLE_EVENT_FIELDS: tuple[str, ...] = ("event_type", "event_id", "session_id")
"""Event fields an :class:`~shoprank.config.EventsFile` may derive instead of reading."""

EVENT_ID_HASH_KEY = "shoprank:event/1"
"""SipHash key of derived event ids (16 bytes), our own rather than pandas' default so the
ids depend on nothing but the event; changing it changes every derived id."""


def derived_fields(spec: TableFile) -> list[str]:
    """The event fields ``spec`` derives instead of reading (none for a plain table)."""
    if not isinstance(spec, EventsFile):
        return []
    return [name for name in DERIVABLE_EVENT_FIELDS if getattr(spec, name) is not None]


def derive_events(raw: pa.Table, names: list[str], spec: EventsFile, derived: list[str],
                  users: Pseudonyms | None, rows: np.ndarray | None = None) -> pa.Table:
    """Events whose ``derived`` fields are computed (see the module docstring), the rest read.

    The event type comes first, from the raw file; ids and sessions need the converted
    user (its pseudonym, with ``users``), product and time, so they are computed on the
    record table and replace placeholders that never leave this function. ``rows``: the file rows of
    ``raw``'s rows when filters dropped some, so errors point into the file.
    """
    for name in derived:
        if name in names:
            logger.warning("%s: column %r is ignored: the config derives %s instead", spec.path, name, name)
    n = raw.num_rows
    fixed: dict[str, AnyArray] = {name: pa.nulls(n, pa.string()) for name in derived}
    if spec.event_type is not None:
        fixed["event_type"] = _derived_event_types(raw, names, spec.event_type, spec.path, rows)
    table = pseudonymous(
        record_table(raw, names, "events", spec.columns, file=spec.path, rows=rows, fixed=fixed), users)
    if spec.session_id is not None:
        sessions = _derived_sessions(table.column("user_id"), table.column("ts"), spec.session_id.gap_minutes)
        table = _replace(table, "session_id", sessions)
    if spec.event_id is not None:
        table = _replace(table, "event_id", _derived_event_ids(table, with_session=spec.session_id is None))
    return table


def _replace(table: pa.Table, name: str, values: AnyArray) -> pa.Table:
    index = table.schema.get_field_index(name)
    return table.set_column(index, table.schema.field(name), values)


def _derived_event_types(raw: pa.Table, names: list[str], rule: EventTypeRule, file: str,
                         rows: np.ndarray | None) -> AnyArray:
    """One type for every row, or ``rule.column``'s values (as text) through ``rule.map``."""
    if rule.value is not None:
        return pa.repeat(pa.scalar(rule.value, pa.string()), raw.num_rows)
    assert rule.column is not None and rule.map is not None  # checked by the config
    where = Where(file, rule.column, rows)
    index = column_index(raw, rule.column, where)
    if index is None:
        raise where.error(
            f"missing column {rule.column!r} for record field 'event_type' (named by event_type.column); "
            f"the file has columns: {', '.join(names) or '(none)'}"
        )
    text = as_text(raw.column(index), where, rule.column)
    require_present(text, where, rule.column)
    positions = pc.index_in(text, value_set=pa.array(list(rule.map), pa.string()))
    bad = first_true(pc.is_null(positions))
    if bad >= 0:
        raise where.error(
            f"event_type.map has no entry for {text[bad].as_py()!r}; it maps: {', '.join(map(repr, rule.map))}",
            bad,
        )
    return pc.take(pa.array(list(rule.map.values()), pa.string()), positions)


def _derived_sessions(users: AnyArray, ts: AnyArray, gap_minutes: float) -> AnyArray:
    """``"{user}@{first event's time}"`` per event, a new session after more than the gap."""
    users = combined(users)
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
