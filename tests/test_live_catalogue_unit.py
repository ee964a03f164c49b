"""The live catalogue without Ray: a variant's catalogue changed in place by the catalogue change log
(:mod:`shoprank.recsys.live`) answers as a catalogue built with the changes, a deleted product leaves every candidate
source, the delta BM25 scores as ``bm25s`` does, and the replica's follower (:mod:`shoprank.serving.catalogue_state`)
catches up with a store and reports its lag.

The shop is ``fake_shop.py``'s (36 products, five shoppers, a hashed-words encoder): the real retrieval, features and
ranking path over it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import bm25s
import faiss
import numpy as np
import pyarrow as pa
import pytest

from conftest import tiny_config
from fake_shop import DIMENSIONS, START, HashedWords, events, products
from shoprank.config import Config
from shoprank.data.catalogue import normalised_products
from shoprank.encoder.text import QUERY_MAX_LENGTH, product_texts
from shoprank.privacy import Pseudonyms
from shoprank.recsys.answer import Ranking, VariantPipeline, answer_many
from shoprank.recsys.diversity import Diversity
from shoprank.recsys.messages import Asked
from shoprank.recsys.context import RankingContext, assemble_context
from shoprank.recsys.features import COLUMN
from shoprank.recsys.retrieval import DeltaLexical, rank_inputs
from shoprank.recsys.types import SOURCES, ProductStats
from shoprank.serving.catalogue_state import CatalogueFollower
from shoprank.store.events import CatalogueChange

USER_KEY = b"k" * 32
NOW_S = (START + dt.timedelta(days=30)).timestamp()
NEW = [
    # an existing category and brand
    {"product_id": "N1", "title": "Acme <b>Zephyrine</b> skillet", "description": "A light skillet.",
     "category": "Kitchen > Cookware", "brand": "Acme", "price": 31.0, "attributes": {"colour": "red"}},
    # a category, department and brand nobody had: new codes, and a brand a query can name
    {"product_id": "N2", "title": "Dewfall garden hose", "description": "Thirty metres of hose.",
     "category": "Garden > Hoses", "brand": "Dewfall", "price": 24.5, "attributes": {}},
    # neither category nor brand
    {"product_id": "N3", "title": "Quillon lantern", "description": None, "category": None, "brand": None,
     "price": 12.0, "attributes": None},
]
CHANGED = {
    "P00004": {"price": 99.0},  # a price: the same text, no re-embedding
    "P00010": {"title": "Borealis red chef knife, forged"},  # a title: a new text and vector
}
QUERIES = ["acme skillet", "zephyrine", "dewfall garden hose", "quillon lantern", "red chef knife forged", "tent"]


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return tiny_config(tmp_path_factory.mktemp("live"))


def record_rows() -> list[dict]:
    """The fake shop's catalogue as record rows (attributes as dicts, as the change log holds them)."""
    return [{**row, "attributes": dict(row["attributes"])} for row in products().to_pylist()]


def context_of(config: Config, rows: Sequence[dict]) -> RankingContext:
    """A context assembled from scratch over ``rows`` (record rows), normalised as the preprocess stage does."""
    table = normalised_products(pa.Table.from_pylist([{**r, "attributes": list((r["attributes"] or {}).items())}
                                                      for r in rows], schema=products().schema),
                                {}, config.preprocess.description_chars)

    def dense(stats: ProductStats) -> tuple[np.ndarray, faiss.Index, np.ndarray]:
        vectors = HashedWords().embed(product_texts(table, config.encoder), config.encoder.max_length)
        index = faiss.IndexFlatIP(DIMENSIONS)
        index.add(vectors)
        return vectors, index, np.arange(len(vectors))

    return assemble_context(config, table, events(Pseudonyms(USER_KEY)), dense, HashedWords())


def puts(rows: Sequence[dict], first_seq: int = 1) -> list[CatalogueChange]:
    return [CatalogueChange(first_seq + i, "put", r["product_id"], r, NOW_S - 60) for i, r in enumerate(rows)]


def changed_rows() -> list[dict]:
    """The base catalogue with :data:`CHANGED` applied, then :data:`NEW`: what a rebuilt catalogue holds."""
    return [{**r, **CHANGED.get(r["product_id"], {})} for r in record_rows()] + NEW


def requests(context: RankingContext) -> list[tuple[str | None, str | None]]:
    """(user, query): every shopper's recommendation, an anonymous one, and searches of old and new products."""
    users = sorted(context.events.histories)
    return [(u, None) for u in users] + [(None, None)] + [(u, q) for q in QUERIES for u in (None, users[0])]


