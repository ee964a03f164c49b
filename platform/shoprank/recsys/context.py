"""What retrieval and ranking read, loaded from a run: catalogue, statistics, event log.

The same :class:`RankingContext` backs the offline feature job (one per Ray Data
actor) and the online ranker, so both see the same products, statistics and
histories. Everything time-dependent is cut at ``cutoff_s``: product statistics,
trending products, co-engagement neighbours and the item-item model use only
events before it.

A feature actor's context has no encoder (``load_context(..., encoder=False)``): its
requests come with their query vectors, embedded once by the stage's driver, so the
actor imports neither PyTorch nor transformers (about 7 s of CPU per actor here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from shoprank.config import Config, ExcludeConfig, RetrievalConfig
from shoprank.data.schema import ESCI_LABELS
from shoprank.encoder.index import PRODUCT_EMBEDDINGS, ZERO_SHOT_PRODUCTS, embedding_matrix
from shoprank.encoder.runtime import Runtime, load_embedder
from shoprank.encoder.text import QUERY_MAX_LENGTH, product_texts
from shoprank.errors import ShopRankError
from shoprank.recsys.features import epoch_seconds, product_stats
from shoprank.recsys.retrieval import Catalogue, ItemItem, fit_item_item
from shoprank.recsys.types import History, ProductStats
from shoprank.store.run import Run
from shoprank.store.tables import read_table

if TYPE_CHECKING:
    from shoprank.encoder.runtime import Embedder

ENGAGEMENTS = ("click", "add_to_cart", "purchase")
RELEVANT_LABEL = ESCI_LABELS["S"]
"""A judgment of at least this label (substitute, exact) says the product answers the query."""
EVENT_COLUMNS = ["user_id", "session_id", "product_id", "event_type", "ts", "split"]
MAX_NEIGHBOURS = 50


def ranker_cutoff(events: pa.Table, history_fraction: float) -> float:
    """The time quantile of the training events that splits statistics from ranker training rows."""
    train = events.filter(pc.equal(events.column("split"), "train"))
    if train.num_rows == 0:
        return 0.0  # no behaviour: nothing is before the cut-off, and no request is after it
    return float(np.quantile(epoch_seconds(train.column("ts")), history_fraction))


class EventLog:
    """Each user's events in time order; histories are cut at a time, so none sees its future."""

    def __init__(self, events: pd.DataFrame, row_of: dict[str, int]) -> None:
        frame = events[events["product_id"].isin(row_of.keys())].sort_values(["user_id", "ts_s"], kind="stable")
        self.histories: dict[str, History] = {}
        rows = frame["product_id"].map(row_of).to_numpy(np.int64)
        types = frame["event_type"].to_numpy()
        ts = frame["ts_s"].to_numpy(np.float64)
        users = frame["user_id"].to_numpy()
        if len(users):
            starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
            for start, stop in zip(starts, np.r_[starts[1:], len(users)]):
                self.histories[users[start]] = History(rows[start:stop], types[start:stop].tolist(), ts[start:stop])

    def history(self, user_id: str | None, before_s: float, limit: int) -> History:
        """The user's last ``limit`` events strictly before ``before_s`` (empty for unknown users)."""
        known = self.histories.get(user_id) if user_id else None
        return known.before(before_s, limit) if known is not None else History.empty()

    def forget(self, user_id: str) -> None:
        """Drop ``user_id``'s history (an erased shopper): from now on they are unknown, as a new shopper is."""
        self.histories.pop(user_id, None)

    def append(self, user_id: str, row: int, event_type: str, ts_s: float) -> None:
        """Record a live event (events arrive in time order per user)."""
        old = self.histories.get(user_id, History.empty())
        self.histories[user_id] = History(
            np.append(old.product_rows, row), [*old.event_types, event_type], np.append(old.ts_s, ts_s)
        )


