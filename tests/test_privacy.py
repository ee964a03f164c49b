"""Pseudonymous users, erasure and events that can be trusted (issue 17, items 2 and 3; issue 34, items 2 and 3).

No raw user id in any file of the run root (its tables, Parquet values included, the
simulator's shoppers, the registry), the event store (its SQLite file read as bytes), its
Parquet export, the app's answers, the cluster's logs, or the logs of a request that fails;
one pseudonym key per run root, created exclusively and checked by the app against the key
its runs were ingested under; erasure removes a user from the store and from both
replicas' caches; an engagement must name a product its answer showed to that user; a
retried batch is answered the same way and stored once.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

import fake_shop
from conftest import App
from raw_ids import ray_logs, raw_ids_in
from shoprank.config import Config, load_config
from shoprank.data import synthetic
from shoprank.data.io import read_table
from shoprank.errors import ConfigError
from shoprank.privacy import INGEST_KEY_ID, KEY_ENV, PSEUDONYM, Pseudonyms, pseudonyms, serving_pseudonyms
from shoprank.serving.app import build_app
from shoprank.serving.routes import unexpected
from shoprank.stages import run_stages, stage_hash
from shoprank.store.events import event_db_location, open_event_store
from shoprank.store.location import Location
from shoprank.store.run import MANIFEST, Run

RAW = "jane.doe+shoprank@example.com"
"""A shopper id as a shop might use it: an e-mail address, which must never be written anywhere."""


def test_pseudonyms_are_keyed_stable_and_kept_once_made() -> None:
    one, other = Pseudonyms(b"1" * 32), Pseudonyms(b"2" * 32)
    assert one.of(RAW) == one.of(RAW) != other.of(RAW) and PSEUDONYM.match(one.of(RAW))
    assert one.of(one.of(RAW)) == one.of(RAW)  # a pseudonym (from /users, an export) is not hashed again
    column = pa.chunked_array([["a", "b", None], ["a"]])
    assert one.column(column).to_pylist() == [one.of("a"), one.of("b"), None, one.of("a")]
    assert one.key_id != other.key_id and len(one.key_id) == 16
    with pytest.raises(ConfigError, match="32 bytes"):
        Pseudonyms(b"short")


def test_the_key_is_created_once_mode_0600_and_the_environment_overrides_it(
        make_tiny_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config: Config = make_tiny_config(tmp_path)
    monkeypatch.delenv(KEY_ENV, raising=False)
    made = pseudonyms(config)
    key_file = tmp_path / "secrets" / "user_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(bytes.fromhex(key_file.read_text())) == 32
    assert pseudonyms(make_tiny_config(tmp_path)).of(RAW) == made.of(RAW)
    monkeypatch.setenv(KEY_ENV, "ab" * 32)
    assert pseudonyms(config).of(RAW) == Pseudonyms(bytes.fromhex("ab" * 32)).of(RAW) != made.of(RAW)
    monkeypatch.setenv(KEY_ENV, "not hex")
    with pytest.raises(ConfigError, match=KEY_ENV):
        pseudonyms(config)


def test_the_run_names_users_only_by_pseudonym(tiny_run: tuple[Config, Run]) -> None:
    config, run = tiny_run
    for path in (("data", "records", "events"), ("data", "events")):
        users = set(read_table(run, *path, columns=["user_id"]).column("user_id").to_pylist())
        assert users and all(PSEUDONYM.match(u) for u in users), path
    assert pseudonyms(config).of("U000001") in users  # the simulated shopper U000001, as the app will name them
    assert run.manifest()["stages"]["ingest"]["metrics"][INGEST_KEY_ID] == pseudonyms(config).key_id


def _logs_holding(text: str) -> list[str]:
    """Files of the session cluster's logs that contain ``text``."""
    return sorted(raw_ids_in([ray_logs()], [text]))


def impression_users(db: str) -> set[str]:
    """The users of the impressions stored in the event store ``db`` so far."""
    store = open_event_store(db)
    try:
        return {i.user_id for i in store.impressions()}
    finally:
        store.close()


