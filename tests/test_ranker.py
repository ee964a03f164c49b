"""Ranking: candidates, features without leakage, offline = online, XGBoostTrainer, evaluation."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import xgboost

from shoprank.config import Config, load_config
from shoprank.data.io import read_table
from shoprank.errors import ShopRankError
from shoprank.privacy import Pseudonyms
from shoprank.evaluation.offline import dense_top_k, top_k_of
from shoprank.ranker.dataset import build_requests
from shoprank.ranker.train import (
    RequestBatches, WorkerLayout, grouped_matrix, plain_matrix, quantile_matrix, read_features, request_blocks,
    sorted_rows, with_positives, worker_blocks, worker_layout, xgboost_params,
)
from shoprank.ranker.update import read_new_events, update_ranker
from shoprank.recsys.booster import META_FILE, load_ranker
from shoprank.recsys.context import ExclusionDecision, load_context, ranker_cutoff
from shoprank.recsys.features import FEATURES, epoch_seconds, product_stats
from shoprank.recsys.messages import BASE, OTHER
from shoprank.recsys.retrieval import rank_inputs
from shoprank.recsys.types import SOURCES
from shoprank.store.registry import Registry
from shoprank.recsys.diversity import STRENGTHS, Diversity, DiversityDecision
from shoprank.serving.loaders import RunLoader
from shoprank.serving.variants import VariantSpec
from shoprank.store.run import Run


def test_ranker_trains_with_the_auto_layout_and_writes_the_evaluation(ranked: tuple[Config, Run]) -> None:
    """``ranker.num_workers`` unset: on the session's one-node cluster of 2 CPUs, one worker with both."""
    config, run = ranked
    stages = run.manifest()["stages"]
    assert config.ranker.num_workers is None
    assert (stages["ranker"]["metrics"]["workers"], stages["ranker"]["metrics"]["cpus_per_worker"]) == (1, 2)
    assert worker_layout(config) == WorkerLayout(1, 2)
    assert stages["ranker"]["metrics"]["num_trees"] >= 1
    assert 0.0 <= stages["ranker"]["metrics"]["validation/ndcg@10"] <= 1.0
    evaluation = Path(run.path("evaluation"))
    table = json.loads((evaluation / "offline.json").read_text())
    systems = {"popularity", "retrieval (zero-shot encoder)", "retrieval (fine-tuned encoder)",
               "fine-tuned retrieval + ranker"}
    for kind in ("search", "recommend"):
        assert set(table[kind]) == systems
        for metrics in table[kind].values():
            assert {"ndcg@10", "recall@10", "mrr", "coverage", "brands@10", "categories@10"} <= set(metrics)
            assert 1 <= metrics["brands@10"] <= 10 and 1 <= metrics["categories@10"] <= 10
        difference = table["b_minus_a"][kind]  # B - A, per request, with its bootstrap interval
        assert difference["low"] <= difference["ndcg@10"] <= difference["high"]
        assert stages["evaluate"]["metrics"]["table"][kind]["popularity"]["brands@10"] == table[kind]["popularity"][
            "brands@10"]
    text = (evaluation / "offline.md").read_text()
    assert "| search | fine-tuned retrieval + ranker |" in text and "brands@10 | categories@10" in text
    assert "B - A, recommend: NDCG@10 " in text and "Diversity re-ranking" in text
    assert (evaluation / "offline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("nodes, trials, expected", [
    ([2], 1, WorkerLayout(1, 2)),                      # one node: one worker with every CPU
    ([16, 16], 1, WorkerLayout(2, 16, spread=True)),   # a worker per node, each with the node's CPUs
    ([16, 8], 1, WorkerLayout(2, 8, spread=True)),     # Ray Train gives every worker the same: the smallest node's
    ([], 1, WorkerLayout(1, 1)),                       # no node up yet (autoscaling from zero): ranker.cpus_per_worker
    ([2], 2, WorkerLayout(1, 1)),                      # two concurrent trials share the node
    ([16, 16], 2, WorkerLayout(1, 16)),                # two trials, a node each
    ([16, 16], 4, WorkerLayout(1, 8)),                 # four trials, two per node
])
def test_the_auto_layout_follows_the_nodes(nodes: list[int], trials: int, expected: WorkerLayout) -> None:
    assert worker_layout(load_config("tiny"), nodes=nodes, trials=trials) == expected
    explicit = load_config("tiny", ["ranker.num_workers=3", "ranker.cpus_per_worker=2"])
    assert worker_layout(explicit, nodes=nodes, trials=trials) == WorkerLayout(3, 2)  # set: kept as it is