def answered(context: RankingContext, user: str | None, query: str | None) -> dict[str, np.ndarray]:
    """Product id -> feature row of the request's candidates."""
    vector = HashedWords().embed([query], QUERY_MAX_LENGTH)[0] if query is not None else None
    inputs = rank_inputs(context, user, query, vector, NOW_S)
    ids = context.catalogue.stats.product_ids
    return {ids[row]: features for row, features in zip(inputs.candidates.rows, inputs.features)}


def test_a_live_put_answers_as_a_catalogue_built_with_it(config: Config) -> None:
    rebuilt = context_of(config, changed_rows())
    live = VariantPipeline(context_of(config, record_rows()), "retrieval")
    changes = puts([{**r, **CHANGED[r["product_id"]]} for r in record_rows() if r["product_id"] in CHANGED] + NEW)
    assert live.apply_catalogue(changes) == {"put": 5, "delete": 0}
    assert live.catalogue_log is not None and live.catalogue_log.cursor == 5
    catalogue = live.context.catalogue
    assert catalogue.stats.product_ids == rebuilt.catalogue.stats.product_ids  # new rows appended, changed in place
    np.testing.assert_array_equal(np.isnan(catalogue.added_at_s), [True] * 36 + [False] * 3)
    # only the products whose text changed were embedded, with the encoder the catalogue was built with
    assert catalogue.stale_in_main.sum() == 4 and catalogue.delta_index.ntotal == 4
    np.testing.assert_allclose(catalogue.vectors, rebuilt.catalogue.vectors, atol=1e-6)
    for name in ("popularity", "popularity_shoppers", "repeat_rate", "ctr", "conversion", "log_price",
                 "price_in_category", "rank_in_category", "has_category", "has_brand"):
        np.testing.assert_array_equal(getattr(catalogue.stats, name), getattr(rebuilt.catalogue.stats, name), name)
    # cold start: no counts, and every rate missing, never a ratio over zero
    assert np.isnan(catalogue.stats.ctr[36:]).all() and (catalogue.stats.popularity[36:] == 0).all()
    pipeline = VariantPipeline(rebuilt, "retrieval")
    bm25 = COLUMN["bm25"]

    def same_answers(compacted: bool) -> None:
        for user, query in requests(rebuilt):
            built, changed = answered(rebuilt, user, query), answered(live.context, user, query)
            assert built.keys() == changed.keys(), (user, query)
            for product, features in built.items():
                if compacted:
                    np.testing.assert_array_equal(features, changed[product], err_msg=f"{user} {query} {product}")
                    continue
                # before compaction, a live text's BM25 is scored with the run corpus's statistics (DeltaLexical),
                # not a rebuilt corpus's: the one feature that differs, and only where a query word is in it
                np.testing.assert_array_equal(np.delete(features, bm25), np.delete(changed[product], bm25),
                                              err_msg=f"{user} {query} {product}")
                assert (features[bm25] > 0) == (changed[product][bm25] > 0)
            if query is None or compacted:  # a search orders by BM25 too: the same once compacted
                got = live.search(query, user, 10, NOW_S) if query else live.recommend(user, 10, NOW_S)
                want = pipeline.search(query, user, 10, NOW_S) if query else pipeline.recommend(user, 10, NOW_S)
                assert [r.product_id for r in got] == [r.product_id for r in want], (user, query)
                assert [r.shown for r in got] == [r.shown for r in want]

    same_answers(compacted=False)
    assert catalogue.outdated() == 4
    live.catalogue_log.compact(threading.Lock())
    assert catalogue.outdated() == 0 and catalogue.delta_index.ntotal == 0 and not catalogue.delta_lexical.terms
    same_answers(compacted=True)
    found = live.search("zephyrine", None, 3, NOW_S)
    assert found[0].product_id == "N1" and found[0].shown == {"title": "acme zephyrine skillet",
                                                              "category": "Kitchen > Cookware", "brand": "acme",
                                                              "price": 31.0, "category_predicted": False}
    assert live.search("acme skillet", None, 50, NOW_S)[0].shown is not None
    assert "dewfall" in live.ranking.brands_named.code  # a brand put live is one a query can name


