"""The durable event store: behaviour events and impressions, on disk before anyone is told "stored".

:class:`EventStore` is the small interface the serving layer talks to, with two
backends chosen by ``serve.event_db`` (:func:`open_event_store`):

* :class:`SqliteEventStore`, a file on one disk: WAL mode with ``synchronous=FULL``,
  so a committed transaction survives a crash of the process and of the machine; one
  writer process on one node;
* :class:`PostgresEventStore`, a ``postgresql://`` server: the same schema and the
  same guarantees (a commit is durable, ``synchronous_commit`` as the server sets it),
  shared by writers on several nodes and outliving the Ray cluster.

Each call is one transaction, so a batch of events is stored whole or not at all (a
duplicate ``event_id`` rejects its whole batch), and many events cost one disk sync;
the serving layer batches concurrent requests into one call for throughput.

Events come back in the record schema (:data:`EVENT_SCHEMA`), and
:meth:`EventStore.export_parquet` writes them where the ranker's incremental update
(``jobs/update_ranker.py --events``) reads them.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import math
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from shoprank.config import Config
from shoprank.data.schema import ALL_EVENT_TYPES, EVENT_SCHEMA, NEGATIVE_EVENT_TYPES, PRODUCT_SCHEMA
from shoprank.errors import ConfigError, DataError, ShopRankError
from shoprank.store.location import Location

log = logging.getLogger(__name__)

EVENT_FIELDS = [f.name for f in EVENT_SCHEMA]
_TEXT_FIELDS = [f.name for f in EVENT_SCHEMA if pa.types.is_string(f.type)]
SERVER_SCHEMES = ("postgresql://", "postgres://")
"""``serve.event_db`` values that name a PostgreSQL server instead of an SQLite file."""
PRIVATE_MODE = 0o600
"""The event database, its WAL and shared memory, its lock and its backups: pseudonymous, but still each shopper's
behaviour, so only the owner reads them (as the keys)."""
WRITER_LOCK_WAIT_S = 30.0
"""How long a new writer waits for the previous one to let go of an SQLite store (Serve may start a replaced writer
replica before the old one has stopped) before it gives up with an error naming the lock file."""


class StoreBusy(ShopRankError):
    """The SQLite store is held by another writer, or is being restored: the caller may try again later."""


@dataclass(frozen=True)
class Impression:
    """One product shown in one answer: to whom, by which variant, at which position."""

    request_id: str
    user_id: str
    variant: str
    product_id: str
    position: int
    ts: dt.datetime
    forced: bool = False
    """The request forced its variant (side-by-side view): left out of the A/B report."""


class StoredEvent(NamedTuple):
    """An event as the user caches read it: its sequence number in the store, and what the features need."""

    seq: int
    user_id: str
    product_id: str
    event_type: str
    ts_s: float


class CatalogueChange(NamedTuple):
    """One entry of the catalogue change log: a product put (its record row, ``docs/data.md``) or deleted."""

    seq: int
    op: str
    """'put' or 'delete'."""
    product_id: str
    product: dict | None
    """The product's record row (the fields of ``PRODUCT_SCHEMA``) for a put; None for a delete."""
    ts_s: float