def test_the_quantile_matrix_over_request_blocks_trains_the_dmatrix_model(ranked: tuple[Config, Run]) -> None:
    """The workers' matrices (training: a ``QuantileDMatrix`` streamed from Arrow blocks of whole requests;
    validation: the blocks as one ``DMatrix``) give the model of the plain sorted ``DMatrix``: same groups, same
    labels, same validation NDCG@10 (to 1e-6) after the same rounds, here with blocks far smaller than a
    worker's, and with batches cut inside requests (the iterator moves a request's rows to the next batch). A
    quantised validation matrix (``ref=`` the training one) gives the same model too."""
    config, run = ranked
    train, validation = (with_positives(read_features(run, split)) for split in ("train", "validation"))
    params = xgboost_params(config, WorkerLayout(1, 2))
    plain_train, plain_validation = grouped_matrix(train), grouped_matrix(validation)
    plain = xgboost.train(params, plain_train, 20, evals=[(plain_validation, "validation")], verbose_eval=False)
    qid, label, features, _ = sorted_rows(validation)
    validation_blocks = request_blocks(qid, label, features, block_rows=500)
    qid, label, features, _ = sorted_rows(train)
    table = pa.concat_tables(request_blocks(qid, label, features, block_rows=500))
    for blocks in (request_blocks(qid, label, features, block_rows=500),
                   [table.slice(start, 333) for start in range(0, table.num_rows, 333)]):  # cut inside requests
        assert len(blocks) > 3
        streamed = quantile_matrix(iter(blocks), nthread=2)
        np.testing.assert_array_equal(streamed.get_uint_info("group_ptr"), plain_train.get_uint_info("group_ptr"))
        np.testing.assert_array_equal(streamed.get_label(), plain_train.get_label())
        for validation_matrix in (plain_matrix(iter(validation_blocks), nthread=2),
                                  quantile_matrix(iter(validation_blocks), nthread=2, ref=streamed)):
            model = xgboost.train(params, streamed, 20, evals=[(validation_matrix, "validation")], verbose_eval=False)
            assert float(model.eval(validation_matrix).split(":")[1]) == pytest.approx(
                float(plain.eval(plain_validation).split(":")[1]), abs=1e-6)
            np.testing.assert_allclose(model.predict(plain_validation), plain.predict(plain_validation), atol=1e-6)
    validation_matrix = plain_matrix(iter(validation_blocks), nthread=2)
    np.testing.assert_array_equal(validation_matrix.get_uint_info("group_ptr"),
                                  plain_validation.get_uint_info("group_ptr"))
    workers = worker_blocks(train, 3)  # the hash split: each request whole on one worker, every row once
    assert sum(b.num_rows for blocks in workers for b in blocks) == len(train)
    seen = [set(np.concatenate([b.column("qid").to_numpy() for b in blocks]).tolist()) for blocks in workers]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert RequestBatches(iter([])).next(lambda **_: None) is False


def test_the_diversity_strength_is_the_strongest_within_tolerance_on_validation(ranked: tuple[Config, Run]) -> None:
    """``policy.diversity.strength: auto``: per task, every strength tried on the validation split through Serve's
    ranking, the strongest whose NDCG@10 keeps within the tolerance of the undiversified list is recorded, and the
    run's readers (the evaluation, Serve's loader) apply it."""
    config, run = ranked
    decision = DiversityDecision.load(run)
    assert config.policy.diversity.strength == "auto" and decision.tolerance == config.policy.diversity.ndcg_tolerance
    for kind in ("search", "recommend"):
        trials = decision.trials[kind]
        assert [t["strength"] for t in trials] == list(STRENGTHS)
        floor = (1 - decision.tolerance) * trials[0]["ndcg@10"]
        assert decision.strength[kind] == max(t["strength"] for t in trials if t["ndcg@10"] >= floor)
        assert trials[-1]["brands@10"] >= trials[0]["brands@10"]  # the strongest spreads brands at least as much
    assert run.manifest()["stages"]["evaluate"]["metrics"]["diversity_strength"] == decision.strength
    assert Diversity.of(config, run).strength == decision.strength
    spec = VariantSpec(name="B", alias="B", run=run.uri(), ranker_run=run.uri(), strategy="ranker",
                       encoder="fine_tuned")
    assert RunLoader(config).diversity(spec) == Diversity.of(config, run)  # what Serve's replicas are given


