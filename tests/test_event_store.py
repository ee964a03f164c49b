"""The durable event store on both backends (an SQLite file; a real PostgreSQL server started by the tests):
all-or-nothing batches, survives a killed writer, exports, impressions; SQLite's WAL + FULL sync and its
online backup and restore; what serving reads and writes through it (the replicas' user caches, the queued
impressions)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from postgres import PostgresServer
from shoprank.cli import main
from shoprank.config import TableFile, load_config
from shoprank.data.readers import read_table as read_records
from shoprank.errors import ConfigError, DataError
from shoprank.serving.impressions import ImpressionQueue
from shoprank.serving.user_state import UserCache
from shoprank.store.events import (
    EventStore, Impression, PostgresEventStore, SqliteEventStore, open_event_store, restore_sqlite,
)

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)


def event(i: int, **changes: object) -> dict:
    return {"event_id": f"E{i}", "user_id": "U1", "session_id": "S1", "product_id": f"P{i % 3}",
            "event_type": "click", "ts": T0 + dt.timedelta(seconds=i), "query": None, "position": i,
            "request_id": "R1", "variant": "B", **changes}


def shoprank(argv: list[str]) -> int:
    """The ``shoprank`` command's exit status (a user error exits with 2 through ``SystemExit``)."""
    try:
        return main(argv)
    except SystemExit as exited:
        return int(exited.code)


