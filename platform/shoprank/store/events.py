"""The durable event store: behaviour events and impressions, on disk before anyone is told "stored".

:class:`EventStore` is the small interface the serving layer talks to; a server
database can replace :class:`SqliteEventStore` behind it. SQLite runs in WAL mode
with ``synchronous=FULL``: a committed transaction survives a crash of the
process and of the machine. Each call is one transaction, so a batch of events is
stored whole or not at all (a duplicate ``event_id`` rejects its whole batch), and
many events cost one disk sync; the serving layer batches concurrent requests into
one call for throughput.

Events come back in the record schema (:data:`EVENT_SCHEMA`), and
:meth:`EventStore.export_parquet` writes them where the ranker's incremental update
(``jobs/update_ranker.py --events``) reads them.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from shoprank.data.schema import EVENT_SCHEMA, EVENT_TYPES
from shoprank.errors import DataError

EVENT_FIELDS = [f.name for f in EVENT_SCHEMA]


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


class EventStore(ABC):
    """What serving needs from durable storage."""

    @abstractmethod
    def append(self, events: Sequence[dict]) -> int:
        """Store every event or none; returns how many were stored."""

    @abstractmethod
    def log_impressions(self, impressions: Sequence[Impression]) -> None:
        """Store the products an answer showed."""

    @abstractmethod
    def events(self, since: dt.datetime | None = None) -> pa.Table:
        """Stored events (EVENT_SCHEMA) in time order, optionally only those at or after ``since``."""

    @abstractmethod
    def impressions(self) -> list[Impression]:
        """Every logged impression, in the order logged."""

    def export_parquet(self, path: str | Path, since: dt.datetime | None = None) -> int:
        """Write the events to one Parquet file (atomically: a temporary file, then a rename)."""
        table = self.events(since)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        pq.write_table(table, partial)
        os.replace(partial, target)
        return table.num_rows


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


def _micros(value: dt.datetime) -> int:
    return int(_utc(value).timestamp() * 1_000_000)


class SqliteEventStore(EventStore):
    """SQLite in WAL mode, ``synchronous=FULL``; one connection guarded by a lock (one owner process)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS events (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE, user_id TEXT NOT NULL,
                session_id TEXT NOT NULL, product_id TEXT NOT NULL, event_type TEXT NOT NULL, ts INTEGER NOT NULL,
                query TEXT, position INTEGER, request_id TEXT, variant TEXT);
            CREATE INDEX IF NOT EXISTS events_by_ts ON events (ts);
            CREATE TABLE IF NOT EXISTS impressions (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL, user_id TEXT NOT NULL,
                variant TEXT NOT NULL, product_id TEXT NOT NULL, position INTEGER NOT NULL, ts INTEGER NOT NULL,
                forced INTEGER NOT NULL);
            """
        )

    def append(self, events: Sequence[dict]) -> int:
        rows = [self._row(event, i) for i, event in enumerate(events, start=1)]
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
                raise DataError(f"event_id already stored; nothing of this batch was stored ({exc})",
                                column="event_id") from None
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return len(rows)

    @staticmethod
    def _row(event: dict, row: int) -> tuple:
        missing = [name for name in ("event_id", "user_id", "session_id", "product_id", "event_type", "ts")
                   if event.get(name) in (None, "")]
        if missing:
            raise DataError(f"missing {missing[0]!r}", column=missing[0], row=row)
        if event["event_type"] not in EVENT_TYPES:
            raise DataError(f"event_type must be one of {', '.join(EVENT_TYPES)}, got {event['event_type']!r}",
                            column="event_type", row=row)
        ts = event["ts"]
        if not isinstance(ts, dt.datetime):
            raise DataError(f"ts must be a datetime, got {ts!r}", column="ts", row=row)
        return tuple(_micros(ts) if name == "ts" else event.get(name) for name in EVENT_FIELDS)

    def log_impressions(self, impressions: Sequence[Impression]) -> None:
        rows = [(i.request_id, i.user_id, i.variant, i.product_id, i.position, _micros(i.ts), int(i.forced))
                for i in impressions]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT INTO impressions (request_id, user_id, variant, product_id, position, ts, forced) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", rows,
            )
            self._db.execute("COMMIT")

    def events(self, since: dt.datetime | None = None) -> pa.Table:
        query = f"SELECT {', '.join(EVENT_FIELDS)} FROM events"
        arguments: tuple = ()
        if since is not None:
            query += " WHERE ts >= ?"
            arguments = (_micros(since),)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY ts, seq", arguments).fetchall()
        columns = list(zip(*rows)) if rows else [[] for _ in EVENT_FIELDS]
        arrays = {name: list(values) for name, values in zip(EVENT_FIELDS, columns)}
        arrays["ts"] = pa.array(arrays["ts"], pa.int64()).cast(pa.timestamp("us", tz="UTC"))
        return pa.Table.from_pydict(arrays, schema=EVENT_SCHEMA)

    def impressions(self) -> list[Impression]:
        with self._lock:
            rows = self._db.execute(
                "SELECT request_id, user_id, variant, product_id, position, ts, forced FROM impressions ORDER BY seq"
            ).fetchall()
        return [Impression(r[0], r[1], r[2], r[3], r[4], dt.datetime.fromtimestamp(r[5] / 1e6, dt.timezone.utc),
                           bool(r[6])) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