def test_a_product_withdrawn_before_a_compaction_and_put_back_unchanged_is_found_again(config: Config) -> None:
    """Sold out, then restocked: a compaction while the product is unlisted leaves it out of the main indices, so
    putting it back with its text unchanged (nothing to re-embed) must bring it to the delta indices, or no search
    finds it. A run product and a live-added one alike."""
    live = VariantPipeline(context_of(config, record_rows()), "retrieval")
    run_product = next(r for r in record_rows() if r["product_id"] == "P00010")
    live.apply_catalogue(puts(NEW))
    live.apply_catalogue([CatalogueChange(4, "delete", "N3", None, NOW_S - 50),
                          CatalogueChange(5, "delete", "P00010", None, NOW_S - 50)])
    assert live.catalogue_log is not None
    live.catalogue_log.compact(threading.Lock())
    catalogue = live.context.catalogue
    assert catalogue.outdated() == 0, "unlisted rows out of the main indices are not work for the next compaction"
    for query, product in (("quillon lantern", "N3"), (run_product["title"].lower(), "P00010")):
        assert product not in [r.product_id for r in live.search(query, None, 10, NOW_S)]
    live.apply_catalogue(puts([next(r for r in NEW if r["product_id"] == "N3"), run_product], first_seq=6))
    for query, product in (("quillon lantern", "N3"), (run_product["title"].lower(), "P00010")):
        assert product in [r.product_id for r in live.search(query, None, 10, NOW_S)], (query, product)


def test_a_search_for_a_products_exact_title_answers_it_first(config: Config) -> None:
    """A ranking that weighs popularity above everything (as a ranker trained only on products with behaviour does)
    buries a product put a moment ago, even for its own title; a query that is a product's title (normalised
    alike) answers that product first, whatever its score. A query that is not a title is ranked as before."""
    popular_first = config.model_copy(update={"serve": config.serve.model_copy(
        update={"baseline_popularity_weight": 100.0})})
    live = VariantPipeline(context_of(popular_first, record_rows()), "retrieval")
    live.apply_catalogue(puts(NEW))
    assert live.ranking.listing is live.context.catalogue.listing
    without_pin = Ranking.served(popular_first, live.context.catalogue.stats, "retrieval", None, Diversity())
    asked = [Asked(None, [], "Quillon   LANTERN", 10, NOW_S)]
    vectors = {"Quillon   LANTERN": HashedWords().embed(["Quillon   LANTERN"], QUERY_MAX_LENGTH)[0]}
    buried = answer_many(live.retrieval, without_pin, asked, vectors)[0].items
    assert buried[0].product_id != "N3", "the popularity-first ranking puts the new product first anyway"
    assert live.search("Quillon   LANTERN", None, 10, NOW_S)[0].product_id == "N3"
    assert [r.product_id for r in live.search("lantern", None, 10, NOW_S)] == \
        [r.product_id for r in answer_many(live.retrieval, without_pin, [Asked(None, [], "lantern", 10, NOW_S)],
                                           {"lantern": HashedWords().embed(["lantern"], QUERY_MAX_LENGTH)[0]})[0].items]


def test_a_deleted_row_leaves_every_source(config: Config) -> None:
    """The shop's most popular product and a product co-engaged with a shopper's recent ones, deleted: no source
    proposes either to anyone, searched by its own title or recommended; put back unchanged, answers are as before."""
    live = VariantPipeline(context_of(config, record_rows()), "retrieval")
    catalogue = live.context.catalogue
    users = [None, *sorted(live.context.events.histories)]

    def sources(user: str | None, query: str | None) -> dict[int, set[str]]:
        vector = HashedWords().embed([query], QUERY_MAX_LENGTH)[0] if query is not None else None
        candidates = rank_inputs(live.context, user, query, vector, NOW_S).candidates
        return {int(row): {name for i, name in enumerate(SOURCES) if bits >> i & 1}
                for row, bits in zip(candidates.rows, candidates.sources)}

    popular = int(catalogue.popular[0])
    coengaged = next(row for user in users[1:] for row, names in sources(user, None).items()
                     if "coengaged" in names and row != popular)
    deleted = {popular, coengaged}
    titles = [catalogue.listing.title[row] for row in deleted]
    requests = [(user, query) for user in users for query in (None, *titles)]
    before = [names for user, query in requests for row, names in sources(user, query).items() if row in deleted]
    assert {"dense", "lexical", "popular", "coengaged"} <= set().union(*before)  # the test can fail: they were

    def answers() -> list[list[str]]:
        return [[r.product_id for r in (live.search(q, u, 10, NOW_S) if q else live.recommend(u, 10, NOW_S))]
                for u, q in requests]

    shown = answers()
    ids = [catalogue.stats.product_ids[row] for row in deleted]
    assert any(set(ids) & set(answer) for answer in shown)
    assert live.apply_catalogue([CatalogueChange(i + 1, "delete", p, None, NOW_S) for i, p in enumerate(ids)]) == {
        "put": 0, "delete": 2}
    for row in deleted:
        assert not catalogue.alive[row] and row not in catalogue.popular and row not in catalogue.trending(NOW_S)
        assert all(row not in rows for rows in catalogue.popular_in.values())
        assert row not in catalogue.nearest(catalogue.vectors[row], 36)
        assert catalogue.bm25_scores(catalogue.listing.title[row])[row] == 0
    for user, query in requests:
        assert not deleted & sources(user, query).keys(), (user, query)
        got = live.search(query, user, 36, NOW_S) if query else live.recommend(user, 36, NOW_S)
        assert not set(ids) & {r.product_id for r in got}, (user, query)
    # a delete again changes nothing; the rows put back (texts unchanged: no re-embedding) answer as before
    assert live.apply_catalogue([CatalogueChange(3, "delete", ids[0], None, NOW_S)]) == {"put": 0, "delete": 0}
    assert live.apply_catalogue(puts([r for r in record_rows() if r["product_id"] in ids], 4)) == {
        "put": 2, "delete": 0}
    assert catalogue.delta_index.ntotal == 0 and catalogue.alive.all()  # their vectors are the main index's still
    assert answers() == shown


