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
from dataclasses import asdict, dataclass
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
from shoprank.recsys.retrieval import Catalogue, ItemItem, RecentPopularity, fit_item_item
from shoprank.recsys.types import EXCLUSION, History, Listing, ProductStats
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
    """Products engaged in the same session (an order, where the reader cut sessions by order) before the
    cut-off, most shared first (ties: catalogue order). A session adds ``1 / log2(1 + its products)`` to each pair
    of its products: a basket of two counts about 0.6, one of a hundred (a wholesaler's order) 0.15 per pair, so
    huge baskets, whose pairs say little each, do not drown the small ones."""
    engaged = events[(events["ts_s"] < cutoff_s) & events["event_type"].isin(ENGAGEMENTS)
                     & events["product_id"].isin(row_of.keys())]
    if engaged.empty:
        return {}
    sessions = pd.factorize(engaged["session_id"])[0]
    rows = engaged["product_id"].map(row_of).to_numpy(np.int64)
    by_session = sp.csr_matrix((np.ones(len(rows), np.float32), (sessions, rows)), shape=(sessions.max() + 1, len(row_of)))
    by_session.data[:] = 1.0  # a session counts once per product
    weight = sp.diags((1.0 / np.log2(1.0 + np.diff(by_session.indptr))).astype(np.float32))
    shared = (by_session.T @ weight @ by_session).tocsr()
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


def excluded_event_types(exclude: ExcludeConfig, purchased: bool) -> frozenset[str]:
    """The event types whose products a recommendation leaves out; ``purchased``: the run's decision
    (:class:`ExclusionDecision`) for ``exclude.purchased``."""
    return frozenset(exclude.seen) | ({"purchase"} if purchased else set())


def recent_popularity(events: pd.DataFrame, row_of: dict[str, int], days: float) -> RecentPopularity:
    """The engagements of ``events`` as windows of ``days`` before any time (the trending source and features)."""
    engaged = events[events["event_type"].isin(ENGAGEMENTS) & events["product_id"].isin(row_of.keys())]
    return RecentPopularity(engaged["ts_s"].to_numpy(np.float64), engaged["product_id"].map(row_of).to_numpy(np.int64),
                            engaged["user_id"].to_numpy(), len(row_of), days)


def repeat_shares(events: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per split (validation, test), the share of its sessions' purchased products that repeat a purchase the
    shopper made before the session began, and how many purchases that is (what ``exclude.purchased: auto``
    decides on, and what the evaluation reports). A product bought twice in one session counts once."""
    bought = events[events["event_type"] == "purchase"]
    first = bought.groupby(["user_id", "product_id"])["ts_s"].min().rename("first_s")
    started = events.groupby("session_id")["ts_s"].min().rename("start_s")
    out = {}
    for split in ("validation", "test"):
        mine = bought[bought["split"] == split].drop_duplicates(["session_id", "user_id", "product_id"])
        mine = mine.join(first, on=["user_id", "product_id"]).join(started, on="session_id")
        out[split] = {"purchases": int(len(mine)),
                      "repeat_share": round(float((mine["first_s"] < mine["start_s"]).mean()), 4) if len(mine) else 0.0}
    return out


@dataclass
class ExclusionDecision:
    """Whether recommendations leave out what the shopper bought, and why (``policy.exclude.purchased``)."""

    exclude_purchased: bool
    setting: bool | str
    reason: str
    shares: dict[str, dict[str, float]]
    """:func:`repeat_shares` of the run's events."""

    @classmethod
    def decide(cls, exclude: ExcludeConfig, events: pd.DataFrame) -> "ExclusionDecision":
        """``auto``: exclude unless at least ``exclude.auto_min_repeat_share`` of the validation purchases were
        repeats; without validation purchases there is no evidence, and bought products are left out as before."""
        shares = repeat_shares(events)
        validation = shares["validation"]
        if exclude.purchased != "auto":
            return cls(bool(exclude.purchased), exclude.purchased, "set in policy.exclude.purchased", shares)
        if not validation["purchases"]:
            return cls(True, "auto", "no purchase in the validation split to measure repeats on", shares)
        repeats = validation["repeat_share"] >= exclude.auto_min_repeat_share
        return cls(not repeats, "auto", f"{validation['repeat_share']:.1%} of the validation purchases were repeats "
                   f"({'at least' if repeats else 'below'} auto_min_repeat_share "
                   f"{exclude.auto_min_repeat_share:.1%})", shares)

    def save(self, run: Run) -> None:
        run.write_json(asdict(self), *EXCLUSION)

    @classmethod
    def load(cls, run: Run) -> "ExclusionDecision":
        if not run.exists(*EXCLUSION):
            raise ShopRankError(f"{run.uri()}: no {'/'.join(EXCLUSION)} (policy.exclude.purchased: auto is decided by "
                                "the features stage): run the pipeline on it again")
        return cls(**run.read_json(*EXCLUSION))


def events_frame(events_table: pa.Table) -> pd.DataFrame:
    """An event log table as the frame the context's parts read (times as epoch seconds; a log without splits
    is all training)."""
    columns = ("user_id", "session_id", "product_id", "event_type")
    frame = pd.DataFrame({c: events_table.column(c).to_numpy(zero_copy_only=False) for c in columns})
    frame["ts_s"] = epoch_seconds(events_table.column("ts"))
    frame["split"] = (events_table.column("split").to_numpy(zero_copy_only=False)
                      if "split" in events_table.column_names else "train")
    return frame


def decide_exclusion(config: Config, run: Run) -> ExclusionDecision:
    """The features stage's :class:`ExclusionDecision` from the run's events."""
    return ExclusionDecision.decide(config.policy.exclude, events_frame(read_table(run, "data", "events",
                                                                                   columns=EVENT_COLUMNS)))


def purchased_excluded(config: Config, run: Run) -> bool:
    """Whether ``run``'s recommendations leave out bought products: the config's setting, or under ``auto`` the
    decision the run's features stage recorded."""
    setting = config.policy.exclude.purchased
    return ExclusionDecision.load(run).exclude_purchased if setting == "auto" else setting


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

    def embed_products(self, texts: list[str]) -> np.ndarray:
        """Product texts (products put live) at the products' length, as the embed stage embeds the catalogue."""
        if self.embedder is None:
            raise ShopRankError("this ranking context was loaded without its encoder (encoder=False): it cannot "
                                "embed the products the catalogue change log puts")
        return self.embedder.embed(texts, self.config.encoder.max_length)


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
                            judged=lambda row_of: judged_relevant_counts(run, row_of), history_until_s=history_until_s,
                            exclude_purchased=purchased_excluded(config, run))