@pytest.fixture(params=["sqlite", "postgres"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new store's ``serve.event_db``: an SQLite file, or an empty database of the session's server."""
    if request.param == "sqlite":
        return str(tmp_path / "events.db")
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.database()


@pytest.fixture
def store(location: str) -> Iterator[EventStore]:
    opened = open_event_store(location)
    yield opened
    opened.close()


def test_each_location_opens_its_backend(location: str, store: EventStore) -> None:
    assert isinstance(store, PostgresEventStore if location.startswith("postgresql://") else SqliteEventStore)


def test_the_sqlite_database_is_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    store = SqliteEventStore(tmp_path / "events.db")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_a_retried_batch_is_accepted_again_and_stored_once(store: EventStore) -> None:
    """A client that lost the answer sends the batch again (the server's default ts differs): the same answer."""
    assert store.append([event(1), event(2)]) == 2
    retry = [event(1, ts=event(1)["ts"] + dt.timedelta(seconds=5)), event(2), event(3), event(3)]
    assert store.append(retry) == 4
    assert sorted(store.events().column("event_id").to_pylist()) == ["E1", "E2", "E3"]
    assert store.last_seq() == 3


def test_a_batch_is_stored_whole_or_not_at_all(store: EventStore) -> None:
    assert store.append([event(1), event(2)]) == 2
    with pytest.raises(DataError, match="row 2.*'E1' is already stored with other content"):
        store.append([event(3), event(1, event_type="purchase")])  # E1 again, another event: E3 must not stay either
    with pytest.raises(DataError, match="row 2.*given twice in this batch"):
        store.append([event(3), event(3, product_id="P9")])
    with pytest.raises(DataError, match="row 2.*event_type"):
        store.append([event(4), event(5, event_type="hover")])
    with pytest.raises(DataError, match="row 1.*'user_id'"):
        store.append([event(6, user_id="")])
    with pytest.raises(DataError, match="row 2.*query holds a NUL"):  # PostgreSQL text cannot hold one: nor SQLite's
        store.append([event(7), event(8, query="sofa\x00")])
    assert store.append([event(9, ts=dt.datetime(9999, 1, 1, tzinfo=dt.timezone.utc), query="\u00e9t\u00e9 \U0001f6cb")]) == 1
    stored = store.events()
    assert stored.column("event_id").to_pylist() == ["E1", "E2", "E9"]
    assert stored.column("query").to_pylist()[-1] == "\u00e9t\u00e9 \U0001f6cb"


def test_accepted_events_survive_a_killed_writer(location: str) -> None:
    writer = textwrap.dedent(f"""
        import datetime as dt, os, signal
        from shoprank.store.events import open_event_store
        store = open_event_store({location!r})
        t0 = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
        for i in range(50):
            store.append([{{"event_id": f"K{{i}}-{{j}}", "user_id": "U", "session_id": "S", "product_id": "P",
                           "event_type": "view", "ts": t0 + dt.timedelta(seconds=i)}} for j in range(4)])
        print("accepted", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint: only what is on disk counts
    """)
    done = subprocess.run([sys.executable, "-c", writer], capture_output=True, text=True, timeout=120)
    assert "accepted" in done.stdout and done.returncode == -9, done.stderr
    assert open_event_store(location).events().num_rows == 200


def test_export_is_read_back_by_the_event_reader(store: EventStore, tmp_path: Path) -> None:
    store.append([event(i) for i in range(10)])
    assert store.export_parquet(tmp_path / "out" / "events.parquet", since=T0 + dt.timedelta(seconds=4)) == 6
    table = read_records(TableFile(path=str(tmp_path / "out" / "events.parquet")), "events")
    assert table.column("event_id").to_pylist() == [f"E{i}" for i in range(4, 10)]
    assert not (tmp_path / "out" / "events.parquet.partial").exists()


def test_impressions_round_trip(location: str, store: EventStore) -> None:
    shown = [Impression("R1", "U1", "A", f"P{i}", i + 1, T0, forced=i == 0) for i in range(3)]
    store.log_impressions(shown)
    store.close()
    assert open_event_store(location).impressions() == shown


def test_a_server_that_cannot_be_used_is_named_without_its_password(postgres_server: PostgresServer) -> None:
    missing = postgres_server.dsn("no_such_db")
    with pytest.raises(ConfigError, match='cannot use .*dbname=no_such_db.*database "no_such_db" does not exist'):
        open_event_store(missing)
    with pytest.raises(ConfigError, match=r"serve.event_db: .*holds a password.*passfile.*postgresql://u:\*\*\*@") as refused:
        load_config("tiny", ["serve.event_db=postgresql://u:hunter2@127.0.0.1:5432/shop"])
    assert "hunter2" not in str(refused.value)


def test_backup_while_writing_and_restore(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``shoprank events backup`` copies a live store (SQLite's online backup); ``restore`` puts it back."""
    root = tmp_path / "runs"
    overrides = ["--set", f"run.root={root}"]
    live = SqliteEventStore(root / "events.sqlite", writer=True)  # the serving writer keeps it open meanwhile
    live.append([event(i) for i in range(5)])
    assert shoprank(["events", "backup", str(tmp_path / "copy.sqlite"), "--config", "tiny", *overrides]) == 0
    assert "5 events" in capsys.readouterr().out
    live.append([event(i) for i in range(5, 8)])
    assert shoprank(["events", "restore", str(tmp_path / "copy.sqlite"), "--config", "tiny", "--replace",
                     *overrides]) == 2
    assert "the Serve app is writing to it" in capsys.readouterr().err
    live.append([event(8)])  # the writer goes on: nothing was replaced under it
    live.close()
    assert SqliteEventStore(root / "events.sqlite").events().num_rows == 9

    assert shoprank(["events", "restore", str(tmp_path / "copy.sqlite"), "--config", "tiny", *overrides]) == 2
    assert "holds 9 events; add --replace" in capsys.readouterr().err
    assert shoprank(["events", "restore", str(tmp_path / "copy.sqlite"), "--config", "tiny", "--replace",
                     *overrides]) == 0
    assert SqliteEventStore(root / "events.sqlite").events().num_rows == 5

    (tmp_path / "broken.sqlite").write_bytes(b"not a database" * 100)
    assert shoprank(["events", "restore", str(tmp_path / "broken.sqlite"), "--config", "tiny", "--replace",
                     *overrides]) == 2
    assert "not an SQLite event store" in capsys.readouterr().err
    assert SqliteEventStore(root / "events.sqlite").events().num_rows == 5, "a refused restore changes nothing"
    with sqlite3.connect(root / "events.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_restore_never_brings_back_a_shopper_erased_after_the_backup(tmp_path: Path) -> None:
    store = SqliteEventStore(tmp_path / "events.sqlite", writer=True)
    store.append([event(0), event(1, user_id="U2"), event(2, user_id="U2")])
    store.backup(tmp_path / "before.sqlite")
    store.erase("U2")
    store.close()
    restore_sqlite(tmp_path / "before.sqlite", tmp_path / "events.sqlite", replace=True)
    restored = SqliteEventStore(tmp_path / "events.sqlite")
    assert restored.events().column("user_id").to_pylist() == ["U1"]
    assert [user for _, user in restored.erasures(0)] == ["U2"]  # the replicas' caches forget U2 again too
    restored.close()


def test_a_server_store_has_no_file_to_back_up(postgres_server: PostgresServer, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    dsn = postgres_server.database()
    assert shoprank(["events", "backup", str(tmp_path / "copy"), "--config", "tiny", "--set",
                     f"serve.event_db={dsn}"]) == 2
    err = capsys.readouterr().err
    assert "pg_dump" in err and "Traceback" not in err


def test_two_user_caches_see_each_acknowledged_event_before_their_next_answer(location: str,
                                                                               store: EventStore) -> None:
    """Two replicas' caches beside the writer (``store``): each reads a user on a miss, then catches up with what
    the writer committed since, in the order stored; a second app's reader of the same store sees it all too."""
    store.append([event(i) for i in range(3)])
    caches = [UserCache(open_event_store(location), per_user=4, max_events=100) for _ in range(2)]
    for cache in caches:
        cache.catch_up()
        assert [product for product, _, _ in cache.events_of("U1")] == ["P0", "P1", "P2"]
        assert cache.events_of("U2") == [] and cache.events_of(None) == []
    store.append([event(3), event(4, user_id="U2"), event(5, event_type="purchase")])
    for cache in caches:
        assert cache.catch_up() == 3
        # at most per_user events, the oldest gone; U2 was read (empty) before the purchase arrived
        assert [(product, kind) for product, kind, _ in cache.events_of("U1")] == [
            ("P1", "click"), ("P2", "click"), ("P0", "click"), ("P2", "purchase")]
        assert [product for product, _, _ in cache.events_of("U2")] == ["P1"]
        assert cache.summary()["events"] == 5
        cache.store.close()


def test_erasure_and_retention_delete_rows_and_every_cache_forgets_the_user(location: str, store: EventStore) -> None:
    store.append([event(i, user_id="U1" if i % 2 else "U2") for i in range(6)])
    store.log_impressions([Impression("R1", "U1", "A", "P1", 1, T0), Impression("R1", "U1", "A", "P2", 2, T0),
                           Impression("R2", "U2", "B", "P1", 1, T0 + dt.timedelta(days=2))])
    assert store.shown("R1") == ("U1", {"P1", "P2"}) and store.shown("R-none") is None
    forgotten: list[list[str]] = [[], [], []]
    """What each cache told the rest of its replica to forget (``forget_elsewhere``: the run's history)."""
    caches = [UserCache(open_event_store(location), per_user=10, max_events=100, forget_elsewhere=forgotten[i].append)
              for i in range(2)]
    for cache in caches:
        assert len(cache.events_of("U1")) == 3
    assert store.erase("U1") == {"events": 3, "impressions": 2}
    assert store.erase("U1") == {"events": 0, "impressions": 0}
    assert set(store.events().column("user_id").to_pylist()) == {"U2"} and store.shown("R1") is None
    assert forgotten == [[], [], []]  # the caches hear of an erasure when they catch up, before their next answer
    # a replica started after the erasure reads every tombstone at once
    caches.append(UserCache(open_event_store(location), per_user=10, max_events=100,
                            forget_elsewhere=forgotten[2].append))
    for cache in caches:
        cache.catch_up()
        assert "U1" not in cache.users and cache.events_of("U1") == [] and cache.summary()["events"] == 0
        cache.store.close()
    assert forgotten == [["U1", "U1"]] * 3  # erased twice: two tombstones, each told once
    assert store.purge(T0 + dt.timedelta(seconds=3)) == {"events": 2, "impressions": 0}  # E0 and E2 of U2
    assert store.events().column("event_id").to_pylist() == ["E4"]
    assert store.purge(T0 + dt.timedelta(days=3)) == {"events": 1, "impressions": 1}


def test_sqlite_erasure_leaves_no_readable_copy_in_the_database_or_its_wal(tmp_path: Path) -> None:
    """The erased user's rows are overwritten (``secure_delete``) and the WAL that held them is emptied (a
    checkpoint), while a replica's reader has the store open: the files' bytes keep nothing of them, and the
    pseudonym only where the tombstone (row and index) keeps it, as in a store that never saw the user's rows."""
    user = "ps_" + "e" * 32
    path = tmp_path / "events.db"
    store, reader = SqliteEventStore(path), SqliteEventStore(path)
    store.append([event(i, user_id=user if i % 2 else "U2", event_id=f"erased-event-{i}" if i % 2 else f"E{i}",
                        session_id="erased-session" if i % 2 else "S2") for i in range(40)])
    store.log_impressions([Impression("erased-request", user, "A", "P1", 1, T0)])
    assert len(reader.recent_of(user, 10)) == 10
    assert store.erase(user) == {"events": 20, "impressions": 1}
    only_tombstone = SqliteEventStore(tmp_path / "tombstone.db")
    only_tombstone.erase(user)

    def files(db: Path) -> bytes:
        return b"".join(f.read_bytes() for f in db.parent.glob(db.name + "*"))

    erased = files(path)
    for marker in ("erased-event-", "erased-session", "erased-request"):
        assert marker.encode() not in erased, marker
    assert erased.count(user.encode()) == files(tmp_path / "tombstone.db").count(user.encode()) == 2
    assert reader.events().num_rows == 20 and reader.recent_of(user, 10) == []
    for opened in (store, reader, only_tombstone):
        opened.close()


def test_impressions_of_an_erased_user_that_arrive_late_stay_out(store: EventStore) -> None:
    """Another ingress replica may still queue a user's impressions when the user is erased: those stamped before the
    erasure never reach the store; a later answer's do."""
    store.erase("U1", at=T0 + dt.timedelta(minutes=5))
    store.log_impressions([Impression("R1", "U1", "A", "P1", 1, T0 + dt.timedelta(minutes=4)),
                           Impression("R2", "U2", "A", "P1", 1, T0 + dt.timedelta(minutes=4)),
                           Impression("R3", "U1", "B", "P2", 1, T0 + dt.timedelta(minutes=6))])
    assert sorted((i.request_id, i.user_id) for i in store.impressions()) == [("R2", "U2"), ("R3", "U1")]


def test_the_user_cache_stays_within_its_event_bound(tmp_path: Path) -> None:
    """Past ``max_events`` the users asked for least recently leave the cache; asked again, they are read from the
    store with nothing lost."""
    store = SqliteEventStore(tmp_path / "events.db")
    store.append([event(i, user_id=f"U{i % 5}") for i in range(20)])
    cache = UserCache(store, per_user=10, max_events=9)
    for user in ("U0", "U1", "U2", "U3"):
        assert len(cache.events_of(user)) == 4
    assert list(cache.users) == ["U2", "U3"] and cache.summary()["events"] == 8
    store.append([event(20, user_id="U0"), event(21, user_id="U3")])
    cache.catch_up()
    assert len(cache.events_of("U3")) == 5 and len(cache.events_of("U0")) == 5  # U0 read again, with its new event
    assert list(cache.users) == ["U0"] and cache.summary()["events"] == 5  # U0's 5 pushed U2 and U3 out


def test_a_full_impression_queue_drops_the_oldest_and_the_store_counts_them(tmp_path: Path) -> None:
    store = SqliteEventStore(tmp_path / "events.db")
    failing = {"now": True}

    async def sink(impressions: list[Impression], dropped: int, batch_id: str) -> None:
        if failing["now"]:
            raise ConnectionError("the writer is restarting")
        store.log_impressions(impressions, dropped, batch_id)

    heard: list[int] = []  # what the app's metrics hear: each drop as it happens, before any batch reaches the store
    held: list[int] = []

    async def scenario() -> None:
        queue = ImpressionQueue(sink, capacity=5, on_drop=heard.append, on_waiting=held.append)
        queue.put([Impression(f"R{i}", "U1", "A", f"P{i}", 1, T0) for i in range(4)])
        with pytest.raises(ConnectionError):
            await queue.flush()  # nothing lost: the batch waits to be sent again, whole
        queue.put([Impression(f"R{i}", "U1", "A", f"P{i}", 1, T0) for i in range(4, 7)])
        # the unsent batch may be in the store already (its answer lost): the drops take the newer ones waiting
        assert queue.summary() == {"waiting": 5, "dropped": 2, "capacity": 5} and heard == [2]
        failing["now"] = False
        assert await queue.flush() == 5 and await queue.flush() == 0
        assert held == [4, 5, 1, 0]

    asyncio.run(scenario())
    assert [i.request_id for i in store.impressions()] == ["R0", "R1", "R2", "R3", "R6"]
    assert store.dropped_impressions() == 2


def test_an_impression_batch_sent_twice_is_stored_once(store: EventStore) -> None:
    """The writer committed a batch but its answer was lost: the queue sends it again under its id, and the store,
    which has that id, ignores it (impressions are CTR denominators: at-least-once would inflate them)."""
    shown = [Impression("R1", "U1", "A", f"P{i}", i + 1, T0) for i in range(3)]
    assert store.log_impressions(shown, 2, "batch-1") is True
    assert store.log_impressions(shown, 2, "batch-1") is False
    assert store.log_impressions([], 1, "batch-2") is True and store.log_impressions([], 1, "batch-2") is False
    assert store.impressions() == shown and store.dropped_impressions() == 3
    store.purge(T0 + dt.timedelta(days=1))  # batch ids are forgotten with the impressions they dated
    assert store.log_impressions(shown, 0, "batch-1") is True


def test_the_queue_sends_a_batch_again_under_its_id_when_the_answer_is_lost(tmp_path: Path) -> None:
    store = SqliteEventStore(tmp_path / "events.db")
    sent: list[str] = []

    async def committed_then_lost(impressions: list[Impression], dropped: int, batch_id: str) -> None:
        sent.append(batch_id)
        store.log_impressions(impressions, dropped, batch_id)
        if len(sent) == 1:
            raise ConnectionError("the answer never came back")

    async def scenario() -> None:
        queue = ImpressionQueue(committed_then_lost, capacity=10)
        queue.put([Impression(f"R{i}", "U1", "A", "P1", 1, T0) for i in range(3)])
        with pytest.raises(ConnectionError):
            await queue.flush()
        queue.put([Impression("R3", "U1", "A", "P1", 1, T0)])
        assert await queue.flush() == 4  # the unsent batch again (ignored by the store), then the new one

    asyncio.run(scenario())
    assert sent[0] == sent[1] != sent[2] and len(sent) == 3
    assert [i.request_id for i in store.impressions()] == ["R0", "R1", "R2", "R3"]


def test_the_database_its_wal_and_backups_are_private(tmp_path: Path) -> None:
    """Pseudonymous, but each shopper's behaviour: mode 0600 like the keys, whatever the umask allows."""
    def modes() -> dict[str, int]:
        return {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()}

    previous = os.umask(0o022)
    try:
        store = SqliteEventStore(tmp_path / "events.db", writer=True)
        store.append([event(1)])
        store.backup(tmp_path / "backup.db")
        live = modes()  # the WAL and shared memory exist while the store is open (the last close removes them)
        store.close()
        assert restore_sqlite(tmp_path / "backup.db", tmp_path / "restored.db") == 1
    finally:
        os.umask(previous)
    assert {"events.db", "events.db-wal", "events.db-shm", "events.db.lock", "backup.db"} <= set(live)
    made = {**live, **modes()}
    assert "restored.db" in made and made == {name: 0o600 for name in made}


def test_a_killed_writer_never_blocks_a_restore(tmp_path: Path) -> None:
    """The writer's lock is the kernel's: it goes with the process, however the process ends."""
    database = tmp_path / "events.db"
    SqliteEventStore(database).backup(tmp_path / "backup.db")
    writer = textwrap.dedent(f"""
        import os, signal
        from shoprank.store.events import SqliteEventStore
        SqliteEventStore({str(database)!r}, writer=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert subprocess.run([sys.executable, "-c", writer], timeout=120).returncode == -9
    assert restore_sqlite(tmp_path / "backup.db", database) == 0


def test_a_reader_process_with_two_stores_open_reads_the_restored_store(tmp_path: Path) -> None:
    """A variant replica opens two stores on the file (its user cache's and its exposure follower's). Opening the
    second must not drop the process's SQLite locks on it: a process holding none counts as gone, and the writer's
    close before a restore deleted the WAL and shared memory under it; its first connection then read its old view
    for good, "database disk image is malformed" once a checkpoint rewrote pages it had cached."""
    database = tmp_path / "events.db"
    writer = SqliteEventStore(database, writer=True)
    writer.append([event(i) for i in range(1, 4)])
    writer.backup(tmp_path / "backup.db")
    writer.append([event(i) for i in range(4, 6)])
    reader = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from shoprank.store.events import SqliteEventStore
        reader = SqliteEventStore({str(database)!r})
        reader.changes(0)
        SqliteEventStore({str(database)!r})  # the exposure follower's, opened after the user cache's first read
        print("ready", flush=True)
        sys.stdin.readline()
        try:
            print([change.seq for change in reader.changes(0)], flush=True)
        except Exception as exc:
            print(repr(exc), flush=True)
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline() == "ready\n"
        writer.close()
        restore_sqlite(tmp_path / "backup.db", database, replace=True)
        writer = SqliteEventStore(database, writer=True)
        writer.append([event(i) for i in range(6, 8)])
        writer.erase("U2")  # an erasure's checkpoint rewrites the database file's pages
        reader.stdin.write("read\n")
        reader.stdin.flush()
        assert reader.stdout.readline() == "[1, 2, 3, 6, 7]\n"
    finally:
        reader.kill()
        reader.wait(timeout=60)
        writer.close()


def product(i: int, **changes: object) -> dict:
    """A catalogue put: a product's record row as ingest validates it."""
    return {"product_id": f"N{i}", "title": f"Lantern {i}", "description": None, "category": "Outdoors > Lights",
            "brand": "Acme", "price": 10.0 + i, "attributes": {"colour": "red"}, **changes}


def test_a_catalogue_batch_is_stored_whole_once_and_in_order(store: EventStore) -> None:
    assert store.last_catalogue_change() == (0, 0.0) and store.catalogue_changes(0) == []
    assert store.change_catalogue([product(1), product(2)], ["P7"], T0, "batch-1") == 3
    assert store.change_catalogue([product(1), product(2)], ["P7"], T0, "batch-1") == 0  # a retry: stored once
    changes = store.catalogue_changes(0)
    assert [(c.seq, c.op, c.product_id) for c in changes] == [(1, "put", "N1"), (2, "put", "N2"), (3, "delete", "P7")]
    assert changes[0].product == product(1) and changes[2].product is None and changes[0].ts_s == T0.timestamp()
    later = T0 + dt.timedelta(minutes=5)
    assert store.change_catalogue([product(1, price=9.5, title="Lantern \u00e9t\u00e9")], ["N2"], later, "batch-2") == 2
    assert store.last_catalogue_change() == (5, later.timestamp())
    assert [c.seq for c in store.catalogue_changes(3)] == [4, 5]
    assert [c.seq for c in store.catalogue_changes(0, limit=2)] == [1, 2]
    assert store.catalogue_state(3) == {"N1": product(1), "N2": product(2), "P7": None}
    assert store.catalogue_state(5) == {"N1": product(1, price=9.5, title="Lantern \u00e9t\u00e9"), "N2": None,
                                        "P7": None}
    assert store.purge(later + dt.timedelta(days=400)) == {"events": 0, "impressions": 0}
    assert len(store.catalogue_changes(0)) == 5, "retention never purges the catalogue's history"


@pytest.mark.parametrize(("puts", "deletes", "error"), [
    ([product(1), product(2, title="")], [], "column 'title', row 2: missing 'title'"),
    ([product(1, product_id=None)], [], "column 'product_id', row 1: missing"),
    ([product(1), product(2, price="cheap")], [], "column 'price', row 2: price must be a finite number"),
    ([product(1, price=float("nan"))], [], "column 'price', row 1"),
    ([product(1, price=-1.0)], [], "column 'price', row 1"),
    ([product(1, brand=3)], [], "column 'brand', row 1: brand must be text or null"),
    ([product(1, attributes={"size": 4})], [], "column 'attributes', row 1"),
    ([product(1, description="sofa\x00")], [], "column 'description', row 1: description holds a NUL"),
    ([product(1, colour="red")], [], "column 'colour', row 1: 'colour' is not a product field"),
    ([product(1), product(1)], [], "column 'product_id', row 2: product_id 'N1' is changed twice"),
    ([product(1)], ["N1"], "column 'product_id', row 2: product_id 'N1' is changed twice"),
    ([product(1)], [""], "column 'product_id', row 2: a deleted product_id must be"),
], ids=["blank-title", "no-id", "price-text", "price-nan", "price-negative", "brand-number", "attribute-number",
        "nul", "unknown-field", "put-twice", "put-and-delete", "blank-delete"])
def test_a_bad_catalogue_batch_changes_nothing(store: EventStore, puts: list[dict], deletes: list[str],
                                               error: str) -> None:
    """The store's last line: a row no stage could read is refused, naming its field and row, and nothing of the
    batch is stored (nor its id claimed: the corrected batch under the same id is stored)."""
    with pytest.raises(DataError, match=f"^{error}".replace("(", r"\(")):
        store.change_catalogue(puts, deletes, T0, "batch-1")
    assert store.catalogue_changes(0) == [] and store.last_catalogue_change() == (0, 0.0)
    assert store.change_catalogue([product(1)], [], T0, "batch-1") == 1


def test_a_restore_keeps_the_catalogue_changes_made_after_the_backup(tmp_path: Path) -> None:
    """Numbering goes on past the replaced store's (a replica's cursor never passes a change), and the changes made
    after the backup are appended again: a restore never lists a recalled product again."""
    store = SqliteEventStore(tmp_path / "events.sqlite", writer=True)
    store.change_catalogue([product(1), product(2)], [], T0, "batch-1")
    store.backup(tmp_path / "before.sqlite")
    store.change_catalogue([product(3)], ["N1"], T0 + dt.timedelta(minutes=1), "batch-2")
    store.close()
    restore_sqlite(tmp_path / "before.sqlite", tmp_path / "events.sqlite", replace=True)
    restored = SqliteEventStore(tmp_path / "events.sqlite", writer=True)
    assert [(c.seq, c.op, c.product_id) for c in restored.catalogue_changes(2)] == [(5, "put", "N3"),
                                                                                    (6, "delete", "N1")]
    assert restored.catalogue_state(10) == {"N1": None, "N2": product(2), "N3": product(3)}
    assert restored.change_catalogue([product(3)], ["N1"], T0, "batch-2") == 0, "the batch id is still stored"
    assert restored.change_catalogue([product(4)], [], T0, "batch-3") == 1
    assert restored.last_catalogue_change()[0] == 7
    restored.close()


def test_hides_outlive_the_window_and_retention_and_go_with_an_erasure(location: str, store: EventStore,
                                                                        tmp_path: Path) -> None:
    """Issue 38: a "not interested" is kept apart from a shopper's window of behaviour. ``hidden_of`` reads every
    hide however many events came after it; ``recent_of`` (the window a replica reads) holds none; a replica's cache
    keeps the hide as later events push the window on; the retention purge keeps hides (a standing preference)
    while erasure deletes them; an update's export carries them to the event reader."""
    hide, hide_brand = (event(0, event_type="not_interested", product_id="P7"),
                        event(1, event_type="not_interested_brand", product_id="P8"))
    store.append([hide, hide_brand, *(event(i) for i in range(2, 8))])
    assert store.hidden_of("U1") == [("not_interested", "P7"), ("not_interested_brand", "P8")]
    assert store.hidden_of("U2") == []
    assert [e.event_type for e in store.recent_of("U1", 10)] == ["click"] * 6  # the hides take no place of the window
    cache = UserCache(open_event_store(location), per_user=4, max_events=100)
    assert cache.hidden_of("U1") == (("not_interested", "P7"), ("not_interested_brand", "P8"))
    assert [kind for _, kind, _ in cache.events_of("U1")] == ["click"] * 4 and cache.hidden_of(None) == ()
    store.append([event(i) for i in range(8, 20)] + [event(20, event_type="not_interested_category", product_id="P1"),
                                                      event(21, event_type="not_interested", product_id="P7")])
    assert cache.catch_up() == 14
    assert [kind for _, kind, _ in cache.events_of("U1")] == ["click"] * 4  # 12 more clicks: the window moved on
    assert cache.hidden_of("U1") == (("not_interested", "P7"), ("not_interested_brand", "P8"),
                                     ("not_interested_category", "P1"))  # P7 hidden twice: once
    assert cache.summary()["events"] == 4 + 3
    cache.store.close()

    assert store.export_parquet(tmp_path / "export.parquet") == 22
    exported = read_records(TableFile(path=str(tmp_path / "export.parquet")), "events")
    assert exported.column("event_type").to_pylist().count("not_interested") == 2

    assert store.purge(T0 + dt.timedelta(days=365)) == {"events": 18, "impressions": 0}
    assert store.hidden_of("U1") == [("not_interested", "P7"), ("not_interested_brand", "P8"),
                                     ("not_interested_category", "P1"), ("not_interested", "P7")]
    assert store.recent_of("U1", 10) == []
    assert store.erase("U1") == {"events": 4, "impressions": 0}
    assert store.hidden_of("U1") == [] and store.events().num_rows == 0
    with pytest.raises(DataError, match="row 1.*event_type must be one of view, .*not_interested_category"):
        store.append([event(30, event_type="dislike")])