def test_the_evaluations_dense_lists_are_the_dense_rows_of_the_features(ranked: tuple[Config, Run]) -> None:
    """The zero-shot system's path (:func:`dense_top_k`), given the fine-tuned encoder, finds the fine-tuned
    retrieval's lists that the features stage's rows give: one meaning of "the encoder's retrieval"."""
    config, run = ranked
    requests = build_requests(config, run)
    rows = read_features(run, "test")
    expected = top_k_of(rows, "cosine", rows["from_dense"] == 1)
    found = dense_top_k(config, run, requests[requests["split"] == "test"], zero_shot=False)
    assert len(found) > 10
    assert found == expected


def test_every_request_keeps_its_candidates_together_with_labels(ranked: tuple[Config, Run]) -> None:
    _, run = ranked
    rows = read_features(run, "train")
    assert list(rows.columns[-len(FEATURES):]) == FEATURES
    assert rows.groupby("request_id")["split"].nunique().max() == 1
    assert set(rows["label"].unique()) <= {0, 1, 2, 3}
    assert (rows.groupby("request_id")["label"].max() > 0).any()


def test_no_training_row_uses_events_at_or_after_its_time(ranked: tuple[Config, Run]) -> None:
    config, run = ranked
    context = load_context(config, run)
    requests = build_requests(config, run)
    train = requests[requests["split"] == "train"]
    assert (train["ts_s"] >= context.cutoff_s).all(), "ranker rows must come after the statistics' cut-off"
    # statistics: the events after the cut-off change nothing
    products, events = read_table(run, "data", "products"), read_table(run, "data", "events")
    before = events.filter(pd.Series(epoch_seconds(events.column("ts")) < context.cutoff_s).to_numpy())
    full = product_stats(products, events, context.cutoff_s, config.features.ctr_prior_views)
    cut = product_stats(products, before, context.cutoff_s, config.features.ctr_prior_views)
    for name in ("popularity", "ctr", "conversion"):
        np.testing.assert_array_equal(getattr(full, name), getattr(cut, name))
    # per user: features are unchanged when every event at or after the request time is removed
    checked = 0
    for request in train.head(25).itertuples(index=False):
        query = request.query if isinstance(request.query, str) else None
        vector = context.encode_queries([query])[0] if query else None
        with_future = rank_inputs(context, request.user_id, query, vector, request.ts_s)
        history = context.events.histories.get(request.user_id)
        if history is None or not (history.ts_s >= request.ts_s).any():
            continue
        context.events.histories[request.user_id] = history.before(request.ts_s, len(history))
        without_future = rank_inputs(context, request.user_id, query, vector, request.ts_s)
        context.events.histories[request.user_id] = history
        np.testing.assert_array_equal(with_future.candidates.rows, without_future.candidates.rows)
        np.testing.assert_array_equal(with_future.features, without_future.features)
        checked += 1
    assert checked > 5


def test_offline_and_online_features_are_identical(ranked: tuple[Config, Run]) -> None:
    """Offline: Ray Data rows of the test split. Online: a context started before the test split,
    fed the later events one by one as a server receives them, asked at the request's time."""
    config, run = ranked
    requests = build_requests(config, run)
    test = requests[requests["split"] == "test"].head(20)
    start = float(test["ts_s"].min()) - 1.0
    online = load_context(config, run, history_until_s=start)
    events = read_table(run, "data", "events").to_pandas()
    events["ts_s"] = epoch_seconds(read_table(run, "data", "events").column("ts"))
    later = events[(events["ts_s"] >= start) & events["user_id"].isin(set(test["user_id"]))].sort_values("ts_s")
    offline = read_features(run, "test").set_index(["request_id", "product_id"])
    row_of = online.catalogue.stats.row_of
    fed = 0
    for request in test.sort_values("ts_s").itertuples(index=False):
        for event in later[(later["ts_s"] < request.ts_s) & (later["ts_s"] >= start)].itertuples(index=False):
            online.events.append(event.user_id, row_of[event.product_id], event.event_type, event.ts_s)
            fed += 1
        start = request.ts_s
        query = request.query if isinstance(request.query, str) else None
        vector = online.encode_queries([query])[0] if query else None
        inputs = rank_inputs(online, request.user_id, query, vector, request.ts_s)
        products = [online.catalogue.stats.product_ids[r] for r in inputs.candidates.rows]
        expected = offline.loc[request.request_id].loc[products, FEATURES].to_numpy(np.float32)
        np.testing.assert_allclose(inputs.features, expected, rtol=1e-6, atol=1e-6)
    assert fed > 0


