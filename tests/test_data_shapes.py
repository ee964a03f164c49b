"""Every shape of a shop's data runs every stage, registers its variants and serves.

The simulated shop (events + judgments, generated) is the session's ``ranked`` run and
``app``; here the shapes real shops bring, written in their real formats by
:mod:`shapes`: a ratings-style export (behaviour, no queries, no views), ESCI (judged
queries, no behaviour, three locales) and a JSON Lines shop (events + judgments). Each
runs the whole pipeline on the session's cluster, is deployed as an app of its own
beside the session's, and answers ``/search`` and ``/recommend`` over HTTP. The default
suite runs ESCI on the multi-node cluster instead (``test_cluster_autoscaling``), with the
same checks (:func:`shapes.check_every_stage`, :func:`shapes.check_answers`).

No raw user id anywhere (issue 34, item 2): the shapes' shoppers have e-mail addresses as
ids, and every file the run root holds (tables read value by value too, the event store
of the app) and the logs (captured and the cluster's) are scanned for them as bytes
(:mod:`raw_ids`): after ingest and preprocessing in the default suite, after the whole
pipeline and the app's answers to a shopper in the slow tests. ESCI's input has no
shoppers: its scan is the slow test's, for the shopper its app is sent.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from raw_ids import ray_logs, raw_ids_in
from shapes import (
    JSONL_USERS, RATINGS_USERS, check_answers, check_every_stage, jsonl_user_id, ratings_user_id, write_esci,
    write_jsonl_shop, write_ratings,
)
from shoprank.config import Config, load_config
from shoprank.data.io import read_table
from shoprank.encoder.text import product_texts
from shoprank.encoder.tiny import build_tiny_encoder
from shoprank.pipeline import run_pipeline
from shoprank.privacy import pseudonyms
from shoprank.serving.app import AppArgs, deploy
from shoprank.serving.keys import client_keys, create_keys
from shoprank.store.run import Run
from shoprank.stages import run_stages
from shoprank.store.events import open_event_store

SHAPES: dict[str, tuple[Callable[[Path], list[str]], set[str]]] = {
    "ratings": (write_ratings, {"recommend"}),
    "esci": (lambda directory: write_esci(directory, locale="all"), {"search"}),
    "jsonl": (write_jsonl_shop, {"search", "recommend"}),
}
"""Shape -> (fixture writer, the tasks its evaluation has figures for)."""
RAW_USERS: dict[str, list[str]] = {
    "ratings": [ratings_user_id(user) for user in range(1, RATINGS_USERS + 1)],
    "esci": [],
    "jsonl": [jsonl_user_id(user) for user in range(JSONL_USERS)],
}
"""Shape -> its input's raw user ids."""
APP_SHOPPER = "app.shopper+shape@example.com"
"""A raw id the slow tests send to each shape's app."""
# one XGBoost worker: the session's run trains with two; a worker more is a process start more here
FAST = ["run.name=shape", "encoder.train.epochs=1", "ranker.num_boost_round=10", "ranker.num_workers=1"]


def shape_config(root: Path, source: list[str], *extra: str) -> Config:
    return load_config("tiny", [f"run.root={root}", *FAST, *source, *extra])


@pytest.mark.parametrize("shape", [
    # behaviour without impressions or queries: 63 s here, `slow` for make test's 10 minutes; the default suite
    # keeps its Ray-free checks (test_behaviour_only: features without views, clicks without impressions, the
    # exclusions, the item-item model) and its ingest on Ray (the changed-file test below)
    pytest.param("ratings", marks=pytest.mark.slow),
    # judged queries, no behaviour: in the default suite on the multi-node cluster
    # (test_cluster_autoscaling), deployed with the query encoders as deployments of their own there too
    pytest.param("esci", marks=pytest.mark.slow),
    # events + judgments: the shape of the session's simulated run, which the default suite serves already
    pytest.param("jsonl", marks=pytest.mark.slow),
])
@pytest.mark.timeout(1200)  # a whole pipeline and an app: 93 s in CI, 335 s on a day 3x slower
def test_each_data_shape_runs_every_stage_and_serves(shape: str, serve_port: int, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    write, tasks = SHAPES[shape]
    source = write(tmp_path / "data")
    config = shape_config(tmp_path / "runs", source)
    run = run_stages(config, until="preprocess")  # the records, to train the tiny encoder's tokenizer on its words
    texts = product_texts(read_table(run, "data", "products"), config.encoder)
    texts += read_table(run, "data", "query_pairs", columns=["query"]).column("query").to_pylist()
    encoder = build_tiny_encoder(texts, tmp_path / "encoder")
    config = shape_config(tmp_path / "runs", source, f"encoder.model={encoder}")

    run_pipeline(config)
    check_every_stage(run, tasks)
    create_keys(config)

    url = _serve(config, run, serve_port, shape)
    try:
        if shape == "esci":
            replicas = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)]
            assert any(name.startswith(f"SERVE_REPLICA::shape-{shape}#QueryEncoder_B#") for name in replicas)
        check_answers(url, run, client_keys(config)["client"])
        _send_shopper(url, client_keys(config)["client"], shape)
        time.sleep(2 * config.serve.impression_flush_s)  # the ingress writes its queued impressions
        store = open_event_store(str(Path(run.path()) / "events.sqlite"))
        try:
            assert pseudonyms(config).of(APP_SHOPPER) in {i.user_id for i in store.impressions()}
        finally:
            store.close()
        assert raw_ids_in([tmp_path / "runs", ray_logs()], [*RAW_USERS[shape], APP_SHOPPER], caplog.text) == {}
    finally:
        serve.delete(f"shape-{shape}")


