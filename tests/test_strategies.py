"""Issue 40, part 4, without Ray: the recommendation strategies a variant serves (``content``: the encoder alone,
``collaborative``: the item-item model alone, ``ranker``/``retrieval``: every source), each a candidate path of
its own; and ``shoprank variants register``, which points a registry alias at an existing run served with any of
them, nothing trained. The three-arm experiment over HTTP is ``test_abn.py``."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import shoprank, tiny_config
from fake_shop import START, FakeShop
from shoprank.recsys.answer import SCORE_TERMS, Retrieval, VariantPipeline
from shoprank.recsys.context import RankingContext
from shoprank.recsys.retrieval import STRATEGY_SOURCES, retrieve
from shoprank.recsys.types import SOURCES, Candidates
from shoprank.serving.variants import SYSTEM_OF, VariantSpec, offline_figures, register_variant, resolve_variant
from shoprank.store.registry import Registry
from shoprank.store.run import Run

NOW_S = (START + dt.timedelta(days=40)).timestamp()
"""After every event of the in-memory shop: a live request."""
NEW_SHOPPER = "new-shopper"


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> FakeShop:
    return FakeShop(tiny_config(tmp_path_factory.mktemp("shop")), {"client": "c", "admin": "a"}, b"k" * 32)


@pytest.fixture(scope="module")
def context(shop: FakeShop) -> RankingContext:
    return shop.context(shop.resolve("B", "B"), encoder=True)


def sources_of(candidates: Candidates) -> set[str]:
    """The names of every source that proposed some candidate."""
    return {name for bit, name in enumerate(SOURCES) if np.any((candidates.sources >> bit) & 1)}


CLICKED = [("P00000", "click", NOW_S - 600.0), ("P00010", "view", NOW_S - 300.0)]
"""A new shopper's live events: a click on a skillet (every shopper of the run engaged with every product of their
one category, so the item-item model has nothing new for them), and a view."""


def candidates(context: RankingContext, strategy: str, user: str | None, query: str | None) -> Candidates:
    history = Retrieval(context).history(user, CLICKED if user == NEW_SHOPPER else [], NOW_S)
    vector = context.encode_queries([query])[0] if query is not None else None
    return retrieve(context, history, query, vector, NOW_S, strategy=strategy)


@pytest.mark.parametrize("strategy", ["content", "collaborative", "retrieval", "ranker"])
def test_each_strategys_candidates_come_from_its_sources_only(context: RankingContext, strategy: str) -> None:
    """A search and a recommendation for a shopper with history (a click and a view received live): every candidate
    was proposed by the strategy's own sources (``STRATEGY_SOURCES``), and the hybrid mixes several; the content
    strategy never reads behaviour (no item-item score), the collaborative one never the encoder (cosine 0)."""
    user = NEW_SHOPPER
    allowed = STRATEGY_SOURCES[strategy]
    searched = candidates(context, strategy, user, "black skillet")
    recommended = candidates(context, strategy, user, None)
    assert len(searched.rows) and len(recommended.rows)
    assert sources_of(searched) <= set(allowed["search"]), sources_of(searched)
    assert sources_of(recommended) <= set(allowed["recommend"]), sources_of(recommended)
    if strategy in ("ranker", "retrieval"):  # the hybrid: the encoder, BM25 and behaviour together
        assert sources_of(searched) == {"dense", "lexical"}
        assert {"dense", "collaborative"} <= sources_of(recommended)
    if strategy == "content":
        assert sources_of(searched) == sources_of(recommended) == {"dense"}
        assert recommended.cf_score is None and not np.any(searched.bm25)
    if strategy == "collaborative":
        assert sources_of(searched) == {"lexical"} and sources_of(recommended) == {"collaborative"}
        assert not np.any(searched.cosine) and not np.any(recommended.cosine)
        assert np.all(recommended.cf_score > 0)  # each proposed for the skillet clicked
        assert not {0, 10} & set(recommended.rows.tolist())  # new products only


@pytest.mark.parametrize("strategy", ["content", "collaborative"])
def test_a_shopper_without_history_gets_the_popular_fallback(context: RankingContext, strategy: str) -> None:
    """No history: no user vector for the encoder, no engaged product for the item-item model; both fall back to
    the popular and trending products, as the full mix's cold start does."""
    cold = candidates(context, strategy, "never-seen", None)
    assert len(cold.rows) and sources_of(cold) == {"popular"}
    full = candidates(context, "ranker", "never-seen", None)
    assert sorted(cold.rows.tolist()) == sorted(full.rows.tolist())


