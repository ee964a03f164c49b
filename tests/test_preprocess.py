"""Preprocessing: splits that cannot leak, tables that say what they hold, stages that skip."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from shoprank.config import Config
from shoprank.data.io import read_table
from shoprank.data.preprocess import OUTPUTS
from shoprank.errors import ConfigError, DataError
from shoprank.privacy import KEY_ENV
from shoprank.recsys.features import BRAND_FEATURES, CATEGORY_FEATURES, COLUMN, compute_features, product_stats
from shoprank.recsys.types import Candidates, History
from shoprank.store.run import Run
from shoprank.stages import run_stages, stage_hash


def test_every_output_is_written_and_counted(tiny_run: tuple[Config, Run]) -> None:
    _, run = tiny_run
    manifest = run.manifest()
    stage = manifest["stages"]["preprocess"]
    assert set(stage["rows"]) == set(OUTPUTS)
    for name in OUTPUTS:
        assert stage["rows"][name] == read_table(run, "data", name).num_rows > 0
    assert manifest["config_hash"] and manifest["code_version"]
    assert manifest["stages"]["ingest"]["rows"]["events"] == stage["rows"]["events"]
    assert stage["timings"]["total_s"] > 0


def test_no_query_crosses_splits(tiny_run: tuple[Config, Run]) -> None:
    _, run = tiny_run
    pairs = read_table(run, "data", "query_pairs")
    per_query = pairs.group_by("query").aggregate([("split", "count_distinct")])
    assert pc.max(per_query.column("split_count_distinct")).as_py() == 1
    assert set(pairs.column("split").to_pylist()) == {"train", "validation", "test"}
    assert set(pairs.column("source").to_pylist()) == {"judgment", "behaviour"}
    assert set(pairs.column("label").to_pylist()) <= {0, 1, 2, 3}


def test_no_training_event_is_later_than_a_validation_event(tiny_run: tuple[Config, Run]) -> None:
    config, run = tiny_run
    events = read_table(run, "data", "events")
    ts = {s: events.filter(pc.equal(events.column("split"), s)).column("ts") for s in ("train", "validation", "test")}
    assert pc.max(ts["train"]).as_py() < pc.min(ts["validation"]).as_py()
    assert pc.max(ts["validation"]).as_py() < pc.min(ts["test"]).as_py()
    share = len(ts["test"]) / events.num_rows
    assert abs(share - config.preprocess.test_fraction) < 0.05


def test_histories_and_pairs_use_training_events_only(tiny_run: tuple[Config, Run]) -> None:
    config, run = tiny_run
    events = read_table(run, "data", "events")
    validation_from = pc.min(events.filter(pc.not_equal(events.column("split"), "train")).column("ts")).as_py()
    histories = read_table(run, "data", "user_histories").to_pylist()
    for row in histories:
        assert len(row["product_ids"]) == len(row["event_types"]) == len(row["ts"]) <= config.preprocess.history_length
        assert row["ts"] == sorted(row["ts"]) and max(row["ts"]) < validation_from
    pairs = read_table(run, "data", "coengagement")
    assert all(a < b for a, b in zip(pairs.column("product_a").to_pylist(), pairs.column("product_b").to_pylist()))
    assert set(pairs.column("kind").to_pylist()) == {"viewed_together", "bought_together"}


def test_products_are_normalised_and_labelled(tiny_run: tuple[Config, Run]) -> None:
    _, run = tiny_run
    products = read_table(run, "data", "products").to_pylist()
    categories = {r["category"]: r["category_label"] for r in read_table(run, "data", "categories").to_pylist()}
    for product in products:
        assert product["title"] == product["title"].lower().strip()
        assert categories[product["category"]] == product["category_label"]
        assert product["leaf"] == product["category"].rsplit(">", 1)[-1].strip().lower()


@pytest.mark.slow  # skip and rerun in the default suite: test_stages (a ranker setting) and test_data_shapes (an input file)
def test_rerun_skips_and_changed_config_reruns_only_what_changed(
    ray_local: None, tmp_path: Path, make_tiny_config: Callable[..., Config]
) -> None:
    config = make_tiny_config(tmp_path, "source.synthetic.num_sessions=200", "source.synthetic.num_products=200")
    run = run_stages(config, until="preprocess")
    first = run.manifest()["stages"]
    again = run_stages(config, until="preprocess").manifest()["stages"]
    assert again == first

    def test_share() -> float:
        return pc.mean(pc.cast(pc.equal(read_table(run, "data", "events").column("split"), "test"), "int8")).as_py()

    before = test_share()
    update = {"test_fraction": 0.3}
    changed_config = config.model_copy(update={"preprocess": config.preprocess.model_copy(update=update)})
    changed = run_stages(changed_config, until="preprocess")
    stages = changed.manifest()["stages"]
    assert stages["ingest"] == first["ingest"]
    assert stages["preprocess"]["completed_at"] >= first["preprocess"]["completed_at"]
    assert stages["preprocess"]["config_hash"] != first["preprocess"]["config_hash"]
    assert stages["preprocess"]["rows"]["events"] == first["preprocess"]["rows"]["events"]
    assert test_share() > before + 0.1


def test_a_failed_stage_leaves_nothing_behind(
    ray_local: None, tmp_path: Path, make_tiny_config: Callable[..., Config]
) -> None:
    catalog = tmp_path / "catalog.csv"
    catalog.write_text("product_id,title,category,price\nA,Pan,Home > Pans,abc\n")
    events = tmp_path / "events.csv"
    events.write_text("event_id,user_id,session_id,product_id,event_type,ts\n")
    config = make_tiny_config(
        tmp_path / "runs",
        "source.kind=files",
        f"source.files.products.path={catalog}",
        f"source.files.events.path={events}",
    )
    with pytest.raises(DataError, match="price"):
        run_stages(config, until="preprocess")
    run_dir = tmp_path / "runs" / "tiny"
    assert not (run_dir / "data" / "records").exists()
    assert not (run_dir / "manifest.json").exists()


def files_source(folder: Path, catalogue_csv: str, event_rows: list[str],
                 event_columns: str = "event_id,user_id,session_id,product_id,event_type,ts") -> tuple[str, ...]:
    """Config overrides for a files source of ``catalogue_csv`` and ``event_rows`` (in ``event_columns``),
    written under ``folder``: hand-made shops for what the generator never makes (a column left out, an orphan
    event, an event on a split's first instant)."""
    catalogue, events = folder / "catalog.csv", folder / "events.csv"
    catalogue.write_text(catalogue_csv + "\n")
    events.write_text("\n".join([event_columns, *event_rows]) + "\n")
    return "source.kind=files", f"source.files.products.path={catalogue}", f"source.files.events.path={events}"


def test_files_source_counts_orphan_events_in_the_manifest(
    ray_local: None, tmp_path: Path, make_tiny_config: Callable[..., Config]
) -> None:
    catalogue = ("sku,title,category,brand,price\nA,Cast Iron Pan,Home > Cookware > Pans,Ferro,30\n"
                 "B,Steel Pan,Home > Cookware > Pans,Ferro,20")
    rows = []
    for i in range(40):
        product = "ZZ" if i % 10 == 0 else "AB"[i % 2]
        kind = "click" if i % 3 == 0 else "view"
        rows.append(f"e{i},u{i % 4},s{i // 4},{product},{kind},2026-01-{1 + i // 2:02d}T10:00:00Z,pan")
    source = files_source(tmp_path, catalogue, rows, "event_id,user_id,session_id,product_id,event_type,ts,query")
    config = make_tiny_config(tmp_path / "runs", *source, "source.files.products.columns={product_id: sku}")
    run = run_stages(config, until="preprocess")
    manifest = json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())
    assert manifest["stages"]["ingest"]["drops"]["events_unknown_product"] == 4
    assert manifest["stages"]["ingest"]["rows"]["events"] == 36
    assert read_table(run, "data", "events").num_rows == 36


