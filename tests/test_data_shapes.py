"""Every shape of a shop's data runs every stage, registers its variants and serves.

The simulated shop (events + judgments, generated) is the session's ``ranked`` run and
``app``; here the shapes real shops bring, written in their real formats by
:mod:`shapes`: a ratings-style export (behaviour, no queries, no views), ESCI (judged
queries, no behaviour, three locales) and a JSON Lines shop (events + judgments). Each
runs the whole pipeline on the session's cluster, is deployed as an app of its own
beside the session's, and answers ``/search`` and ``/recommend`` over HTTP.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from shapes import write_esci, write_jsonl_shop, write_ratings
from shoprank.config import Config, load_config
from shoprank.data.io import read_table
from shoprank.encoder.text import product_texts
from shoprank.encoder.tiny import build_tiny_encoder
from shoprank.pipeline import run_pipeline
from shoprank.serving.app import AppArgs, deploy
from shoprank.store.run import Run
from shoprank.stages import STAGE_NAMES, run_stages

SHAPES: dict[str, tuple[Callable[[Path], list[str]], set[str]]] = {
    "ratings": (write_ratings, {"recommend"}),
    "esci": (lambda directory: write_esci(directory, locale="all"), {"search"}),
    "jsonl": (write_jsonl_shop, {"search", "recommend"}),
}
"""Shape -> (fixture writer, the tasks its evaluation has figures for)."""
# one XGBoost worker: the session's run trains with two; a worker more is a process start more here
FAST = ["run.name=shape", "encoder.train.epochs=1", "ranker.num_boost_round=10", "ranker.num_workers=1"]


def shape_config(root: Path, source: list[str], *extra: str) -> Config:
    return load_config("tiny", [f"run.root={root}", *FAST, *source, *extra])


@pytest.mark.parametrize("shape", [
    "esci", "ratings",
    # events + judgments: the shape of the session's simulated run, which the default suite serves already
    pytest.param("jsonl", marks=pytest.mark.slow),
])
@pytest.mark.timeout(1200)  # a whole pipeline and an app: 93 s in CI, 335 s on a day 3x slower
def test_each_data_shape_runs_every_stage_and_serves(shape: str, serve_port: int, tmp_path: Path) -> None:
    write, tasks = SHAPES[shape]
    source = write(tmp_path / "data")
    config = shape_config(tmp_path / "runs", source)
    run = run_stages(config, until="preprocess")  # the records, to train the tiny encoder's tokenizer on its words
    texts = product_texts(read_table(run, "data", "products"), config.encoder)
    texts += read_table(run, "data", "query_pairs", columns=["query"]).column("query").to_pylist()
    encoder = build_tiny_encoder(texts, tmp_path / "encoder")
    config = shape_config(tmp_path / "runs", source, f"encoder.model={encoder}")

    summary = run_pipeline(config)

    done = {entry["stage"] for entry in summary.stages if entry["status"] in ("done", "skipped")}
    assert set(STAGE_NAMES) <= done and "register" in done
    evaluation = json.loads(Path(run.path("evaluation", "offline.json")).read_text())
    assert {kind for kind in ("search", "recommend") if kind in evaluation} == tasks
    for kind in {"search", "recommend"} - tasks:
        assert kind in evaluation["no_figures"], "a task without figures says why"
        assert any(kind in note for note in summary.notes["evaluate"])
    for kind in tasks:
        assert evaluation[kind]["fine-tuned retrieval + ranker"]["requests"] > 0

    url = _serve(config, run, serve_port, shape)
    try:
        if shape == "esci":
            replicas = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)]
            assert any(name.startswith(f"SERVE_REPLICA::shape-{shape}#QueryEncoder_B#") for name in replicas)
        _answers(url, run)
    finally:
        serve.delete(f"shape-{shape}")


def _serve(config: Config, run: Run, port: int, shape: str) -> str:
    overrides = [f"run.root={config.run.root}", f"run.name={run.name}", f"encoder.model={config.encoder.model}",
                 f"serve.port={port}", f"serve.event_db={Path(run.path()) / 'events.sqlite'}"]
    if shape == "esci":  # all searches: the query encoders as deployments of their own (the GPU graph, on CPU)
        overrides.append("serve.separate_query_encoder=true")
    return deploy(AppArgs(config="tiny", overrides=overrides), name=f"shape-{shape}", route_prefix=f"/{shape}")


def _answers(url: str, run: Run) -> None:
    """``/search`` and ``/recommend`` answer from this run: its products, for a known and an unknown shopper."""
    catalogue = set(read_table(run, "data", "products", columns=["product_id"]).column("product_id").to_pylist())
    title = read_table(run, "data", "products", columns=["title"]).column("title")[0].as_py()
    users = read_table(run, "data", "events", columns=["user_id"]).column("user_id").to_pylist()
    with httpx.Client(base_url=url, timeout=120.0) as http:
        for path, body in (("/search", {"query": title, "k": 5}),
                           ("/recommend", {"user_id": users[0] if users else "nobody", "k": 5}),
                           ("/recommend", {"user_id": "a-shopper-never-seen", "k": 5})):
            for variant in ("A", "B"):
                answer = _post(http, path, {**body, "variant": variant})
                assert answer["variant"] == variant and answer["request_id"]
                ids = [item["product_id"] for item in answer["items"]]
                assert ids and set(ids) <= catalogue, (path, answer)
        cold = _post(http, "/recommend", {"user_id": "a-shopper-never-seen", "k": 5, "variant": "A"})
        assert cold["note"], "a recommendation that is not personal says so"
        if not users:  # no behaviour: A (retrieval) keeps the popular order, by training queries judging relevant
            assert [item["product_id"] for item in cold["items"]] == _most_judged_relevant(run, 5)


def _most_judged_relevant(run: Run, k: int) -> list[str]:
    """The ``k`` products most often judged exact or substitute by training queries (ties: catalogue order)."""
    catalogue = read_table(run, "data", "products", columns=["product_id"]).column("product_id").to_pylist()
    pairs = read_table(run, "data", "query_pairs").to_pandas()
    relevant = pairs[(pairs["source"] == "judgment") & (pairs["split"] == "train") & (pairs["label"] >= 2)]
    counts = relevant["product_id"].value_counts()
    return sorted(catalogue, key=lambda p: (-counts.get(p, 0), catalogue.index(p)))[:k]


def _post(http: httpx.Client, path: str, body: dict) -> dict:
    response = http.post(path, json=body)
    assert response.status_code == 200, (path, body, response.text)
    return response.json()


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
