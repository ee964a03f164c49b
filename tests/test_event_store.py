"""The durable event store: WAL + synchronous=FULL, all-or-nothing batches, survives a killed writer."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shoprank.config import TableFile
from shoprank.data.readers import read_table as read_records
from shoprank.errors import DataError
from shoprank.store.events import Impression, SqliteEventStore

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)


def event(i: int, **changes: object) -> dict:
    return {"event_id": f"E{i}", "user_id": "U1", "session_id": "S1", "product_id": f"P{i % 3}",
            "event_type": "click", "ts": T0 + dt.timedelta(seconds=i), "query": None, "position": i,
            "request_id": "R1", "variant": "B", **changes}


def test_the_database_is_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    store = SqliteEventStore(tmp_path / "events.db")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_a_batch_is_stored_whole_or_not_at_all(tmp_path: Path) -> None:
    store = SqliteEventStore(tmp_path / "events.db")
    assert store.append([event(1), event(2)]) == 2
    with pytest.raises(DataError, match="event_id already stored"):
        store.append([event(3), event(1)])  # E1 again: E3 must not stay either
    with pytest.raises(DataError, match="row 2.*event_type"):
        store.append([event(4), event(5, event_type="hover")])
    with pytest.raises(DataError, match="row 1.*'user_id'"):
        store.append([event(6, user_id="")])
    assert store.events().column("event_id").to_pylist() == ["E1", "E2"]


def test_accepted_events_survive_a_killed_writer(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    writer = textwrap.dedent(f"""
        import datetime as dt, os, signal
        from shoprank.store.events import SqliteEventStore
        store = SqliteEventStore({str(path)!r})
        t0 = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
        for i in range(50):
            store.append([{{"event_id": f"K{{i}}-{{j}}", "user_id": "U", "session_id": "S", "product_id": "P",
                           "event_type": "view", "ts": t0 + dt.timedelta(seconds=i)}} for j in range(4)])
        print("accepted", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint: only what is on disk counts
    """)
    done = subprocess.run([sys.executable, "-c", writer], capture_output=True, text=True, timeout=120)
    assert "accepted" in done.stdout and done.returncode == -9, done.stderr
    assert SqliteEventStore(path).events().num_rows == 200


def test_export_is_read_back_by_the_event_reader(tmp_path: Path) -> None:
    store = SqliteEventStore(tmp_path / "events.db")
    store.append([event(i) for i in range(10)])
    assert store.export_parquet(tmp_path / "out" / "events.parquet", since=T0 + dt.timedelta(seconds=4)) == 6
    table = read_records(TableFile(path=str(tmp_path / "out" / "events.parquet")), "events")
    assert table.column("event_id").to_pylist() == [f"E{i}" for i in range(4, 10)]
    assert not (tmp_path / "out" / "events.parquet.partial").exists()


def test_impressions_round_trip(tmp_path: Path) -> None:
    store = SqliteEventStore(tmp_path / "events.db")
    shown = [Impression("R1", "U1", "A", f"P{i}", i + 1, T0, forced=i == 0) for i in range(3)]
    store.log_impressions(shown)
    store.close()
    assert SqliteEventStore(tmp_path / "events.db").impressions() == shown