def test_the_delta_bm25_scores_a_document_as_bm25s_scores_it_in_the_main_index(config: Config) -> None:
    """Every document of a catalogue, put into a delta over that catalogue's statistics, scores what ``bm25s`` gives
    it in its own index, for words it has once, twice, or not at all."""
    texts = product_texts(normalised_products(products(), {}, config.preprocess.description_chars), config.encoder)
    corpus = bm25s.tokenize(texts, stopwords="en", show_progress=False)
    main = bm25s.BM25(k1=1.5, b=0.75)
    main.index(corpus, show_progress=False)
    delta = DeltaLexical(main, corpus)
    for row, text in enumerate(texts):
        delta.put(1000 + row, text)
    for query in ("acme red skillet", "black black cleaver", "lantern by cinder", "tent", "zephyrine"):
        words = bm25s.tokenize([query], stopwords="en", show_progress=False, return_ids=False)[0]
        expected = main.get_scores(words)
        rows, scores = delta.scores(words)
        np.testing.assert_array_equal(rows, 1000 + np.arange(len(texts)))
        np.testing.assert_allclose(scores, expected, rtol=1e-6)
        assert (expected > 0).any() or query == "zephyrine"
    # a word the corpus never had: bm25s ignores it, the delta finds the document that has it
    delta.put(2000, "zephyrine skillet")
    rows, scores = delta.scores(["zephyrine"])
    assert rows[scores > 0].tolist() == [2000]


class LogStore:
    """The catalogue change log as the event store keeps it (``catalogue_changes``, ``last_catalogue_change``), in
    memory: what a replica's follower reads."""

    def __init__(self) -> None:
        self.log: list[CatalogueChange] = []

    def put(self, product: dict, ts_s: float = NOW_S) -> None:
        self.log.append(CatalogueChange(len(self.log) + 1, "put", product["product_id"], product, ts_s))

    def delete(self, product_id: str, ts_s: float = NOW_S) -> None:
        self.log.append(CatalogueChange(len(self.log) + 1, "delete", product_id, None, ts_s))

    def catalogue_changes(self, after: int, limit: int = 10_000) -> list[CatalogueChange]:
        return [c for c in self.log if c.seq > after][:limit]

    def last_catalogue_change(self) -> tuple[int, float]:
        return (self.log[-1].seq, self.log[-1].ts_s) if self.log else (0, 0.0)