def _send_shopper(url: str, key: str, shape: str) -> None:
    """:data:`APP_SHOPPER` asks the shape's app what it answers (searches only, for ESCI's judged queries)."""
    path, body = ("/search", {"query": "coffee mug", "k": 5}) if shape == "esci" else ("/recommend", {"k": 5})
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60.0) as http:
        answer = http.post(path, json={**body, "user_id": APP_SHOPPER})
        assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("shape", ["ratings", "jsonl"])
def test_ingest_and_preprocess_write_no_raw_user_id(shape: str, ray_local: None, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Every file of the run root after the stages that read user ids, and the logs, hold none of the input's ids;
    a derived session id names the shopper's pseudonym."""
    write, _ = SHAPES[shape]
    source = write(tmp_path / "data")
    assert raw_ids_in([tmp_path / "data"], RAW_USERS[shape]).keys()  # the scan finds the ids where they are
    caplog.set_level(logging.DEBUG)
    config = shape_config(tmp_path / "runs", source)
    run = run_stages(config, until="preprocess")
    assert raw_ids_in([tmp_path / "runs", ray_logs()], RAW_USERS[shape], caplog.text) == {}
    events = read_table(run, "data", "records", "events", columns=["user_id", "session_id"]).to_pylist()
    users = pseudonyms(config)
    assert {e["user_id"] for e in events} == {users.of(u) for u in RAW_USERS[shape]}
    if shape == "ratings":  # sessions derived per shopper: "{pseudonym}@{time}"
        assert all(e["session_id"].startswith(e["user_id"] + "@") for e in events)


def _serve(config: Config, run: Run, port: int, shape: str) -> str:
    overrides = [f"run.root={config.run.root}", f"run.name={run.name}", f"encoder.model={config.encoder.model}",
                 f"serve.port={port}", f"serve.event_db={Path(run.path()) / 'events.sqlite'}"]
    if shape == "esci":  # all searches: the query encoders as deployments of their own (the GPU graph, on CPU)
        overrides.append("serve.separate_query_encoder=true")
    return deploy(AppArgs(config="tiny", overrides=overrides), name=f"shape-{shape}", route_prefix=f"/{shape}")


def test_a_changed_input_file_is_ingested_again_and_an_unchanged_one_is_not(ray_local: None, tmp_path: Path) -> None:
    source = write_ratings(tmp_path / "data")
    config = shape_config(tmp_path / "runs", source)
    run = run_stages(config, until="preprocess")
    events_file = Path(config.source.files.events.path)
    first = run.manifest()["stages"]["ingest"]["completed_at"]
    before = run.stage_log()

    run_stages(shape_config(tmp_path / "runs", source), until="preprocess")
    assert [e["status"] for e in run.stage_log()[len(before):]] == ["skipped", "skipped"]

    lines = events_file.read_text().splitlines()
    events_file.write_text("\n".join(lines[:-5]) + "\n")  # the shop exported again: five ratings fewer
    stat = events_file.stat()
    os.utime(events_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    rows_before = run.manifest()["stages"]["ingest"]["rows"]["events"]
    run_stages(shape_config(tmp_path / "runs", source), until="preprocess")
    ingest = run.manifest()["stages"]["ingest"]
    assert ingest["completed_at"] >= first and ingest["rows"]["events"] == rows_before - 5
    assert [e["status"] for e in run.stage_log()[-4:]] == ["started", "done", "started", "done"]
