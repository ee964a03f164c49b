"""Categorisation: ingest fills the categories a catalogue lacks, ``/categorize`` answers a listing's, and both
refuse nothing they should accept (docs/data.md, "A catalogue with gaps"; docs/serving.md, "Categorisation").

The pipeline test hides the category of a tenth of the tiny shop's products (a catalogue file written here, read
through ``source.kind: files``), ingests and preprocesses it, and finds each one restored and marked
``category_predicted``, with its accuracy against the hidden truth above the most frequent category's share.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from conftest import App, bearer
from shoprank.config import Config, load_config
from shoprank.data.ingest import PREDICTIONS
from shoprank.encoder.fill import fill_categories
from shoprank.data.io import read_table
from shoprank.encoder.categories import chosen_method
from shoprank.stages import run_stages, stage_hash
from shoprank.store.run import Run

HIDDEN_SHARE = 0.1


def _set(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"


def hidden_catalogue(run: Run, directory: Path) -> tuple[list[str], dict[str, str]]:
    """The tiny shop's records as files, a tenth of its products' categories blanked: (the overrides that read them,
    the hidden product -> its true category)."""
    products = read_table(run, "data", "records", "products")
    rng = np.random.default_rng(40)
    hide = np.zeros(products.num_rows, bool)
    hide[rng.choice(products.num_rows, round(products.num_rows * HIDDEN_SHARE), replace=False)] = True
    truth = {p: c for p, c, h in zip(products.column("product_id").to_pylist(),
                                      products.column("category").to_pylist(), hide) if h}
    category = pc.if_else(pa.array(hide), pa.scalar(None, pa.string()), products.column("category"))
    pq.write_table(products.set_column(products.schema.get_field_index("category"), "category", category),
                   directory / "products.parquet")
    for name in ("events", "judgments"):
        pq.write_table(read_table(run, "data", "records", name), directory / f"{name}.parquet")
    return ["source.kind=files", *(_set(f"source.files.{name}.path", str(directory / f"{name}.parquet"))
                                   for name in ("products", "events", "judgments"))], truth


def test_ingest_restores_hidden_categories(tiny_run: tuple[Config, Run], tmp_path: Path,
                                           make_tiny_config: Callable[..., Config],
                                           record_property: Callable[[str, object], None]) -> None:
    _, shop = tiny_run
    overrides, truth = hidden_catalogue(shop, tmp_path)
    config = make_tiny_config(tmp_path / "runs", *overrides)
    run = run_stages(config, until="preprocess")
    products = read_table(run, "data", "products").to_pylist()
    predicted = {p["product_id"]: p for p in products if p["category_predicted"]}
    assert predicted.keys() == truth.keys(), "exactly the hidden products are predicted"
    assert all(p["category"] is not None for p in products), "every category is restored"
    assert all(p["category_label"] is None for p in predicted.values()), "a guess trains and measures no head"
    accuracy = float(np.mean([predicted[p]["category"] == category for p, category in truth.items()]))
    labelled = Counter(p["category"] for p in products if not p["category_predicted"])
    majority = labelled.most_common(1)[0][1] / sum(labelled.values())
    record_property("restored_category_accuracy", round(accuracy, 4))
    print(f"categories restored: {accuracy:.1%} of {len(truth)} right (most frequent category: {majority:.1%})")
    assert accuracy > majority
    ingest = run.manifest()["stages"]["ingest"]
    assert ingest["metrics"]["categories_predicted"] == len(truth) == ingest["metrics"]["products_without_category"]
    assert any("category_predicted" in note for note in ingest["notes"])
    assert read_table(run, *PREDICTIONS).num_rows == len(truth)
    # a new setting of the fill joins ingest's identity (and so every later stage's)
    assert stage_hash(config, "ingest") != stage_hash(make_tiny_config(tmp_path / "runs", *overrides,
                                                                       "source.categories.neighbours=5"), "ingest")


def test_nothing_to_fill_and_nothing_to_fill_from() -> None:
    """Ray-free: a complete catalogue is left alone (no model loaded); one with no category at all, or with the fill
    off, keeps its gaps and says so."""
    config = load_config("tiny")
    rows = [{"product_id": f"P{i}", "title": f"thing {i}", "price": 1.0, "attributes": []} for i in range(3)]
    schema = pa.schema([("product_id", pa.string()), ("title", pa.string()), ("description", pa.string()),
                        ("category", pa.string()), ("brand", pa.string()), ("price", pa.float64()),
                        ("attributes", pa.map_(pa.string(), pa.string()))])
    complete = pa.Table.from_pylist([{**r, "category": "A > B"} for r in rows], schema=schema)
    filled = fill_categories(config, complete)
    assert filled.products is complete and filled.predictions.num_rows == 0 and not filled.notes
    bare = pa.Table.from_pylist(rows, schema=schema)
    filled = fill_categories(config, bare)
    assert filled.predictions.num_rows == 0 and filled.metrics["categories_left_missing"] == 3
    assert "no product has a category" in filled.notes[0]
    off = load_config("tiny", ["source.categories.fill=false"])
    gaps = pa.Table.from_pylist([{**rows[0], "category": "A > B"}, *rows[1:]], schema=schema)
    filled = fill_categories(off, gaps)
    assert filled.products.column("category").null_count == 2 and "fill is off" in filled.notes[0]


# ---------------------------------------------------------------------------------------------- /categorize

BAD_BODIES = [
    ({}, ["body", "title"]),
    ({"title": "   "}, ["body", "title"]),
    ({"title": "x" * 2001}, ["body", "title"]),
    ({"title": "a lamp\x07"}, ["body", "title"]),
    ({"title": "a lamp", "description": "bright\x00"}, ["body", "description"]),
    ({"title": "a lamp", "k": 0}, ["body", "k"]),
    ({"title": "a lamp", "k": 11}, ["body", "k"]),
    ({"title": "a lamp", "k": "three"}, ["body", "k"]),
    ({"title": "a lamp", "category": "Home"}, ["body", "category"]),
]


def check_refusals(app: App) -> None:
    for body, loc in BAD_BODIES:
        answer = app.post("/categorize", body)
        assert answer.status_code == 422, (body, answer.text)
        assert [problem["loc"] for problem in answer.json()["detail"]] == [loc], (body, answer.text)
    malformed = app.http.post("/categorize", content=b"{", headers={"content-type": "application/json"})
    assert malformed.status_code == 422
    assert httpx.post(f"{app.url}/categorize", json={"title": "a lamp"}).status_code == 401


def test_categorize_without_a_head_asks_the_neighbours(fake_app: App) -> None:
    """The in-memory shop's run has no category head: the nearest labelled products vote, and the answer says so."""
    from fake_shop import products

    first = 0
    for product in products().to_pylist():
        answer = fake_app.http.post("/categorize", json={"title": product["title"],
                                                         "description": product["description"]},
                                    headers=bearer(fake_app.keys["client"]))
        assert answer.status_code == 200, answer.text
        found = answer.json()
        assert found["method"] == "neighbours" and found["note"] and found["variant"] == "B"
        named = [c["category"] for c in found["categories"]]
        assert len(named) <= 3 and set(named) <= set(fake_app.category_of.values())
        assert product["category"] in named, (product, found)
        first += named[0] == product["category"]
    assert first >= 30, f"{first} of 36 products' own category first"
    assert abs(sum(c["probability"] for c in fake_app.post("/categorize", {"title": "lantern", "k": 10}).json()
                   ["categories"]) - 1.0) < 1e-6, "vote shares add up to one"
    check_refusals(fake_app)