class EventStore(ABC):
    """What serving needs from durable storage."""

    @abstractmethod
    def append(self, events: Sequence[dict]) -> int:
        """Store every event or none; returns how many were stored."""

    @abstractmethod
    def log_impressions(self, impressions: Sequence[Impression], dropped: int = 0, batch_id: str | None = None) -> bool:
        """Store the products answers showed, and how many impressions were dropped before they reached the store
        (the serving queue was full: the A/B report says so instead of silently counting fewer). A batch whose
        ``batch_id`` is already stored is ignored (False): a queue that lost the answer to a committed batch sends
        it again under the same id, and CTR denominators must not count it twice."""

    @abstractmethod
    def dropped_impressions(self) -> int:
        """Impressions dropped before the store, in total."""

    @abstractmethod
    def changes(self, after: int, limit: int = 10_000) -> list[StoredEvent]:
        """Events stored after sequence number ``after``, in the order stored, at most ``limit``: what a replica's
        user cache reads to catch up (the store has one writer, so sequence numbers commit in order)."""

    @abstractmethod
    def last_seq(self) -> int:
        """The sequence number of the last event stored (0 for none)."""

    @abstractmethod
    def recent_of(self, user_id: str, limit: int) -> list[StoredEvent]:
        """``user_id``'s last ``limit`` behaviour events (no "not interested": :meth:`hidden_of` reads those), in the
        order stored."""

    @abstractmethod
    def events(self, since: dt.datetime | None = None) -> pa.Table:
        """Stored events (EVENT_SCHEMA) in time order, optionally only those at or after ``since``."""

    @abstractmethod
    def impressions(self) -> list[Impression]:
        """Every logged impression, in the order logged."""

    @abstractmethod
    def _fetch(self, sql: str, arguments: tuple = ()) -> list[tuple]:
        """The rows of one query (``{0}`` in ``sql``: the backend's parameter mark)."""

    @abstractmethod
    def _write(self, statements: Sequence[tuple[str, tuple]]) -> list[int]:
        """Run ``statements`` (``{0}``: the parameter mark) in one transaction; the rows each changed."""

    @abstractmethod
    def _write_claimed(self, claim: tuple[str, tuple], statements: Sequence[tuple[str, tuple]]) -> bool:
        """Run ``claim`` (an insert that changes no row when its batch is stored already), then, only if it changed
        one, ``statements``, all in one transaction; whether they ran. Catalogue batches commit one at a time, so
        their sequence numbers become visible in order and a follower's cursor never passes a change."""

    def fresh(self, rows: Sequence[tuple]) -> list[tuple]:
        """``rows`` (:func:`event_row`) less the events already stored or repeated in the batch with the same
        content: a client's retry of a batch whose answer it lost is accepted again and stored once. One id for
        events of different content is a :class:`DataError` naming the row (a client's bug, or a forged event)."""
        ids = list({row[0] for row in rows})
        seen: dict[str, tuple] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ", ".join(["{0}"] * len(chunk))
            for found in self._fetch(f"{_SELECT_IDENTITY} WHERE event_id IN ({marks})", tuple(chunk)):
                seen[found[0]] = tuple(found[1:])
        stored = set(seen)
        out = []
        for i, row in enumerate(rows, start=1):
            if row[0] not in seen:
                seen[row[0]] = _identity(row)
                out.append(row)
            elif seen[row[0]] != _identity(row):
                where = "already stored" if row[0] in stored else "given twice in this batch"
                raise DataError(f"event_id {row[0]!r} is {where} with other content; nothing of this batch was "
                                "stored", column="event_id", row=i)
        return out

    def erase(self, user_id: str, at: dt.datetime | None = None) -> dict[str, int]:
        """Delete every event and impression of ``user_id``; how many of each went. A tombstone tells the
        replicas' user caches (:meth:`erasures`) to forget the user too, and keeps out any impression stamped
        ``at`` or before (the app's clock, default now) that reaches the store later (:meth:`log_impressions`)."""
        events, impressions, _ = self._write([
            ("DELETE FROM events WHERE user_id = {0}", (user_id,)),
            ("DELETE FROM impressions WHERE user_id = {0}", (user_id,)),
            ("INSERT INTO erasures (user_id, ts) VALUES ({0}, {0})",
             (user_id, _micros(at) if at is not None else _now_micros())),
        ])
        self._scrub()
        return {"events": events, "impressions": impressions}

    def _scrub(self) -> None:
        """After an erasure: leave no readable copy of the deleted rows where this process can reach them.
        PostgreSQL keeps deleted rows in its pages until VACUUM reuses them (the server's autovacuum, or the
        operator's ``VACUUM``); nothing more can be done through a connection."""

    def erasures(self, after: int) -> list[tuple[int, str]]:
        """(sequence number, user) of the erasures after ``after``, in order."""
        return [(int(seq), user) for seq, user in
                self._fetch("SELECT seq, user_id FROM erasures WHERE seq > {0} ORDER BY seq", (after,))]

    def last_erasure(self) -> int:
        return int(self._fetch("SELECT coalesce(max(seq), 0) FROM erasures")[0][0])

    def exposure(self, after_impression: int, after_event: int) -> tuple[dict[str, int], dict[str, int], int, int]:
        """Impressions and clicks per product stored after the sequence numbers ``after_impression`` (impressions)
        and ``after_event`` (events), and the sequence numbers read up to: what a variant replica's exploration
        counts (:class:`shoprank.recsys.explore.ExposureCounts`), read on from where it stopped (0, 0: everything
        stored). Each table's last number is read first and only rows up to it are counted, so a row committed
        meanwhile is counted by the next call, never twice."""
        last_impression = int(self._fetch("SELECT coalesce(max(seq), 0) FROM impressions")[0][0])
        last_event = int(self._fetch("SELECT coalesce(max(seq), 0) FROM events")[0][0])
        impressions = self._fetch("SELECT product_id, count(*) FROM impressions WHERE seq > {0} AND seq <= {0} "
                                  "GROUP BY product_id", (after_impression, last_impression))
        clicks = self._fetch("SELECT product_id, count(*) FROM events WHERE seq > {0} AND seq <= {0} AND "
                             "event_type = 'click' GROUP BY product_id", (after_event, last_event))
        return ({p: int(n) for p, n in impressions}, {p: int(n) for p, n in clicks},
                max(last_impression, after_impression), max(last_event, after_event))

    def change_catalogue(self, puts: Sequence[dict], deletes: Sequence[str], at: dt.datetime, batch_id: str) -> int:
        """Append a batch of catalogue changes to the change log in one transaction: the ``puts`` (record rows of
        products, ``PRODUCT_SCHEMA``'s fields, already validated as ingest validates them) then the ``deletes``
        (product ids), dated ``at`` (the app's clock). Returns the changes stored: 0 when ``batch_id`` is stored
        already, so a client that lost the answer and sends the batch again changes the log once.

        Each row passes :func:`catalogue_row` first (puts are rows 1.., deletes follow them): a bad one is a
        :class:`DataError` naming its field and row, and nothing of the batch is stored. An id named twice in one
        batch is refused too: the batch would mean different things in different orders."""
        rows = catalogue_rows(puts, deletes)
        ts = _micros(at)
        claim = (_CLAIM_CATALOGUE_BATCH, (batch_id, ts, len(rows)))
        inserts = [(_INSERT_CATALOGUE_CHANGE, (batch_id, op, product_id, product, ts))
                   for op, product_id, product in rows]
        return len(rows) if self._write_claimed(claim, inserts) else 0

    def catalogue_changes(self, after: int, limit: int = 10_000) -> list[CatalogueChange]:
        """The catalogue changes after sequence number ``after``, in order, at most ``limit``: what a replica reads to
        follow the catalogue (its cursor is the last one it applied)."""
        return [_catalogue_change(row) for row in self._fetch(
            "SELECT seq, op, product_id, product, ts FROM catalogue_changes WHERE seq > {0} ORDER BY seq LIMIT {0}",
            (after, limit))]

    def last_catalogue_change(self) -> tuple[int, float]:
        """(sequence number, epoch seconds) of the last catalogue change, (0, 0.0) when there is none: the mark a
        pipeline run folds the log up to, and what a replica's lag is measured against."""
        rows = self._fetch("SELECT seq, ts FROM catalogue_changes ORDER BY seq DESC LIMIT 1")
        return (int(rows[0][0]), rows[0][1] / 1e6) if rows else (0, 0.0)

    def catalogue_state(self, through: int) -> dict[str, dict | None]:
        """Each product the log changed up to sequence number ``through``, as its last change left it: its record row,
        or None when that change deleted it (what the next pipeline run folds into its catalogue)."""
        rows = self._fetch("SELECT product_id, product FROM catalogue_changes WHERE seq IN "
                           "(SELECT max(seq) FROM catalogue_changes WHERE seq <= {0} GROUP BY product_id) ORDER BY seq",
                           (through,))  # in log order: the next run appends new products in the order they came
        return {product_id: json.loads(product) if product is not None else None for product_id, product in rows}

    def hidden_of(self, user_id: str) -> list[tuple[str, str]]:
        """(event_type, product_id) of every "not interested" ``user_id`` sent, in the order stored, however old and
        however many events came after: a shopper never sees again what they hid, while the behaviour a replica
        reads (:meth:`recent_of`) is only the last ``features.history_events``. One query on ``events_by_user``."""
        return [(kind, product) for kind, product in self._fetch(_SELECT_HIDDEN, (user_id, *NEGATIVE_EVENT_TYPES))]

    def purge(self, before: dt.datetime) -> dict[str, int]:
        """Delete the events and impressions dated before ``before`` (``serve.retention_days``); how many went.

        "Not interested" events stay: they are a standing preference the shopper stated, not behaviour logged about
        them, and purging one would show the hidden product again (docs/security.md). Erasure deletes them. The
        catalogue change log is never purged: it is the catalogue's history, which replicas replay and the next
        pipeline run folds in (a recall must not come back because its deletion grew old)."""
        events, impressions, _ = self._write([(_PURGE_EVENTS, (_micros(before), *NEGATIVE_EVENT_TYPES)),
                                              ("DELETE FROM impressions WHERE ts < {0}", (_micros(before),)),
                                              ("DELETE FROM impression_batches WHERE ts < {0}", (_micros(before),))])
        return {"events": events, "impressions": impressions}

    def shown(self, request_id: str) -> tuple[str, set[str]] | None:
        """(user, products) of the answer ``request_id`` as logged, or None if no impression names it."""
        rows = self._fetch("SELECT user_id, product_id FROM impressions WHERE request_id = {0}", (request_id,))
        return (rows[0][0], {product for _, product in rows}) if rows else None

    def export_parquet(self, path: str | Path, since: dt.datetime | None = None) -> int:
        """Write the events to one Parquet file (atomically: a temporary file, then a rename)."""
        table = self.events(since)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        pq.write_table(table, partial)
        os.replace(partial, target)
        return table.num_rows