def coengaged_before(events: pd.DataFrame, row_of: dict[str, int], cutoff_s: float) -> dict[int, np.ndarray]:
    """Products engaged in the same session before the cut-off, most shared sessions first (ties: catalogue
    order); a product's count with another is the number of sessions that engaged with both."""
    engaged = events[(events["ts_s"] < cutoff_s) & events["event_type"].isin(ENGAGEMENTS)
                     & events["product_id"].isin(row_of.keys())]
    if engaged.empty:
        return {}
    sessions = pd.factorize(engaged["session_id"])[0]
    rows = engaged["product_id"].map(row_of).to_numpy(np.int64)
    by_session = sp.csr_matrix((np.ones(len(rows), np.float32), (sessions, rows)), shape=(sessions.max() + 1, len(row_of)))
    by_session.data[:] = 1.0  # a session counts once per product
    shared = (by_session.T @ by_session).tocsr()
    shared.setdiag(0)
    shared.eliminate_zeros()
    out = {}
    for a in np.flatnonzero(np.diff(shared.indptr)):
        others = shared.indices[shared.indptr[a]:shared.indptr[a + 1]]
        counts = shared.data[shared.indptr[a]:shared.indptr[a + 1]]
        out[int(a)] = others[np.lexsort((others, -counts))][:MAX_NEIGHBOURS].astype(np.int64)
    return out


def item_item_before(events: pd.DataFrame, row_of: dict[str, int], cutoff_s: float,
                     retrieval: RetrievalConfig) -> ItemItem:
    """The item-item model (EASE) of the users' engagements before the cut-off."""
    engaged = events[(events["ts_s"] < cutoff_s) & events["event_type"].isin(ENGAGEMENTS)
                     & events["product_id"].isin(row_of.keys())]
    return fit_item_item(engaged["user_id"].to_numpy(), engaged["product_id"].map(row_of).to_numpy(np.int64),
                         len(row_of), retrieval.item_item_l2, retrieval.item_item_max_products,
                         retrieval.item_item_neighbours)


def judged_relevant_counts(run: Run, row_of: dict[str, int]) -> np.ndarray:
    """Per catalogue row, the training-split judged queries that call the product relevant (label >= 2:
    exact or substitute). Training split only, so no test query's judgment reaches what is evaluated."""
    pairs = read_table(run, "data", "query_pairs", columns=["product_id", "label", "source", "split"]).to_pandas()
    relevant = pairs[(pairs["source"] == "judgment") & (pairs["split"] == "train") & (pairs["label"] >= RELEVANT_LABEL)]
    rows = relevant["product_id"].map(row_of).dropna().to_numpy(np.int64)
    return np.bincount(rows, minlength=len(row_of)).astype(np.float64)


def excluded_event_types(exclude: ExcludeConfig) -> frozenset[str]:
    """The event types whose products a recommendation leaves out."""
    return frozenset(exclude.seen) | ({"purchase"} if exclude.purchased else set())


def trending_before(events: pd.DataFrame, row_of: dict[str, int], cutoff_s: float, days: float) -> np.ndarray:
    """Catalogue rows by engagements in the ``days`` before the cut-off, most first."""
    recent = events[(events["ts_s"] < cutoff_s) & (events["ts_s"] >= cutoff_s - days * 86_400)
                    & events["event_type"].isin(ENGAGEMENTS)]
    counts = np.bincount(recent["product_id"].map(row_of).dropna().astype(np.int64), minlength=len(row_of))
    return np.argsort(-counts, kind="stable")[: int((counts > 0).sum())]


@dataclass
class RankingContext:
    """Catalogue, encoder and event log of one run, as of the ranker's cut-off."""

    config: Config
    catalogue: Catalogue
    embedder: Embedder | None
    """The query encoder in its runtime (:mod:`shoprank.encoder.runtime`); None in a context loaded without one
    (a feature actor's)."""
    events: EventLog
    cutoff_s: float

    def encode_queries(self, queries: list[str]) -> np.ndarray:
        if self.embedder is None:
            raise ShopRankError("this ranking context was loaded without its encoder (encoder=False)")
        return self.embedder.embed(queries, QUERY_MAX_LENGTH)


def load_product_stats(config: Config, run: Run) -> ProductStats:
    """The run's product statistics alone (what a ranker needs beside its candidates and the user's history)."""
    events = read_table(run, "data", "events", columns=["user_id", "product_id", "event_type", "ts", "split"])
    cutoff = ranker_cutoff(events, config.features.history_fraction)
    return product_stats(read_table(run, "data", "products"), events, cutoff, config.features.ctr_prior_views)