def test_categorize_answers_from_the_runs_tree(app: App) -> None:
    """The trained tiny run answers for its tree, by the method its evaluation measured best (on the tiny run the
    neighbours: its tiny encoder's head barely trains), saying why when it is not the head; a known product's title
    and description find its category among the top three."""
    products = read_table(app.run, "data", "products").to_pylist()
    tree = set(read_table(app.run, "data", "categories").column("category").to_pylist())
    figures = app.run.manifest()["stages"]["evaluate"]["metrics"]["categories"]["rows"]
    method, _ = chosen_method("auto", True, figures)
    found_at = []
    for product in products[:20]:
        answer = app.http.post("/categorize", json={"title": product["title"], "description": product["description"]},
                               headers=bearer(app.keys["client"]))
        assert answer.status_code == 200, answer.text
        found = answer.json()
        assert found["method"] == method and (found["note"] is None) == (method == "head") and found["variant"] == "B"
        named = [c["category"] for c in found["categories"]]
        assert len(named) == len(set(named)) <= 3 and set(named) <= tree
        probabilities = [c["probability"] for c in found["categories"]]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0 + 1e-6
        found_at.append(named.index(product["category"]) if product["category"] in named else None)
    print(f"/categorize ({method}) on 20 known products: own category first {sum(f == 0 for f in found_at)}, "
          f"in the top 3 {sum(f is not None for f in found_at)}")
    assert found_at[0] is not None, "the first product's category is among the top three"
    assert sum(f is not None for f in found_at) >= 15
    check_refusals(app)


def test_the_method_is_the_head_unless_measured_worse_or_missing() -> None:
    assert chosen_method("auto", True, {}) == ("head", None)
    assert chosen_method("auto", True, {"head": {"top1": 0.9}, "neighbours (fine-tuned encoder)": {"top1": 0.8}}) \
        == ("head", None)
    method, note = chosen_method("auto", True, {"head": {"top1": 0.9}, "neighbours (fine-tuned encoder)": {"top1": 1}})
    assert method == "neighbours" and note is not None and "0.9000" in note
    assert chosen_method("head", True, {"head": {"top1": 0.1}, "neighbours (fine-tuned encoder)": {"top1": 1}}) \
        == ("head", None)
    assert chosen_method("neighbours", True, {})[0] == "neighbours"
    method, note = chosen_method("head", False, {})
    assert method == "neighbours" and note is not None and "no category head" in note