@pytest.mark.parametrize("strategy", ["content", "collaborative"])
def test_the_answer_path_ranks_a_strategy_by_its_own_terms(context: RankingContext, strategy: str) -> None:
    """Through the answer path a replica calls (``answer_many``): every item shown is one of the strategy's
    candidates, its contributions name only the strategy's score terms, and they add up to its score."""
    pipeline = VariantPipeline(context, strategy)
    user = NEW_SHOPPER
    for product, kind, ts in CLICKED:
        pipeline.observe(user, product, kind, ts)
    terms = {name for name, _ in SCORE_TERMS[strategy]}
    ids = context.catalogue.stats.product_ids
    for query in ("red dome tent", None):
        items = pipeline.search(query, user, 10, NOW_S) if query else pipeline.recommend(user, 10, NOW_S)
        proposed = {ids[row] for row in candidates(context, strategy, user, query).rows}
        assert items and {item.product_id for item in items} <= proposed
        for item in items:
            assert set(item.contributions) <= terms, item.contributions
            assert sum(item.contributions.values()) == pytest.approx(item.score, abs=1e-5)
        assert [item.score for item in items][0] == max(item.score for item in items)


def test_an_unknown_strategy_is_refused(context: RankingContext) -> None:
    with pytest.raises(ValueError, match="unknown strategy 'popular'"):
        VariantPipeline(context, "popular")  # type: ignore[arg-type]


def test_content_serves_the_evaluations_dense_row_and_collaborative_has_no_offline_figure(tmp_path: Path) -> None:
    run = Run(str(tmp_path), "r")
    run.write_json({"run_id": "r", "stages": {"evaluate": {"metrics": {"table": {"search": {
        "retrieval (fine-tuned encoder)": {"ndcg@10": 0.3}, "fine-tuned retrieval + ranker": {"ndcg@10": 0.4}}}}}}},
        "manifest.json")

    def spec(encoder: str, strategy: str) -> VariantSpec:
        return VariantSpec(name="C", alias="C", run=run.uri(), ranker_run=run.uri(), encoder=encoder,
                           strategy=strategy)

    assert SYSTEM_OF[("fine_tuned", "content")] == "retrieval (fine-tuned encoder)"
    assert offline_figures(spec("fine_tuned", "content"))["ndcg@10"] == {"search": 0.3}
    collaborative = offline_figures(spec("fine_tuned", "collaborative"))
    assert collaborative["system"] is None and collaborative["ndcg@10"] == {}
    assert collaborative["note"].startswith("no offline figure")


# ------------------------------------------------------------------------------------------- shoprank variants


def fake_run(root: Path, name: str, *, ranker: bool = True, engaged: bool = True) -> Run:
    """A run directory holding what registering looks for: a manifest, both encoders' catalogue embeddings, a
    ranker (``ranker``) and an event log (with engagements unless ``engaged`` is false)."""
    run = Run(str(root), name)
    run.write_json({"run_id": name, "stages": {}}, "manifest.json")
    for parts in (("index",), ("embeddings", "zero_shot_products"), ("data", "events"),
                  *((("ranker", "model"),) if ranker else ())):
        Path(run.path(*parts)).mkdir(parents=True, exist_ok=True)
    Path(run.path("index", "products.faiss")).write_bytes(b"faiss")
    pq.write_table(pa.table({"event_type": ["view", "click" if engaged else "view"]}),
                   run.path("data", "events", "part-0.parquet"))
    return run