def test_no_raw_user_id_is_stored_exported_listed_or_logged(app: App, tmp_path: Path) -> None:
    pseudonym = pseudonyms(app.config).of(RAW)
    answer = app.post("/recommend", {"user_id": RAW, "k": 5}).json()
    shown = answer["items"][0]["product_id"]
    event = {"user_id": RAW, "product_id": shown, "event_type": "click", "request_id": answer["request_id"]}
    assert app.post("/events", [event]).status_code == 200
    assert app.post("/search", {"query": "black skillet", "user_id": RAW, "k": 3}).status_code == 200
    # each ingress replica writes its queued impressions every serve.impression_flush_s: the answers above may
    # have gone to the replica the report does not flush
    app.report_once(lambda report: pseudonym in impression_users(app.db))
    store = open_event_store(app.db)
    try:
        assert pseudonym in store.events().column("user_id").to_pylist()
        assert pseudonym in {i.user_id for i in store.impressions()}
        exported = tmp_path / "events.parquet"
        store.export_parquet(exported)
    finally:
        store.close()
    assert all(PSEUDONYM.match(u["user_id"]) for u in app.http.get("/users").json())
    # every file of the run root (the simulated shop's run, its registry, secrets), of the event store's folder
    # (the database, its WAL) and the export, and the cluster's logs: neither this shopper nor a simulated one
    simulated = [synthetic.user_id(i) for i in range(app.config.source.synthetic.num_users)]
    roots = [Path(Location(app.config.run.root).path()), Path(app.db).parent, tmp_path, ray_logs()]
    assert raw_ids_in(roots, [RAW, *simulated]) == {}


def test_erasing_a_user_empties_the_store_of_them_and_both_replicas_forget_them(fake_app: App) -> None:
    app = fake_app  # the in-memory shop: erasure is the app's, whatever it serves
    user, pseudonym = "erase-me-0001", app.pseudonyms.of("erase-me-0001")
    products = list(app.category_of)[:3]
    assert app.post("/events", [{"user_id": user, "product_id": p, "event_type": "purchase"}
                                for p in products]).status_code == 200

    def notes_by_replica() -> dict[str, str | None]:
        seen: dict[str, str | None] = {}
        for _ in range(40):  # Serve picks the replica: ask until both answered
            answer = app.post("/recommend", {"user_id": user, "k": 5, "variant": "B"})
            seen[answer.headers["x-shoprank-replica"]] = answer.json()["note"]
            if len(seen) == 2:
                return seen
        raise AssertionError(f"one replica answered 40 requests in a row: {seen}")

    assert set(notes_by_replica().values()) == {None}  # both personalise from the three purchases
    erased = app.http.delete(f"/users/{user}")
    assert erased.status_code == 200, erased.text
    # the answering ingress replica's queued impressions are erased with the stored ones; another replica's queue
    # flushes later, and the store keeps those out (test_event_store: late impressions of an erased user)
    assert erased.json()["user"] == pseudonym and erased.json()["events"] == 3
    time.sleep(app.config.serve.impression_flush_s * 2)
    store = open_event_store(app.db)
    try:
        assert pseudonym not in store.events().column("user_id").to_pylist()
        assert pseudonym not in {i.user_id for i in store.impressions()}
    finally:
        store.close()
    assert all(note and note.startswith("no history") for note in notes_by_replica().values())
    client = {"Authorization": f"Bearer {app.keys['client']}"}
    assert app.http.delete(f"/users/{user}", headers=client).status_code == 403
    assert _logs_holding(user) == []  # the access logs name the route (/users/{user_id}), not the path