def test_the_follower_replays_from_the_runs_mark_and_reports_its_lag(config: Config) -> None:
    """Changes up to the run's mark are the run's own; the ones after it are applied, embedded outside the replica's
    lock; while one waits to be applied the lag grows, and it is 0 once caught up."""
    from shoprank.recsys.live import LiveCatalogue

    store = LogStore()
    store.put(NEW[0])  # seq 1: folded into the run by its ingest (the mark), so not applied again
    store.put(NEW[1])
    store.delete("P00000")
    context = context_of(config, record_rows())
    embedding, release = threading.Event(), threading.Event()
    lock = threading.Lock()

    def embed(texts: list[str]) -> np.ndarray:
        embedding.set()
        assert not lock.locked(), "embedding holds the replica's lock"
        release.wait(10)
        return HashedWords().embed(texts, config.encoder.max_length)

    now = [100.0]
    follower = CatalogueFollower(store, LiveCatalogue(context, embed), lock, start_seq=1, clock=lambda: now[0])
    assert follower.lag_s() == 0.0 and follower.cursor == 1
    worker = threading.Thread(target=follower.catch_up)
    worker.start()
    assert embedding.wait(10)
    now[0] += 2.5
    assert follower.lag_s() == 2.5  # a pending change, being embedded: the lag shows it
    assert follower.describe() == {"products": 36, "cursor": 1, "lag_s": 2.5}
    started = time.monotonic()  # a batch of requests meanwhile waits a moment, then answers from what is applied
    assert follower.catch_up(wait_s=0.2) == {"put": 0, "delete": 0} and follower.cursor == 1
    assert time.monotonic() - started < 5
    release.set()
    worker.join(10)
    assert follower.lag_s() == 0.0 and follower.cursor == 3
    assert follower.applied == {"put": 1, "delete": 1}
    stats = context.catalogue.stats
    assert "N1" not in stats.row_of and "N2" in stats.row_of and not context.catalogue.alive[stats.row_of["P00000"]]
    assert follower.describe() == {"products": 36, "cursor": 3, "lag_s": 0.0}
    assert follower.catch_up() == {"put": 0, "delete": 0}  # nothing new: nothing read but the log's end
    # a put and a delete of one product in one read: the last one counts
    store.put(NEW[2])
    store.delete("N3")
    assert follower.catch_up() == {"put": 0, "delete": 0} and "N3" not in stats.row_of and follower.cursor == 5


def test_the_category_head_fills_a_live_products_missing_category(config: Config) -> None:
    """A product put without a category gets the head's most likely one; one with a category keeps its own."""
    from shoprank.encoder.categories import CategoryHead
    from shoprank.recsys.live import LiveCatalogue

    context = context_of(config, record_rows())
    lantern = HashedWords().embed(["quillon lantern"], config.encoder.max_length)[0]
    head = CategoryHead(np.stack([-lantern, lantern]), np.zeros(2, np.float32), ["Kitchen > Knives", "Outdoors > Lights"])
    live = LiveCatalogue(context, lambda texts: HashedWords().embed(texts, config.encoder.max_length), head)
    live.apply(puts([NEW[2], NEW[1]]))
    stats, listing = context.catalogue.stats, context.catalogue.listing
    assert listing.category[stats.row_of["N3"]] == "Outdoors > Lights" and stats.has_category[stats.row_of["N3"]]
    assert listing.category[stats.row_of["N2"]] == "Garden > Hoses"
    # an answer shows the guess as one, and the product's own category as its own
    assert listing.shown(stats.row_of["N3"])["category_predicted"]
    assert not listing.shown(stats.row_of["N2"])["category_predicted"]
    assert stats.category[stats.row_of["N3"]] == stats.category[stats.row_of["P00027"]]  # P00027: a light


def test_categorisers_rank_the_trees_categories_with_probabilities(config: Config) -> None:
    """The head's softmax and the neighbours' vote shares, in one shape (most likely first); the neighbours of a
    served catalogue are its listed products with a category of their own, never a predicted one."""
    from shoprank.encoder.categories import CategoryHead, Neighbours, product_text, top_accuracy
    from shoprank.recsys.live import labelled_neighbours

    head = CategoryHead(np.eye(3, dtype=np.float32), np.zeros(3, np.float32), ["a", "b", "c"])
    (ranked,) = head.top(np.array([[2.0, 1.0, 0.0]], np.float32), 2)
    assert [c for c, _ in ranked] == ["a", "b"] and ranked[0][1] > ranked[1][1] > 0
    assert np.allclose(head.probabilities(np.ones((1, 3), np.float32)).sum(), 1.0)
    voters = Neighbours(np.array([[1, 0], [0.8, 0.6], [0, 1]], np.float32), ["x", "y", "y"], neighbours=2)
    assert voters.top(np.array([[0.9, 0.1]], np.float32), 3) == [[("x", 0.5), ("y", 0.5)]]  # a tie: x is nearer
    assert Neighbours(np.zeros((0, 2), np.float32), [], 3).top(np.ones((1, 2), np.float32), 3) == [[]]
    assert top_accuracy([[("x", 0.5), ("y", 0.5)], [("x", 1.0)]], ["y", "y"]) == {"top1": 0.0, "top3": 0.5}
    # the text a listing is embedded as: normalised as the catalogue's products, no category to read
    assert product_text("  ACME <b>Red</b> Skillet ", " ", config) == "acme red skillet"
    context = context_of(config, record_rows())
    listing = context.catalogue.listing
    listing.category_predicted[0] = True
    labelled = labelled_neighbours(context.catalogue, 5)
    assert len(labelled.categories) == 35 and listing.category[0] is not None