def test_loading_a_ranker_of_another_feature_schema_is_an_error(ranked: tuple[Config, Run], tmp_path: Path) -> None:
    _, run = ranked
    model = Path(run.path("ranker", "model"))
    for name in model.iterdir():
        (tmp_path / name.name).write_bytes(name.read_bytes())
    meta = json.loads((tmp_path / META_FILE).read_text())
    meta["feature_schema_version"] = 0
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    assert load_ranker(model).num_boosted_rounds() >= 1
    with pytest.raises(ShopRankError, match="feature schema v0"):
        load_ranker(tmp_path)


def _new_events(run: Run, path: Path, days: int = 30) -> Path:
    """The run's test-split events replayed ``days`` later as new sessions: a fresh log to update on."""
    events = read_table(run, "data", "events")
    events = events.filter(pc.equal(events.column("split"), "test")).drop_columns(["split"])
    shifted = pc.add(events.column("ts"), pa.scalar(dt.timedelta(days=days), pa.duration("us")))
    events = events.set_column(events.schema.get_field_index("ts"), "ts", shifted)
    for name in ("event_id", "session_id"):
        events = events.set_column(events.schema.get_field_index(name), name,
                                   pc.binary_join_element_wise("new-", events.column(name), ""))
    pq.write_table(events, path)
    return path


def test_an_update_warm_starts_from_the_old_model_into_a_new_run(ranked: tuple[Config, Run], tmp_path: Path) -> None:
    config, run = ranked
    config = config.model_copy(update={"ranker": config.ranker.model_copy(update={"update_tolerance": 1.0})})
    outcome = update_ranker(config, run, str(_new_events(run, tmp_path / "new.parquet")), alias="latest")
    assert outcome["num_trees"] > outcome["base_num_trees"] == load_ranker(Path(run.path("ranker", "model"))).num_boosted_rounds()
    updated = Run(run.root, Path(outcome["run"]).name)
    assert updated.name != run.name and updated.name.startswith(f"{run.name}-update-")
    assert load_ranker(Path(updated.path("ranker", "model"))).num_boosted_rounds() == outcome["num_trees"]
    registry = Registry(run.root)
    assert registry.get(updated.name)["run"] == updated.uri()
    assert outcome["promoted"] and registry.get("latest")["run"] == updated.uri()  # tolerance 1.0: never worse


def test_an_update_leaves_events_of_products_put_live_to_the_next_pipeline_run(tmp_path: Path) -> None:
    """Events naming a product put after the base run (``PUT /products``) have no features in the base run: they are
    left out and counted, not an error; the next pipeline run folds the catalogue change log in and learns them."""
    ts = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
    path = tmp_path / "new.parquet"
    pq.write_table(pa.table({
        "event_id": ["E1", "E2", "E3"], "user_id": ["U1", "U1", "U2"], "session_id": ["S1", "S1", "S2"],
        "product_id": ["P1", "P-PUT-LIVE", "P2"], "event_type": ["view", "click", "purchase"], "ts": [ts] * 3}), path)
    events, left_out = read_new_events(str(path), {"P1", "P2"}, Pseudonyms(b"k" * 32))
    assert events.column("event_id").to_pylist() == ["E1", "E3"] and left_out == 1
    assert set(events.column("split").to_pylist()) == {"new"}


def with_purchases_excluded(config: Config) -> Config:
    exclude = config.policy.exclude.model_copy(update={"purchased": True})
    return config.model_copy(update={"policy": config.policy.model_copy(update={"exclude": exclude})})