@pytest.mark.slow  # the other strategy than the default; every run of the default suite shuffles by sort
def test_hash_and_sort_shuffles_build_the_same_tables(
    ray_local: None, tmp_path: Path, make_tiny_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "5e" * 32)  # one users' key for both run roots: the same pseudonyms in both
    small = ("source.synthetic.num_sessions=250", "source.synthetic.num_products=200")
    by_sort = run_stages(make_tiny_config(tmp_path / "sort", *small), until="preprocess")
    by_hash = run_stages(make_tiny_config(tmp_path / "hash", *small, "preprocess.shuffle_strategy=hash_shuffle"),
                         until="preprocess")
    keys = {
        "user_histories": ["user_id"],
        "coengagement": ["product_a", "product_b", "kind"],
        "query_pairs": ["query", "product_id", "source"],
    }
    for table, key in keys.items():
        a = read_table(by_sort, "data", table).sort_by([(k, "ascending") for k in key])
        b = read_table(by_hash, "data", table).sort_by([(k, "ascending") for k in key])
        assert a.num_rows > 0 and a.equals(b), table


def test_a_catalogue_without_category_brand_or_description_is_a_catalogue(
    ray_local: None, tmp_path: Path, make_tiny_config: Callable[..., Config]
) -> None:
    events = [f"e{i},u{i % 4},s{i // 3},{'ABC'[i % 3]},purchase,2026-01-{1 + i // 2:02d}T10:00:00Z" for i in range(40)]
    source = files_source(tmp_path, "product_id,title,price\nA,Cast Iron Pan,30\nB,Steel Pan,20\nC,Tea Towel,4", events)
    config = make_tiny_config(tmp_path / "runs", *source)
    run = run_stages(config, until="preprocess")

    products = read_table(run, "data", "products")
    for name in ("category", "brand", "description", "leaf", "category_label"):
        assert products.column(name).null_count == 3, name  # missing, never a made-up "Unknown" or ""
    assert read_table(run, "data", "categories").num_rows == 0
    assert not any(products.column("category_predicted").to_pylist())  # nothing labelled to predict one from
    ingest = json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())["stages"]["ingest"]
    assert ingest["metrics"]["categories_left_missing"] == 3 and "no product has a category" in ingest["notes"][0]
    notes = json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())["stages"]["preprocess"]["notes"]
    assert any(note.startswith("no product has a category: the encoder's category head") for note in notes)
    assert any(note.startswith("no product has a brand") for note in notes)

    stats = product_stats(products, read_table(run, "data", "events"), cutoff_s=2e9, prior_views=10.0)
    history = History(np.array([0, 1, 0]), ["purchase"] * 3, np.array([1.7e9, 1.7e9 + 60, 1.7e9 + 120]))
    candidates = Candidates(rows=np.array([0, 1, 2]), cosine=np.zeros(3), bm25=np.zeros(3),
                            sources=np.zeros(3, np.int64), position=np.arange(3))
    features = compute_features(candidates, history, 1.8e9, stats, is_search=False)
    for name in CATEGORY_FEATURES + BRAND_FEATURES:
        assert np.isnan(features[:, COLUMN[name]]).all(), name  # no category or brand: missing, not a share of one
    assert not np.isnan(features[:, COLUMN["log_price"]]).any()