def test_erasing_a_shopper_of_the_runs_history_makes_them_a_new_shopper_on_every_replica(fake_app: App) -> None:
    """The demo's ``DELETE /users/{id}`` for a shopper the run knows (no live event of theirs): from the 200 on,
    every answer for them on both variants' two replicas is a never-seen shopper's (same products, same order, the
    cold-start note), and no ingress replica lists them. On the in-memory shop, whose replicas build the run's
    history with the same ``assemble_context`` as a trained run's (``fake_shop.py``)."""
    app = fake_app
    user = app.pseudonyms.of(fake_shop.SHOPPERS[-1])  # no other test asks for the last of the shop's shoppers
    assert user in [u["user_id"] for u in app.http.get("/users", params={"limit": 5000}).json()]
    run_events = fake_shop.events(app.pseudonyms).column("user_id").to_pylist().count(user)
    assert run_events > 0

    def answers(who: str) -> dict[str, set[tuple[tuple[str, ...], str | None]]]:
        """Variant -> the distinct recommendations for ``who`` (products, note) it gave, asked until both of its
        replicas answered."""
        seen: dict[str, set[tuple[tuple[str, ...], str | None]]] = {}
        for variant in ("A", "B"):
            replicas, seen[variant] = set(), set()
            for _ in range(40):  # Serve picks the replica: ask until both answered
                answer = app.post("/recommend", {"user_id": who, "k": 5, "variant": variant})
                assert answer.status_code == 200, answer.text
                replicas.add(answer.headers["x-shoprank-replica"])
                seen[variant].add((tuple(item["product_id"] for item in answer.json()["items"]), answer.json()["note"]))
                if len(replicas) == 2:
                    break
            else:
                raise AssertionError(f"one replica of {variant} answered 40 requests in a row: {replicas}")
        return seen

    never_seen = answers("never-seen-shopper-of-erasure")
    assert all(len(given) == 1 and next(iter(given))[1].startswith("no history") for given in never_seen.values())
    before = answers(user)
    assert all(note is None for given in before.values() for _, note in given)  # personal, from the run's history
    assert before != never_seen
    erased = app.http.delete(f"/users/{user}")
    assert erased.status_code == 200, erased.text
    # impressions: those of the answers above that reached the store (another ingress replica's queue may hold some)
    assert erased.json() | {"impressions": 0} == {"user": user, "events": 0, "impressions": 0,
                                                  "run_events": run_events, "excluded_from_next_ingest": True}
    assert answers(user) == never_seen  # from the first answer after the 200, on every replica
    for _ in range(10):  # requests land on either ingress replica: neither lists the shopper
        assert user not in {u["user_id"] for u in app.http.get("/users", params={"limit": 5000}).json()}
    assert user not in app.http.get("/ab/report").text


def test_the_next_ingest_leaves_erased_shoppers_out_of_every_table(tiny_run: tuple[Config, Run], make_tiny_config,
                                                                   tmp_path: Path) -> None:
    """A pipeline run after an erasure ingests again (the tombstone is part of the stage's identity) and writes
    none of the shopper's rows; the manifest counts them. Under the session run's key, so the rerun is the session
    run's ingest less that shopper."""
    session_config, session = tiny_run
    shutil.copytree(Path(session.path()).parent / "secrets", tmp_path / "secrets")
    config: Config = make_tiny_config(tmp_path)
    never_erased = stage_hash(config, "ingest")
    assert not Path(event_db_location(config)).exists()  # the stage's identity reads the store, never makes one
    simulated = "U000042"
    erased = pseudonyms(config).of(simulated)
    assert erased == pseudonyms(session_config).of(simulated)
    store = open_event_store(event_db_location(config))
    try:
        store.erase(erased)
    finally:
        store.close()
    assert stage_hash(config, "ingest") != never_erased
    run = run_stages(config, until="ingest")
    before = read_table(session, "data", "records", "events")
    theirs = before.column("user_id").to_pylist().count(erased)
    after = read_table(run, "data", "records", "events")
    assert theirs > 0 and after.num_rows == before.num_rows - theirs
    assert erased not in set(after.column("user_id").to_pylist())
    assert simulated not in read_table(run, "data", "shop", "users", columns=["user_id"]).column("user_id").to_pylist()
    drops = run.manifest()["stages"]["ingest"]["drops"]
    assert drops == {"events_of_erased_shoppers": theirs, "users_of_erased_shoppers": 1}


def test_engagements_must_name_a_product_their_answer_showed_to_that_user(app: App) -> None:
    user = "attribution-user-1"
    answer = app.post("/recommend", {"user_id": user, "k": 5}).json()
    shown = [item["product_id"] for item in answer["items"]]
    unshown = next(p for p in app.category_of if p not in shown)
    click = {"user_id": user, "product_id": shown[0], "event_type": "click", "request_id": answer["request_id"]}
    for wrong, why in (({"product_id": unshown}, "did not show product"),
                       ({"user_id": "someone-else"}, "not shown to this user"),
                       ({"request_id": "f" * 32}, "names no answer"),
                       ({"ts": "2001-01-01T00:00:00Z"}, "older than serve.retention_days")):
        refused = app.post("/events", [click, {**click, **wrong}])
        assert refused.status_code == 422, (wrong, refused.text)
        detail = refused.json()["detail"][0]
        assert detail["loc"][-2] == 1 and why in detail["msg"], detail
    assert app.post("/events", [{**click, "product_id": unshown, "event_type": "view"}]).status_code == 200
    batch = [{**click, "event_id": "retry-1"}, {**click, "event_type": "purchase", "quantity": 2, "event_id": "retry-2"}]
    first, again = app.post("/events", batch), app.post("/events", batch)
    assert first.status_code == again.status_code == 200 and first.json() == again.json()
    stored = open_event_store(app.db)
    try:
        events = stored.events().to_pylist()
    finally:
        stored.close()
    ids = [e["event_id"] for e in events]
    assert ids.count("retry-1") == ids.count("retry-2") == 1
    assert [e["quantity"] for e in events if e["event_id"] == "retry-2"] == [2]  # revenue: price x 2