def load_context(
    config: Config, run: Run, *, zero_shot: bool = False, history_until_s: float | None = None,
    new_events: pa.Table | None = None, encoder: bool = True, runtime: Runtime = "torch",
) -> RankingContext:
    """The run's context: fine-tuned encoder and index, or the pretrained encoder (``zero_shot``), the encoder in
    ``runtime``; without an encoder when ``encoder`` is false (the caller brings its query vectors).

    ``history_until_s`` keeps only earlier events in the event log: the state of a
    server that started then and receives later events live through
    :meth:`EventLog.append`. ``new_events`` (events after the run's, for an
    incremental update) join the event log; statistics keep the run's cut-off.
    """
    products = read_table(run, "data", "products")
    events_table = read_table(run, "data", "events", columns=EVENT_COLUMNS)
    if new_events is not None:
        events_table = pa.concat_tables([events_table, new_events.select(EVENT_COLUMNS)])
    embedder = load_embedder(config, run, zero_shot=zero_shot, runtime=runtime) if encoder else None

    def dense(stats: ProductStats) -> DenseIndex:
        if zero_shot:
            if not run.exists(*ZERO_SHOT_PRODUCTS):
                raise ShopRankError(f"{run.uri()} has no zero-shot catalogue embeddings "
                                    f"({'/'.join(ZERO_SHOT_PRODUCTS)}, written by the embed stage since the stage "
                                    "list of shoprank.stages): run the pipeline on it again")
            vectors = embedding_matrix(read_table(run, *ZERO_SHOT_PRODUCTS), stats.product_ids)
            index: faiss.Index = faiss.IndexFlatIP(vectors.shape[1])
            index.add(vectors)
            return vectors, index, np.arange(len(vectors))
        vectors = embedding_matrix(read_table(run, *PRODUCT_EMBEDDINGS), stats.product_ids)
        ids = read_table(run, "index", "product_ids").sort_by("row").column("product_id").to_pylist()
        return (vectors, faiss.read_index(str(run.local_path("index", "products.faiss"))),
                np.array([stats.row_of[p] for p in ids], dtype=np.int64))

    return assemble_context(config, products, events_table, dense, embedder,
                            judged=lambda row_of: judged_relevant_counts(run, row_of), history_until_s=history_until_s)


DenseIndex = tuple[np.ndarray, "faiss.Index", np.ndarray]
"""A catalogue's vectors (a row per product, in :class:`ProductStats` order), their index, and the catalogue row
of each index entry."""


def assemble_context(
    config: Config, products: pa.Table, events_table: pa.Table, dense: Callable[[ProductStats], DenseIndex],
    embedder: Embedder | None, *, judged: Callable[[dict[str, int]], np.ndarray] | None = None,
    history_until_s: float | None = None,
) -> RankingContext:
    """A context from a catalogue and an event log as tables: what :func:`load_context` builds from a run's files
    and a test from tables of its own. ``dense`` gives the vectors and index for the catalogue's statistics'
    product order; ``judged`` the judged-relevant counts per catalogue row (none: no judgments)."""
    cutoff = ranker_cutoff(events_table, config.features.history_fraction)
    stats = product_stats(products, events_table, cutoff, config.features.ctr_prior_views)
    events = pd.DataFrame({
        "user_id": events_table.column("user_id").to_numpy(zero_copy_only=False),
        "session_id": events_table.column("session_id").to_numpy(zero_copy_only=False),
        "product_id": events_table.column("product_id").to_numpy(zero_copy_only=False),
        "event_type": events_table.column("event_type").to_numpy(zero_copy_only=False),
        "ts_s": epoch_seconds(events_table.column("ts")),
    })
    vectors, index, index_rows = dense(stats)
    catalogue = Catalogue(
        stats=stats, vectors=vectors, index=index, index_rows=index_rows, texts=product_texts(products, config.encoder),
        coengaged=coengaged_before(events, stats.row_of, cutoff),
        trending=trending_before(events, stats.row_of, cutoff, config.retrieval.trending_days),
        item_item=item_item_before(events, stats.row_of, cutoff, config.retrieval),
        excluded_types=excluded_event_types(config.policy.exclude),
        judged_relevant=judged(stats.row_of) if judged is not None else None,
        bm25_k1=config.retrieval.bm25_k1, bm25_b=config.retrieval.bm25_b,
    )
    known = events if history_until_s is None else events[events["ts_s"] < history_until_s]
    return RankingContext(config, catalogue, embedder, EventLog(known, stats.row_of), cutoff)