def test_split_dates_split_events_by_day_and_are_part_of_the_identity(
    ray_local: None, tmp_path: Path, make_tiny_config: Callable[..., Config]
) -> None:
    events = [f"e{day},u{day % 3},s{day},{'AB'[day % 2]},click,2026-01-{day:02d}T10:00:00Z" for day in range(1, 21)]
    events.append("edge,u0,s99,A,click,2026-01-16T00:00:00Z")  # the test split's first instant
    source = (*files_source(tmp_path, "sku,title,category,price\nA,Cast Iron Pan,Home > Pans,30\nB,Steel Pan,Home > Pans,20",
                            events), "source.files.products.columns={product_id: sku}")
    dated = make_tiny_config(tmp_path / "runs", *source, "preprocess.split_dates={validation: 2026-01-11, test: 2026-01-16}")
    run = run_stages(dated, until="preprocess")
    table = read_table(run, "data", "events", columns=["ts", "split"]).to_pandas()
    expected = table["ts"].map(lambda ts: "train" if ts.day < 11 else "validation" if ts.day < 16 else "test")
    assert (table["split"] == expected).all()
    assert run.manifest()["stages"]["preprocess"]["metrics"]["events_split"] == {"train": 10, "validation": 5, "test": 6}
    assert stage_hash(dated, "preprocess") != stage_hash(make_tiny_config(tmp_path / "runs", *source), "preprocess")

    with pytest.raises(ConfigError, match="split_dates.test .* must be later"):
        make_tiny_config(tmp_path / "runs", "preprocess.split_dates={validation: 2026-01-11, test: 2026-01-11}")
    before_every_event = make_tiny_config(tmp_path / "runs", *source,
                                          "preprocess.split_dates={validation: 2025-12-01, test: 2026-01-16}")
    with pytest.raises(ConfigError, match="split_dates.validation is 2025-12-01.*no event would train"):
        run_stages(before_every_event, until="preprocess")