@pytest.fixture(autouse=True)
def _no_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests here see the run root's key file, whatever the machine's environment holds."""
    if os.environ.get(KEY_ENV):
        monkeypatch.delenv(KEY_ENV)


CREATE_KEY = """
import sys
from shoprank.config import load_config
from shoprank.privacy import pseudonyms
config = load_config("tiny", ["run.root=" + sys.argv[1]])
print("ready", flush=True)
sys.stdin.readline()  # every process creates the key at the same moment
print(pseudonyms(config).key_id)
"""


def test_concurrent_starts_create_one_key_and_all_use_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    processes = [subprocess.Popen([sys.executable, "-c", CREATE_KEY, str(tmp_path)], env=env, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(6)]
    assert all(process.stdout.readline() == "ready\n" for process in processes)  # type: ignore[union-attr]
    for process in processes:
        process.stdin.write("go\n")  # type: ignore[union-attr]
        process.stdin.flush()  # type: ignore[union-attr]
    used = {process.communicate(timeout=60)[0].strip() for process in processes}
    assert all(process.returncode == 0 for process in processes)
    key_file = tmp_path / "secrets" / "user_key"
    assert used == {Pseudonyms(bytes.fromhex(key_file.read_text())).key_id}
    assert [p.name for p in key_file.parent.iterdir()] == ["user_key"]  # no temporary file left behind
    assert not Location(str(tmp_path)).create_secret("00" * 32, "secrets", "user_key")  # an existing key stays
    assert used == {Pseudonyms(bytes.fromhex(key_file.read_text())).key_id}
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_the_app_refuses_a_key_other_than_its_runs_and_never_creates_one(
        app: App, make_tiny_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_uri, ingested = app.run.uri(), pseudonyms(app.config).key_id
    assert serving_pseudonyms(app.config, [run_uri]).key_id == ingested
    other = Pseudonyms(bytes.fromhex("cd" * 32)).key_id
    monkeypatch.setenv(KEY_ENV, "cd" * 32)  # the app started with another key than the run was ingested under
    for refused in (lambda: serving_pseudonyms(app.config, [run_uri]), lambda: build_app(app.args)):
        with pytest.raises(ConfigError) as info:
            refused()
        assert ingested in str(info.value) and other in str(info.value) and run_uri in str(info.value)
    monkeypatch.delenv(KEY_ENV)

    empty: Config = make_tiny_config(tmp_path)  # a run root without a key: refused, and still without one
    with pytest.raises(ConfigError, match="never creates one"):
        serving_pseudonyms(empty)
    assert not (tmp_path / "secrets" / "user_key").exists()
    old = Run(str(tmp_path), "old")  # a run ingested before the key id was recorded
    old.write_json({"run_id": "old", "stages": {"ingest": {"config_hash": "0", "metrics": {}}}}, MANIFEST)
    pseudonyms(empty)
    with pytest.raises(ConfigError, match="records no user pseudonym key id"):
        serving_pseudonyms(empty, [old.uri()])


def test_a_failing_request_logs_the_route_not_the_raw_id_in_its_path(caplog: pytest.LogCaptureFixture) -> None:
    """The app's catch-all handler (503 when the store cannot be reached, 500 for a bug) behind real routing."""
    probe = FastAPI()
    probe.state.serve = load_config("tiny").serve  # its serve.retry_after_s, as the app's own (routes.http_api)
    probe.add_exception_handler(Exception, unexpected)

    @probe.delete("/users/{user_id}")
    async def store_unreachable(user_id: str) -> None:
        raise sqlite3.OperationalError("unable to open database file")

    @probe.get("/users/{user_id}")
    async def bug(user_id: str) -> None:
        raise RuntimeError("a bug")

    caplog.set_level(logging.INFO, logger="shoprank.serving.routes")
    with TestClient(probe, raise_server_exceptions=False) as client:
        assert client.delete(f"/users/{RAW}").status_code == 503
        assert client.get(f"/users/{RAW}").status_code == 500
    assert "DELETE /users/{user_id}: 503" in caplog.text and "GET /users/{user_id}: 500" in caplog.text
    assert RAW not in caplog.text