def event_row(event: dict, row: int) -> tuple:
    """The stored row of one event (``ts`` in microseconds), or a :class:`DataError` naming its field and row.

    Both backends store exactly what this accepts, so an event is stored by one whenever by the other
    (PostgreSQL text cannot hold a NUL character: it is refused here for both).
    """
    missing = [name for name in ("event_id", "user_id", "session_id", "product_id", "event_type", "ts")
               if event.get(name) in (None, "")]
    if missing:
        raise DataError(f"missing {missing[0]!r}", column=missing[0], row=row)
    if event["event_type"] not in ALL_EVENT_TYPES:
        raise DataError(f"event_type must be one of {', '.join(ALL_EVENT_TYPES)}, got {event['event_type']!r}",
                        column="event_type", row=row)
    ts = event["ts"]
    if not isinstance(ts, dt.datetime):
        raise DataError(f"ts must be a datetime, got {ts!r}", column="ts", row=row)
    for name in _TEXT_FIELDS:
        if isinstance(event.get(name), str) and "\x00" in event[name]:
            raise DataError(f"{name} holds a NUL character", column=name, row=row)
    return tuple(_micros(ts) if name == "ts" else event.get(name) for name in EVENT_FIELDS)


PRODUCT_FIELDS = [f.name for f in PRODUCT_SCHEMA]
_REQUIRED_PRODUCT_TEXT = ("product_id", "title")
_OPTIONAL_PRODUCT_TEXT = ("description", "category", "brand")


def catalogue_row(product: dict, row: int) -> str:
    """The stored JSON of one product put (its record row, ``PRODUCT_SCHEMA``'s fields in order), or a
    :class:`DataError` naming its field and row.

    The callers validated it as ingest does (:func:`shoprank.data.catalogue.validated_products`); this is the
    store's last line, so what either backend stores is a row every stage can read: the required fields present,
    text as text, a finite price >= 0, attributes a map of text, and no NUL character (PostgreSQL text cannot hold
    one: refused here for both)."""
    if not isinstance(product, dict):
        raise DataError(f"a product put must be an object of its fields, got {type(product).__name__}", row=row)
    unknown = sorted(set(product) - set(PRODUCT_FIELDS))
    if unknown:
        raise DataError(f"{unknown[0]!r} is not a product field; fields are: {', '.join(PRODUCT_FIELDS)}",
                        column=unknown[0], row=row)
    for name in _REQUIRED_PRODUCT_TEXT:
        if not isinstance(product.get(name), str) or not product[name]:
            raise DataError(f"missing {name!r}", column=name, row=row)
    for name in _OPTIONAL_PRODUCT_TEXT:
        if product.get(name) is not None and not isinstance(product[name], str):
            raise DataError(f"{name} must be text or null, got {type(product[name]).__name__}", column=name, row=row)
    price = product.get("price")
    if isinstance(price, bool) or not isinstance(price, (int, float)) or not math.isfinite(price) or price < 0:
        raise DataError(f"price must be a finite number >= 0, got {price!r}", column="price", row=row)
    attributes = product.get("attributes") or {}
    if not isinstance(attributes, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in attributes.items()):
        raise DataError("attributes must map text to text", column="attributes", row=row)
    texts = [(name, product.get(name)) for name in (*_REQUIRED_PRODUCT_TEXT, *_OPTIONAL_PRODUCT_TEXT)]
    texts += [("attributes", text) for pair in attributes.items() for text in pair]
    for name, text in texts:
        if isinstance(text, str) and "\x00" in text:
            raise DataError(f"{name} holds a NUL character", column=name, row=row)
    stored = {name: product.get(name) for name in PRODUCT_FIELDS}
    stored["price"], stored["attributes"] = float(price), dict(attributes)
    return json.dumps(stored, ensure_ascii=False)


def catalogue_rows(puts: Sequence[dict], deletes: Sequence[str]) -> list[tuple[str, str, str | None]]:
    """(op, product id, product JSON or None) of a batch of changes, puts first, each checked
    (:func:`catalogue_row`; a deleted id as a product id), or a :class:`DataError` naming the first bad row (puts
    are rows 1.., deletes follow them) and nothing changed."""
    rows: list[tuple[str, str, str | None]] = []
    first_row: dict[str, int] = {}
    for row, (op, change) in enumerate([*(("put", p) for p in puts), *(("delete", d) for d in deletes)], start=1):
        stored = catalogue_row(change, row) if op == "put" else None
        product_id = change["product_id"] if op == "put" else change
        if op == "delete" and (not isinstance(product_id, str) or not product_id or "\x00" in product_id):
            raise DataError(f"a deleted product_id must be non-empty text without a NUL, got {product_id!r}",
                            column="product_id", row=row)
        if product_id in first_row:
            raise DataError(f"product_id {product_id!r} is changed twice in this batch (first at row "
                            f"{first_row[product_id]}); nothing of this batch was stored", column="product_id", row=row)
        first_row[product_id] = row
        rows.append((op, product_id, stored))
    return rows