DenseIndex = tuple[np.ndarray, "faiss.Index", np.ndarray]
"""A catalogue's vectors (a row per product, in :class:`ProductStats` order), their index, and the catalogue row
of each index entry."""


def assemble_context(
    config: Config, products: pa.Table, events_table: pa.Table, dense: Callable[[ProductStats], DenseIndex],
    embedder: Embedder | None, *, judged: Callable[[dict[str, int]], np.ndarray] | None = None,
    history_until_s: float | None = None, exclude_purchased: bool | None = None,
) -> RankingContext:
    """A context from a catalogue and an event log as tables: what :func:`load_context` builds from a run's files
    and a test from tables of its own. ``dense`` gives the vectors and index for the catalogue's statistics'
    product order; ``judged`` the judged-relevant counts per catalogue row (none: no judgments);
    ``exclude_purchased`` the run's recorded decision (None: decided here from ``events_table``, as the features
    stage decides, :class:`ExclusionDecision`)."""
    cutoff = ranker_cutoff(events_table, config.features.history_fraction)
    stats = product_stats(products, events_table, cutoff, config.features.ctr_prior_views)
    events = events_frame(events_table)
    if exclude_purchased is None:
        exclude_purchased = ExclusionDecision.decide(config.policy.exclude, events).exclude_purchased
    known = events if history_until_s is None else events[events["ts_s"] < history_until_s]
    vectors, index, index_rows = dense(stats)
    catalogue = Catalogue(
        stats=stats, vectors=vectors, index=index, index_rows=index_rows, texts=product_texts(products, config.encoder),
        coengaged=coengaged_before(events, stats.row_of, cutoff),
        recent=recent_popularity(events, stats.row_of, config.retrieval.trending_days),
        item_item=item_item_before(events, stats.row_of, cutoff, config.retrieval),
        excluded_types=excluded_event_types(config.policy.exclude, exclude_purchased),
        judged_relevant=judged(stats.row_of) if judged is not None else None,
        bm25_k1=config.retrieval.bm25_k1, bm25_b=config.retrieval.bm25_b,
        popularity_by=config.retrieval.popularity_by, repeat_types=tuple(config.retrieval.repeat_event_types),
        repeat_half_life_days=config.retrieval.repeat_half_life_days, listing=Listing.of(products),
    )
    return RankingContext(config, catalogue, embedder, EventLog(known, stats.row_of), cutoff)