def test_the_runs_purchase_exclusion_is_recorded_and_every_reader_follows_it(ranked: tuple[Config, Run]) -> None:
    """``policy.exclude.purchased: auto``: the features stage's decision is in the run, its manifest and its
    evaluation; a context loaded from the run (the evaluation's, Serve's) applies it; the simulated shop's
    shoppers buy again, so bought products stay candidates, first among them the repeat source's."""
    config, run = ranked
    assert config.policy.exclude.purchased == "auto"
    decision = ExclusionDecision.load(run)
    assert decision.shares["validation"]["purchases"] > 0 and not decision.exclude_purchased
    assert run.manifest()["stages"]["features"]["metrics"]["exclude_purchased"] is False
    policy = run.read_json("evaluation", "offline.json")["policy"]
    assert policy["exclude_purchased"] is False and policy["repeat_share"] == decision.shares
    assert "Recommendations keep bought products" in run.read_text("evaluation", "offline.md")
    context = load_context(config, run)
    assert "purchase" not in context.catalogue.excluded_types
    user, history = max(context.events.histories.items(),
                        key=lambda item: item[1].event_types.count("purchase"))
    now = float(history.ts_s[-1]) + 3600.0
    bought = set(history.product_rows[[t == "purchase" for t in history.event_types]].tolist())
    candidates = rank_inputs(context, user, None, None, now).candidates
    repeat = candidates.rows[(candidates.sources >> SOURCES.index("repeat")) & 1 == 1]
    assert len(repeat) and set(repeat.tolist()) <= bought
    assert "purchase" in load_context(with_purchases_excluded(config), run).catalogue.excluded_types


@pytest.mark.parametrize("strategy", ["retrieval", "ranker"])
def test_a_purchase_leaves_the_very_next_answer(ranked: tuple[Config, Run], strategy: str) -> None:
    """A live purchase reaches the next answer: what was just bought is not recommended again
    (``policy.exclude.purchased: true``; the tiny run's ``auto`` keeps bought products), and the answer is still
    full."""
    from shoprank.recsys.answer import VariantPipeline

    config, run = ranked
    context = load_context(with_purchases_excluded(config), run)
    booster = load_ranker(Path(run.path("ranker", "model"))) if strategy == "ranker" else None
    pipeline = VariantPipeline(context, strategy, booster)
    user, history = max(context.events.histories.items(), key=lambda item: len(item[1]))
    now = float(history.ts_s[-1]) + 3600.0
    before = [r.product_id for r in pipeline.recommend(user, 20, now)]
    for i, product in enumerate(before[:3]):
        pipeline.observe(user, product, "purchase", now - 60 + i)
    after = pipeline.recommend(user, 20, now)
    assert len(after) == 20 and not {r.product_id for r in after} & set(before[:3])
    for item in after:  # each card's explanation: the score's parts, which add up to it
        parts = item.contributions
        assert sum(parts.values()) == pytest.approx(item.score, rel=1e-4, abs=1e-4), parts
        named = [value for name, value in parts.items() if name not in (OTHER, BASE)]
        assert len(named) <= config.serve.explained_features and named == sorted(named, key=abs, reverse=True)
    if strategy == "retrieval":  # the baseline's terms: cosine + 0.01 * bm25 + w * popularity, no base
        assert set(after[0].contributions) <= {"cosine", "bm25", "popularity"}
    else:
        assert BASE in after[0].contributions


def test_a_batch_of_requests_gets_what_each_request_gets_alone(ranked: tuple[Config, Run]) -> None:
    """What a Serve variant replica does with concurrent requests (one encoder call, one predict) changes no answer."""
    from shoprank.recsys.messages import Asked
    from shoprank.recsys.answer import VariantPipeline

    config, run = ranked
    context = load_context(config, run)
    pipeline = VariantPipeline(context, "ranker", load_ranker(Path(run.path("ranker", "model"))))
    users = list(context.events.histories)[:2]
    titles = read_table(run, "data", "products", columns=["title"]).column("title").to_pylist()[:2]
    now = max(float(h.ts_s[-1]) for h in context.events.histories.values()) + 3600.0
    asked = [Asked(users[0], [], None, 10, now), Asked(None, [], titles[0], 10, now),
             Asked(users[1], [], titles[1], 5, now), Asked("a-shopper-never-seen", [], titles[0], 10, now)]
    together = pipeline.answer_many(asked)
    for one, answered in zip(asked, together):
        alone = pipeline.answer_many([one])[0]
        assert [r.product_id for r in answered.items] == [r.product_id for r in alone.items]
        np.testing.assert_allclose([r.score for r in answered.items], [r.score for r in alone.items], atol=1e-5)
        assert answered.history_events == alone.history_events and len(answered.items) == one.k
    assert together[0].history_events > 0 and together[3].history_events == 0