def _catalogue_change(row: tuple) -> CatalogueChange:
    seq, op, product_id, product, ts = row
    return CatalogueChange(int(seq), op, product_id, json.loads(product) if product is not None else None, ts / 1e6)


def _impression_row(impression: Impression) -> tuple:
    i = impression
    return i.request_id, i.user_id, i.variant, i.product_id, i.position, _micros(i.ts), i.forced


def _events_table(rows: list[tuple]) -> pa.Table:
    """Rows of EVENT_FIELDS (``ts`` in microseconds) as an EVENT_SCHEMA table."""
    columns = list(zip(*rows)) if rows else [[] for _ in EVENT_FIELDS]
    arrays = {name: list(values) for name, values in zip(EVENT_FIELDS, columns)}
    arrays["ts"] = pa.array(arrays["ts"], pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    return pa.Table.from_pydict(arrays, schema=EVENT_SCHEMA)


def _impressions(rows: list[tuple]) -> list[Impression]:
    return [Impression(r[0], r[1], r[2], r[3], r[4], dt.datetime.fromtimestamp(r[5] / 1e6, dt.timezone.utc),
                       bool(r[6])) for r in rows]


_SELECT_EVENTS = f"SELECT {', '.join(EVENT_FIELDS)} FROM events"
_SELECT_IMPRESSIONS = ("SELECT request_id, user_id, variant, product_id, position, ts, forced FROM impressions "
                       "ORDER BY seq")
_INSERT_IMPRESSIONS = ("INSERT INTO impressions (request_id, user_id, variant, product_id, position, ts, forced) "
                       "VALUES ({})")
_FORGET_ERASED = ("DELETE FROM impressions WHERE user_id IN (SELECT user_id FROM erasures WHERE user_id IN ({1})) "
                  "AND ts <= (SELECT max(erasures.ts) FROM erasures WHERE erasures.user_id = impressions.user_id)")
"""Impressions of an erased user from before the erasure, among the users of the batch just written (``{1}``: one
placeholder each): another ingress replica may still have held some in its queue when the user was erased, and they
must not come back when it flushes. Only a batch user with a tombstone (``erasures_by_user``) costs a look at their
impressions, so the flushes, every fraction of a second, stay cheap as erasures accumulate."""


def _forget_erased(impressions: Sequence[Impression], placeholder: str) -> tuple[str, tuple[str, ...]]:
    """:data:`_FORGET_ERASED` for the users of ``impressions``, and its arguments."""
    users = tuple(sorted({i.user_id for i in impressions}))
    return _FORGET_ERASED.format(placeholder, ", ".join([placeholder] * len(users))), users


_CLAIM_BATCH = ("INSERT INTO impression_batches (batch_id, ts, impressions) VALUES ({0}, {0}, {0}) "
                "ON CONFLICT (batch_id) DO NOTHING")
"""Record an impression batch's id in the transaction that writes its rows: no row changed means the store has it
already (a retry after a lost answer), and the batch is skipped. In PostgreSQL a concurrent retry waits for the
first transaction and then changes nothing."""


def _batch_claim(impressions: Sequence[Impression], batch_id: str, placeholder: str) -> tuple[str, tuple]:
    """:data:`_CLAIM_BATCH` and its arguments: the batch is dated by its latest impression, on the app's clock, so
    the retention purge (on that clock too) forgets old batch ids with their impressions."""
    dated = max((i.ts for i in impressions), default=None)
    return (_CLAIM_BATCH.format(placeholder),
            (batch_id, _micros(dated) if dated is not None else _now_micros(), len(impressions)))


_SELECT_CHANGES = "SELECT seq, user_id, product_id, event_type, ts FROM events WHERE seq > {0} ORDER BY seq LIMIT {0}"
_NEGATIVE_MARKS = ", ".join(["{0}"] * len(NEGATIVE_EVENT_TYPES))
"""One parameter mark per "not interested" type: the statements below take the types as arguments."""
_SELECT_RECENT = ("SELECT seq, user_id, product_id, event_type, ts FROM events WHERE user_id = {0} "
                  f"AND event_type NOT IN ({_NEGATIVE_MARKS}) ORDER BY seq DESC LIMIT {{0}}")
_SELECT_HIDDEN = ("SELECT event_type, product_id FROM events WHERE user_id = {0} "
                  f"AND event_type IN ({_NEGATIVE_MARKS}) ORDER BY seq")
_PURGE_EVENTS = f"DELETE FROM events WHERE ts < {{0}} AND event_type NOT IN ({_NEGATIVE_MARKS})"
_DUPLICATE = "event_id already stored; nothing of this batch was stored"
IDENTITY_FIELDS = ("user_id", "product_id", "event_type", "query", "position", "request_id", "variant", "quantity")
"""What makes two events with one id the same event (``ts`` and ``session_id`` may be the server's defaults, which
a retry gets anew)."""
_SELECT_IDENTITY = f"SELECT event_id, {', '.join(IDENTITY_FIELDS)} FROM events"
_CLAIM_CATALOGUE_BATCH = ("INSERT INTO catalogue_batches (batch_id, ts, changes) VALUES ({0}, {0}, {0}) "
                          "ON CONFLICT (batch_id) DO NOTHING")
"""Record a catalogue batch's id in the transaction that appends its changes: no row changed means it is stored
already (a client's retry), and nothing is appended again."""
_INSERT_CATALOGUE_CHANGE = ("INSERT INTO catalogue_changes (batch_id, op, product_id, product, ts) "
                            "VALUES ({0}, {0}, {0}, {0}, {0})")
_EXTRA_TABLES = """
    CREATE INDEX IF NOT EXISTS impressions_by_user ON impressions (user_id);
    CREATE INDEX IF NOT EXISTS impressions_by_request ON impressions (request_id);
    CREATE INDEX IF NOT EXISTS impressions_by_ts ON impressions (ts);
    CREATE TABLE IF NOT EXISTS erasures (seq {seq}, user_id TEXT NOT NULL, ts BIGINT NOT NULL);
    CREATE INDEX IF NOT EXISTS erasures_by_user ON erasures (user_id);
    CREATE TABLE IF NOT EXISTS impression_batches (
        batch_id TEXT PRIMARY KEY, ts BIGINT NOT NULL, impressions INTEGER NOT NULL);
    CREATE INDEX IF NOT EXISTS impression_batches_by_ts ON impression_batches (ts);
    CREATE TABLE IF NOT EXISTS catalogue_changes (
        seq {seq}, batch_id TEXT NOT NULL, op TEXT NOT NULL, product_id TEXT NOT NULL, product TEXT,
        ts BIGINT NOT NULL);
    CREATE INDEX IF NOT EXISTS catalogue_changes_by_product ON catalogue_changes (product_id, seq);
    CREATE TABLE IF NOT EXISTS catalogue_batches (batch_id TEXT PRIMARY KEY, ts BIGINT NOT NULL, changes INTEGER NOT NULL);
"""
"""Indexes, the erasures' tombstones, the impression batches already stored and the catalogue change log (each
change: 'put' with the product's record row as JSON text, or 'delete'; and the batch ids stored), in both backends
(``{seq}``: the backend's auto-numbered key); ``IF NOT EXISTS`` adds what a store made by an earlier version lacks."""


_SQLITE_SEQ = "INTEGER PRIMARY KEY AUTOINCREMENT"


def _identity(row: tuple) -> tuple:
    return tuple(row[EVENT_FIELDS.index(name)] for name in IDENTITY_FIELDS)


def _stored(rows: list[tuple]) -> list[StoredEvent]:
    return [StoredEvent(seq, user, product, kind, ts / 1e6) for seq, user, product, kind, ts in rows]


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


def _micros(value: dt.datetime) -> int:
    return int(_utc(value).timestamp() * 1_000_000)


def _now_micros() -> int:
    return _micros(dt.datetime.now(dt.timezone.utc))


class SqliteEventStore(EventStore):
    """SQLite in WAL mode, ``synchronous=FULL``; one connection guarded by a lock. One process writes (the
    serving app's event store writer); others on the same disk read beside it (the variants' user caches), which
    WAL allows without blocking the writer.

    The writer (``writer=True``) holds an exclusive lock on ``<db>.lock`` for its lifetime (:func:`writer_lock`),
    so that a restore cannot replace the store under it (:func:`restore_sqlite` refuses while it is held); the OS
    lets go of it when the process dies, so a killed writer never blocks a restore. Readers take no lock."""

    def __init__(self, path: str | Path, *, writer: bool = False, lock_wait_s: float = WRITER_LOCK_WAIT_S) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._writer_lock: int | None = None
        if writer:
            self._writer_lock = writer_lock(self.path, lock_wait_s)
            if self._writer_lock is None:
                raise StoreBusy(f"{self.path} is held by another writer (lock {lock_path(self.path)}) for more than "
                                f"{lock_wait_s:g} s: is another Serve app writing to it? Stop it first")
        _private_database(self.path, tighten=writer)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA secure_delete=ON")  # deleted rows are overwritten with zeros, not left in free space
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS events (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE, user_id TEXT NOT NULL,
                session_id TEXT NOT NULL, product_id TEXT NOT NULL, event_type TEXT NOT NULL, ts INTEGER NOT NULL,
                query TEXT, position INTEGER, request_id TEXT, variant TEXT, quantity INTEGER);
            CREATE INDEX IF NOT EXISTS events_by_ts ON events (ts);
            CREATE INDEX IF NOT EXISTS events_by_user ON events (user_id, seq);
            CREATE TABLE IF NOT EXISTS impressions (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL, user_id TEXT NOT NULL,
                variant TEXT NOT NULL, product_id TEXT NOT NULL, position INTEGER NOT NULL, ts INTEGER NOT NULL,
                forced INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS impression_drops (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, ts INTEGER NOT NULL, dropped INTEGER NOT NULL);
            """ + _EXTRA_TABLES.format(seq=_SQLITE_SEQ)
        )
        if "quantity" not in {row[1] for row in self._db.execute("PRAGMA table_info(events)")}:
            self._db.execute("ALTER TABLE events ADD COLUMN quantity INTEGER")  # a store made before the field

    def append(self, events: Sequence[dict]) -> int:
        rows = [event_row(event, i) for i, event in enumerate(events, start=1)]
        rows = self.fresh(rows)
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(
                    f"INSERT INTO events ({', '.join(EVENT_FIELDS)}) VALUES ({', '.join('?' * len(EVENT_FIELDS))})",
                    rows,
                )
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                self._db.execute("ROLLBACK")
                raise DataError(f"{_DUPLICATE} ({exc})", column="event_id") from None
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return len(events)

    def _fetch(self, sql: str, arguments: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql.format("?"), arguments).fetchall()

    def _write(self, statements: Sequence[tuple[str, tuple]]) -> list[int]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                counts = [self._db.execute(sql.format("?"), arguments).rowcount for sql, arguments in statements]
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return counts

    def _write_claimed(self, claim: tuple[str, tuple], statements: Sequence[tuple[str, tuple]]) -> bool:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # one writer at a time: sequence numbers commit in order
            try:
                if not self._db.execute(claim[0].format("?"), claim[1]).rowcount:
                    self._db.execute("ROLLBACK")
                    return False
                for sql, arguments in statements:
                    self._db.execute(sql.format("?"), arguments)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return True

    def _scrub(self) -> None:
        """Copy the WAL into the database file and empty it (``wal_checkpoint(TRUNCATE)``): the WAL still holds the
        pages as they were before the erasure, the user's rows in them, until a checkpoint; ``secure_delete``
        zeroed them in the pages the checkpoint writes back."""
        with self._lock:
            busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            log.warning("the WAL of %s could not be emptied after an erasure (a reader held it): it keeps copies "
                        "of the erased rows until later writes reuse it", self.path)

    def log_impressions(self, impressions: Sequence[Impression], dropped: int = 0, batch_id: str | None = None) -> bool:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if batch_id is not None and not self._db.execute(*_batch_claim(impressions, batch_id, "?")).rowcount:
                    self._db.execute("ROLLBACK")
                    return False
                self._db.executemany(_INSERT_IMPRESSIONS.format(", ".join("?" * 7)), map(_impression_row, impressions))
                if impressions:
                    self._db.execute(*_forget_erased(impressions, "?"))
                if dropped:
                    self._db.execute("INSERT INTO impression_drops (ts, dropped) VALUES (?, ?)", (_now_micros(), dropped))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return True

    def dropped_impressions(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT coalesce(sum(dropped), 0) FROM impression_drops").fetchone()[0])

    def changes(self, after: int, limit: int = 10_000) -> list[StoredEvent]:
        with self._lock:
            return _stored(self._db.execute(_SELECT_CHANGES.format("?"), (after, limit)).fetchall())

    def last_seq(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0])

    def recent_of(self, user_id: str, limit: int) -> list[StoredEvent]:
        with self._lock:
            return _stored(self._db.execute(_SELECT_RECENT.format("?"),
                                            (user_id, *NEGATIVE_EVENT_TYPES, limit)).fetchall()[::-1])

    def events(self, since: dt.datetime | None = None) -> pa.Table:
        where, arguments = (" WHERE ts >= ?", (_micros(since),)) if since is not None else ("", ())
        with self._lock:
            return _events_table(self._db.execute(f"{_SELECT_EVENTS}{where} ORDER BY ts, seq", arguments).fetchall())

    def impressions(self) -> list[Impression]:
        with self._lock:
            return _impressions(self._db.execute(_SELECT_IMPRESSIONS).fetchall())

    def backup(self, target: str | Path) -> int:
        """Copy the database to ``target`` with SQLite's online backup (writers may go on); its event count.

        The copy is written beside ``target`` and renamed, so a failed backup leaves no half file.
        """
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        partial.unlink(missing_ok=True)
        _private_database(partial)
        copy = sqlite3.connect(partial)
        try:
            with self._lock:
                self._db.backup(copy)
            count = copy.execute("SELECT count(*) FROM events").fetchone()[0]
        finally:
            copy.close()
        os.replace(partial, target)
        return count

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._writer_lock is not None:
                os.close(self._writer_lock)  # closing the descriptor lets go of the lock
                self._writer_lock = None


def lock_path(database: Path) -> Path:
    """The sidecar file whose lock marks an SQLite store's writer."""
    return database.with_name(database.name + ".lock")


def writer_lock(database: Path, wait_s: float) -> int | None:
    """An open descriptor holding the exclusive lock of ``database``'s writer (close it to let go), or None when
    another process still held it after ``wait_s`` seconds.

    ``flock`` rather than SQLite's own locks: SQLite locks one transaction, this one the writer's lifetime, and the
    kernel drops it with the process, so a crashed writer leaves nothing to clean up."""
    descriptor = os.open(lock_path(database), os.O_RDWR | os.O_CREAT, PRIVATE_MODE)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return descriptor
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(descriptor)
                return None
            time.sleep(0.1)


def _private_database(path: Path, *, tighten: bool = False) -> None:
    """Create ``path`` mode 0600 before SQLite opens it (SQLite would create it with the umask's mode, 0644 here,
    and gives its WAL and shared-memory files the database's mode); with ``tighten``, a store made 0644 by an
    earlier version and its WAL files are made 0600 too (its writer owns them).

    A file that exists already is never opened here: closing any descriptor of a file drops every POSIX lock the
    process holds on it, the SHARED lock of an SQLite connection the process has open on the store included (a
    variant replica opens a second store beside its first, its exposure follower's). A process left holding no lock
    counts as gone: the last connection to close elsewhere (the writer, for a restore) then deletes the WAL and the
    shared memory while this process still maps them, and its connections read a stale view for good, "database
    disk image is malformed" once a checkpoint rewrites pages they cached (https://sqlite.org/howtocorrupt.html,
    2.2). ``O_EXCL`` creates a new file or fails without opening one."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, PRIVATE_MODE))
    except FileExistsError:
        pass
    if tighten:
        for file in (path, *(path.with_name(path.name + suffix) for suffix in ("-wal", "-shm"))):
            if file.exists():
                os.chmod(file, PRIVATE_MODE)


class PostgresEventStore(EventStore):
    """A PostgreSQL database (psycopg 3, a small connection pool): the SQLite store's schema and guarantees,
    shared by processes on any node.

    The DSN carries no password: libpq reads it from a passfile (``PGPASSFILE``, ``passfile=``
    in the DSN, or ``~/.pgpass``, mode 0600), so no secret sits in a config file or a log.
    """

    _SCHEMA = """
        CREATE TABLE IF NOT EXISTS events (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, event_id TEXT NOT NULL UNIQUE,
            user_id TEXT NOT NULL, session_id TEXT NOT NULL, product_id TEXT NOT NULL, event_type TEXT NOT NULL,
            ts BIGINT NOT NULL, query TEXT, position BIGINT, request_id TEXT, variant TEXT, quantity INTEGER);
        ALTER TABLE events ADD COLUMN IF NOT EXISTS quantity INTEGER;
        CREATE INDEX IF NOT EXISTS events_by_ts ON events (ts);
        CREATE INDEX IF NOT EXISTS events_by_user ON events (user_id, seq);
        CREATE TABLE IF NOT EXISTS impressions (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, request_id TEXT NOT NULL, user_id TEXT NOT NULL,
            variant TEXT NOT NULL, product_id TEXT NOT NULL, position INTEGER NOT NULL, ts BIGINT NOT NULL,
            forced BOOLEAN NOT NULL);
        CREATE TABLE IF NOT EXISTS impression_drops (
            seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, ts BIGINT NOT NULL, dropped BIGINT NOT NULL);
    """ + _EXTRA_TABLES.format(seq="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY")
    _SCHEMA_LOCK = 0x5A0B_EE17
    """Advisory lock id: replicas starting together create the tables one after the other (``IF NOT EXISTS``
    alone races in PostgreSQL's catalogue)."""
    _CATALOGUE_LOCK = 0x5A0B_CA7A
    """Advisory lock id: catalogue batches commit one at a time (:meth:`_write_claimed`)."""

    def __init__(self, dsn: str, *, max_connections: int = 4, connect_timeout_s: float = 30.0) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        self.dsn = dsn
        self._psycopg = psycopg
        try:  # one plain connection first: libpq's reason (no such database, wrong password) in the error
            with psycopg.connect(dsn, connect_timeout=max(1, round(connect_timeout_s))) as db, db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(%s)", (self._SCHEMA_LOCK,))
                db.execute(self._SCHEMA)
        except psycopg.OperationalError as exc:
            raise ConfigError(f"serve.event_db: cannot use {redacted(dsn)}: {str(exc).strip()}") from None
        self._pool = ConnectionPool(dsn, min_size=1, max_size=max_connections, kwargs={"autocommit": True},
                                    name="shoprank-events", open=False)
        self._pool.open(wait=True, timeout=connect_timeout_s)

    def append(self, events: Sequence[dict]) -> int:
        rows = [event_row(event, i) for i, event in enumerate(events, start=1)]
        rows = self.fresh(rows)
        insert = f"INSERT INTO events ({', '.join(EVENT_FIELDS)}) VALUES ({', '.join(['%s'] * len(EVENT_FIELDS))})"
        try:
            with self._pool.connection() as db, db.transaction(), db.cursor() as cursor:
                cursor.executemany(insert, rows)
        except self._psycopg.errors.UniqueViolation as exc:
            raise DataError(f"{_DUPLICATE} ({exc.diag.message_detail or exc})", column="event_id") from None
        return len(events)

    def _fetch(self, sql: str, arguments: tuple = ()) -> list[tuple]:
        with self._pool.connection() as db:
            return db.execute(sql.format("%s"), arguments).fetchall()

    def _write(self, statements: Sequence[tuple[str, tuple]]) -> list[int]:
        with self._pool.connection() as db, db.transaction(), db.cursor() as cursor:
            counts = []
            for sql, arguments in statements:
                cursor.execute(sql.format("%s"), arguments)
                counts.append(cursor.rowcount)
        return counts

    def _write_claimed(self, claim: tuple[str, tuple], statements: Sequence[tuple[str, tuple]]) -> bool:
        with self._pool.connection() as db, db.transaction(), db.cursor() as cursor:
            # one catalogue batch at a time, on every node: an identity number is taken at insert, so two batches
            # in flight could commit out of order and a follower past the later one would never read the earlier
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", (self._CATALOGUE_LOCK,))
            cursor.execute(claim[0].format("%s"), claim[1])
            if not cursor.rowcount:
                return False  # leaving the block commits an empty transaction: nothing was written
            for sql, arguments in statements:
                cursor.execute(sql.format("%s"), arguments)
        return True

    def log_impressions(self, impressions: Sequence[Impression], dropped: int = 0, batch_id: str | None = None) -> bool:
        with self._pool.connection() as db, db.transaction(), db.cursor() as cursor:
            if batch_id is not None:
                cursor.execute(*_batch_claim(impressions, batch_id, "%s"))
                if not cursor.rowcount:
                    return False  # leaving the block commits an empty transaction: nothing was written
            cursor.executemany(_INSERT_IMPRESSIONS.format(", ".join(["%s"] * 7)), map(_impression_row, impressions))
            if impressions:
                cursor.execute(*_forget_erased(impressions, "%s"))
            if dropped:
                cursor.execute("INSERT INTO impression_drops (ts, dropped) VALUES (%s, %s)", (_now_micros(), dropped))
        return True

    def dropped_impressions(self) -> int:
        with self._pool.connection() as db:
            return int(db.execute("SELECT coalesce(sum(dropped), 0) FROM impression_drops").fetchone()[0])

    def changes(self, after: int, limit: int = 10_000) -> list[StoredEvent]:
        with self._pool.connection() as db:
            return _stored(db.execute(_SELECT_CHANGES.format("%s"), (after, limit)).fetchall())

    def last_seq(self) -> int:
        with self._pool.connection() as db:
            return int(db.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0])

    def recent_of(self, user_id: str, limit: int) -> list[StoredEvent]:
        with self._pool.connection() as db:
            return _stored(db.execute(_SELECT_RECENT.format("%s"),
                                      (user_id, *NEGATIVE_EVENT_TYPES, limit)).fetchall()[::-1])

    def events(self, since: dt.datetime | None = None) -> pa.Table:
        where, arguments = (" WHERE ts >= %s", (_micros(since),)) if since is not None else ("", ())
        with self._pool.connection() as db:
            return _events_table(db.execute(f"{_SELECT_EVENTS}{where} ORDER BY ts, seq", arguments).fetchall())

    def impressions(self) -> list[Impression]:
        with self._pool.connection() as db:
            return _impressions(db.execute(_SELECT_IMPRESSIONS).fetchall())

    def close(self) -> None:
        self._pool.close()


def restore_sqlite(backup: str | Path, target: str | Path, *, replace: bool = False) -> int:
    """Put an SQLite backup (:meth:`SqliteEventStore.backup`) in place of ``target``'s content; its event count.

    The backup is checked first (an SQLite file with the store's tables, ``integrity_check`` ok), and a
    store that holds events is only replaced when asked, so a wrong file or a slip loses nothing. The store's
    writer lock is taken for the restore: while a writer (the Serve app) holds it the restore is refused, since a
    writer would go on committing, and answering 200, to the store the backup replaces; the Serve app restores
    through its writer instead (``POST /admin/events/restore``), which pauses writing meanwhile.

    The backup is copied into the live database by SQLite's backup API, in one transaction, not by replacing the
    file: a crash leaves the old content, and readers with the store open (the variants' user caches) read the
    restored content rather than a deleted file's. Events, erasures and catalogue changes are then numbered on from
    the replaced store's last sequence numbers, never below: the user caches and the catalogue followers read what
    comes after their cursors (:class:`~shoprank.serving.user_state.UserCache`), and a number reused below one would
    hide a new event, erasure or catalogue change from them. An erasure the replaced store holds and the backup does
    not (made after the backup was taken) is made again in the same transaction, so a restore never brings an erased
    shopper back; so is a catalogue change (appended again, after the backup's), so a restore never lists a recalled
    product again nor loses one put since.
    """
    backup, target = Path(backup), Path(target)
    count = checked_backup(backup)
    target.parent.mkdir(parents=True, exist_ok=True)
    held = writer_lock(target, wait_s=0.0)
    if held is None:
        raise StoreBusy(f"{target} is in use: the Serve app is writing to it (lock {lock_path(target)}), and events "
                        "it accepts during a restore would be lost. Stop the app first (`make stop`, or `serve "
                        "shutdown`), or restore through the app: `shoprank events restore FILE --app URL` "
                        "(POST /admin/events/restore, admin key), which pauses its writer; nothing was restored")
    try:
        _private_database(target, tighten=True)
        with sqlite3.connect(_read_only(backup), uri=True) as source:
            live = sqlite3.connect(target, isolation_level=None)
            try:
                stored = _count_events(live)
                if stored and not replace:
                    raise DataError(f"{target} holds {stored} events; add --replace to overwrite them with the "
                                    f"backup's {count}")
                numbered = _sequences(live)
                erased = _erasures(live)
                changed, batches = _catalogue_log(live)
                source.backup(live)
                live.execute("PRAGMA secure_delete=ON")
                live.executescript(_EXTRA_TABLES.format(seq=_SQLITE_SEQ))  # a backup older than a table gets it
                live.execute("BEGIN IMMEDIATE")
                for table, last in numbered.items():  # numbering goes on after the replaced store's: see the docstring
                    live.execute("DELETE FROM sqlite_sequence WHERE name = ? AND seq < ?", (table, last))
                    live.execute("INSERT INTO sqlite_sequence (name, seq) SELECT ?, ? WHERE NOT EXISTS "
                                 "(SELECT 1 FROM sqlite_sequence WHERE name = ?)", (table, last, table))
                restored_erasures = set(_erasures(live))
                for user, ts in erased:  # an erasure made after the backup was taken is made again
                    if (user, ts) not in restored_erasures:
                        live.execute("DELETE FROM events WHERE user_id = ?", (user,))
                        live.execute("DELETE FROM impressions WHERE user_id = ?", (user,))
                        live.execute("INSERT INTO erasures (user_id, ts) VALUES (?, ?)", (user, ts))
                restored_changes = set(_catalogue_log(live)[0])
                for change in changed:  # a catalogue change made after the backup was taken is appended again
                    if change not in restored_changes:
                        live.execute(_INSERT_CATALOGUE_CHANGE.format("?"), change)
                for batch in batches:  # and its batch stays claimed: a client's retry of it changes nothing
                    live.execute(_CLAIM_CATALOGUE_BATCH.format("?"), batch)
                live.execute("COMMIT")
                live.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                live.close()
    finally:
        os.close(held)
    return count


def checked_backup(backup: Path) -> int:
    """The event count of ``backup``, an SQLite event store whose ``integrity_check`` is ok, or a
    :class:`DataError` saying why it is not one."""
    try:
        with sqlite3.connect(_read_only(backup), uri=True) as source:
            if source.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("integrity_check failed")
            count = int(source.execute("SELECT count(*) FROM events").fetchone()[0])
            source.execute("SELECT count(*) FROM impressions").fetchone()
    except (sqlite3.Error, OSError) as exc:
        raise DataError(f"{backup} is not an SQLite event store ({exc}); nothing was restored") from None
    return count


def _read_only(database: Path) -> str:
    """A read-only URI of ``database``: the path percent-encoded, so no ``?`` or ``#`` in it can add URI options
    (``mode=rwc`` would create a file; the path may come from an HTTP request)."""
    return database.absolute().as_uri() + "?mode=ro"


def _erasures(db: sqlite3.Connection) -> list[tuple[str, int]]:
    """(user, time) of every tombstone in ``db``, none for a new store."""
    try:
        return [(user, int(ts)) for user, ts in db.execute("SELECT user_id, ts FROM erasures ORDER BY seq")]
    except sqlite3.OperationalError:
        return []


def _catalogue_log(db: sqlite3.Connection) -> tuple[list[tuple], list[tuple]]:
    """Every catalogue change in ``db`` (batch, op, product, row, time; in order) and every catalogue batch claimed
    (id, time, changes), none for a new store or one made before the log existed."""
    try:
        changes = db.execute("SELECT batch_id, op, product_id, product, ts FROM catalogue_changes ORDER BY seq")
        return [tuple(change) for change in changes], [tuple(batch) for batch in db.execute(
            "SELECT batch_id, ts, changes FROM catalogue_batches")]
    except sqlite3.OperationalError:
        return [], []


def _sequences(db: sqlite3.Connection) -> dict[str, int]:
    """The last sequence numbers of the tables that followers read after a cursor (events, erasures, catalogue
    changes), none for a new store."""
    try:
        return dict(db.execute("SELECT name, seq FROM sqlite_sequence "
                               "WHERE name IN ('events', 'erasures', 'catalogue_changes')"))
    except sqlite3.OperationalError:
        return {}


def _count_events(db: sqlite3.Connection) -> int:
    """Events in an SQLite store, 0 for a file with no events table yet (a new store)."""
    try:
        return int(db.execute("SELECT count(*) FROM events").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def is_server_database(location: str) -> bool:
    """True if ``serve.event_db`` names a PostgreSQL server rather than an SQLite file."""
    return location.startswith(SERVER_SCHEMES)


def redacted(dsn: str) -> str:
    """``dsn`` with any password replaced by ``***``, for messages and logs."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        parts = conninfo_to_dict(dsn)
    except Exception:  # an unparsable DSN: say nothing of it but its scheme
        return dsn.split("://", 1)[0] + "://..."
    if "password" in parts:
        parts["password"] = "***"
    return make_conninfo(**parts)


def event_db_location(config: Config) -> str:
    """``serve.event_db`` as the store opens it: a ``postgresql://`` DSN as given, else the SQLite file's
    absolute path (relative paths are under the run root).

    SQLite needs a local disk: with a run root on remote storage (``s3://``...), ``serve.event_db``
    must be an absolute local path or a server database.
    """
    if is_server_database(config.serve.event_db):
        return config.serve.event_db
    path = Path(config.serve.event_db)
    if path.is_absolute():
        return str(path)
    root = Location(config.run.root)
    if not root.is_local:
        raise ConfigError(f"serve.event_db: {config.serve.event_db!r} would be under run.root {config.run.root}, "
                          "which is not a local disk; SQLite needs one, so give an absolute local path "
                          "(or a postgresql:// server)")
    return str((Path(root.path()) / path).resolve())


def open_event_store(location: str) -> EventStore:
    """The store ``location`` names: a ``postgresql://`` DSN or an SQLite file path (resolved by the caller)."""
    return PostgresEventStore(location) if is_server_database(location) else SqliteEventStore(location)


def open_event_writer(location: str) -> EventStore:
    """The store ``location`` names, opened by its one writer: an SQLite file's writer takes the file's writer lock
    (:class:`SqliteEventStore`); a PostgreSQL server takes any number of writers."""
    return PostgresEventStore(location) if is_server_database(location) else SqliteEventStore(location, writer=True)