def test_the_register_command_points_an_alias_at_a_run_with_a_strategy(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """``shoprank variants register C --from-alias B --strategy content``: a new alias over B's run (an update's base
    run kept), resolved as the app resolves variants, and the settings that serve it printed; ``--run`` names a
    run directly; ``list`` shows them."""
    run, update = fake_run(tmp_path, "r1"), fake_run(tmp_path, "r1-update", engaged=False)
    registry = Registry(str(tmp_path))
    registry.set("B", update.uri(), base_run=run.uri(), encoder="fine_tuned", strategy="ranker")
    common = ["--config", "tiny", "--set", f"run.root={tmp_path}"]
    status, out = shoprank(["variants", "register", "C", "--from-alias", "B", "--strategy", "content", *common],
                           capsys)
    assert status == 0, out
    assert "registry alias 'C'" in out and "nothing trained" in out
    assert "--set 'serve.variants={A: A, B: B, C: C}' --set 'serve.split={A: 0.5, B: 0.5, C: 1}'" in out
    spec = resolve_variant(registry, "C", "C")
    assert (spec.run, spec.ranker_run, spec.encoder, spec.strategy) == (run.uri(), update.uri(), "fine_tuned",
                                                                        "content")
    assert registry.get("C")["registered_from"] == "B"
    status, out = shoprank(["variants", "register", "D", "--run", run.uri(), "--encoder", "zero_shot", "--strategy",
                            "collaborative", *common], capsys)
    assert status == 0, out
    assert (registry.get("D")["run"], registry.get("D")["encoder"]) == (run.uri(), "zero_shot")
    status, out = shoprank(["variants", "list", *common], capsys)
    assert status == 0 and "C: run " in out and "strategy content" in out and "D: run " in out, out


@pytest.mark.parametrize("argv,message", [
    (["X y", "--from-alias", "B"], "NAME 'X y': a registry alias is"),
    (["C", "--from-alias", "Z"], "--from-alias 'Z': registry"),
    (["C", "--run", "{root}/nowhere"], "no run there (no manifest.json)"),
    (["C", "--run", "{root}/untrained", "--strategy", "ranker"], "--strategy ranker: --run"),
    (["C", "--from-alias", "B", "--encoder", "zero_shot", "--strategy", "ranker"],
     "--strategy ranker with --encoder zero_shot"),
    (["C", "--run", "{root}/bare", "--strategy", "content"], "--encoder fine_tuned: --run"),
    (["C", "--run", "{root}/judged", "--strategy", "collaborative"], "--strategy collaborative: --run"),
    (["C", "--from-alias", "B", "--strategy", "popular"], "argument --strategy: invalid choice: 'popular'"),
    (["C", "--from-alias", "B", "--run", "x"], "not allowed with argument"),
])
def test_the_register_command_refuses_a_bad_choice_naming_the_field(argv: list[str], message: str, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Each mistake is a user error (exit status 2) whose message names the option at fault; nothing is written."""
    run = fake_run(tmp_path, "r1")
    fake_run(tmp_path, "untrained", ranker=False)
    fake_run(tmp_path, "judged", engaged=False)
    bare = fake_run(tmp_path, "bare")
    (Path(bare.path("index", "products.faiss"))).unlink()
    registry = Registry(str(tmp_path))
    registry.set("B", run.uri(), encoder="fine_tuned", strategy="ranker")
    before = json.loads(Path(registry.path).read_text())
    status, out = shoprank(["variants", "register", *(a.format(root=tmp_path) for a in argv), "--config", "tiny",
                            "--set", f"run.root={tmp_path}"], capsys)
    assert status == 2 and message in out and "Traceback" not in out, out
    assert json.loads(Path(registry.path).read_text()) == before


def test_register_variant_is_the_library_call_the_command_makes(tmp_path: Path) -> None:
    run = fake_run(tmp_path, "r1")
    entry = register_variant(Registry(str(tmp_path)), "hybrid", run=run.uri(), strategy="ranker")
    assert (entry["run"], entry["encoder"], entry["strategy"]) == (run.uri(), "fine_tuned", "ranker")