def test_a_purchase_moves_its_category_up_in_the_next_retrieval_answer(ranked: tuple[Config, Run]) -> None:
    """The retrieval baseline follows the user vector, which weighs a fresh purchase most. (The ranker
    follows what the simulated shop's sessions teach it: a one-off purchase outside a shopper's
    favourites says little about their next visit, so it is not held to this.) Bought products are left out
    (``policy.exclude.purchased: true``): the tiny run's ``auto`` keeps them, and then the products just bought
    are the category's nearest to the moved vector."""
    from shoprank.recsys.answer import VariantPipeline

    config, run = ranked
    context = load_context(with_purchases_excluded(config), run)
    pipeline = VariantPipeline(context, "retrieval")
    stats = context.catalogue.stats
    user, history = max(context.events.histories.items(), key=lambda item: len(item[1]))
    now = float(history.ts_s[-1]) + 3600.0
    before = pipeline.recommend(user, 20, now)
    shown = {stats.category[stats.row_of[r.product_id]] for r in before}
    category = next(c for c in np.argsort(-np.bincount(stats.category)) if c not in shown)
    bought = [stats.product_ids[r] for r in np.flatnonzero(stats.category == category)[:3]]
    for i, product in enumerate(bought):
        pipeline.observe(user, product, "purchase", now - 60 + i)
    after = pipeline.recommend(user, 20, now)
    in_category = [r.product_id for r in after if stats.category[stats.row_of[r.product_id]] == category]
    assert in_category, "no product of the bought category after buying 3 of it"
    assert not set(in_category) & set(bought), "a bought product came back"


def test_windowed_requests_make_every_shopper_with_held_out_engagements_a_test_request(
        tiny_run: tuple[Config, Run]) -> None:
    """Issue 36, item 4: with ``features.requests=windows`` a recommendation request is a shopper's window of
    ``features.request_window_days`` from its split's start, so every shopper who engaged in the test split is a
    test request, asked at the window's start (history: every earlier event), its truth what they engaged with in
    it. The tiny shop's sessions are visits: ``auto`` keeps its session requests."""
    config, run = tiny_run
    windows = config.model_copy(update={"features": config.features.model_copy(update={"requests": "windows"})})
    events = read_table(run, "data", "events").to_pandas()
    events["ts_s"] = epoch_seconds(read_table(run, "data", "events").column("ts"))
    engaged = events[events["event_type"].isin(["click", "add_to_cart", "purchase"])]
    requests = build_requests(windows, run)
    recommend = requests[requests["kind"] == "recommend"]
    test = recommend[recommend["split"] == "test"]
    assert set(test["user_id"]) == set(engaged.loc[engaged["split"] == "test", "user_id"])
    test_start = events.loc[events["split"] == "test", "ts_s"].min()
    width = windows.features.request_window_days * 86_400
    assert np.allclose((test["ts_s"] - test_start) % width, 0.0)
    for request in test.head(20).itertuples(index=False):  # the truth is the window's engagements, nothing else
        window = engaged[(engaged["user_id"] == request.user_id) & (engaged["ts_s"] >= request.ts_s)
                         & (engaged["ts_s"] < request.ts_s + width)]
        assert set(request.engaged_ids) == set(window["product_id"])
    cutoff = ranker_cutoff(read_table(run, "data", "events"), config.features.history_fraction)
    assert (recommend.loc[recommend["split"] == "train", "ts_s"] >= cutoff).all()
    assert requests["request_id"].is_unique
    sessions = build_requests(config, run)  # auto: the tiny shop's sessions are visits
    assert set(sessions.loc[sessions["kind"] == "recommend", "request_id"]) <= set(events["session_id"])
