"""The ranker's training, validation and test rows: requests, candidates, features, labels.

A **request** is a session of the simulated (or logged) shop: its user, its start
time and, for a search, its query. Ranker training requests are the training-split
sessions after the cut-off (``features.history_fraction``); validation and test
requests are those splits' sessions. A search request keeps its session only when
its query belongs to the same split of the query pool, so no query's judgments are
both trained on and evaluated. A judged query that no kept session of its split
searched is a request of its own, with no user (ESCI: judged queries, no behaviour),
so judgments train and measure the ranker whether or not anyone searched them.

A recommendation request is a session only where sessions are visits. A ratings export
cut into sessions by a gap keeps a shopper's months of events in one session (its
request, at the session's start, has no history: every source but popularity is empty,
and the ranker learns popularity alone, then meets full histories online), and a log
of one-event sessions has a request per event. There (``features.requests``: ``auto``,
:func:`sessions_are_visits`; or ``windows`` by choice) recommendation requests are
windows instead (:func:`windows_of`): a request per shopper per
``features.request_window_days`` of each split, at the window's start, its truth what
the shopper engaged with in the window, so every shopper with held-out engagements is
a test request, with every earlier event as history.

**Labels** (per candidate): for a search, the query's judgment (ESCI 0..3, 0 when
unjudged; a query nobody judged is labelled like a recommendation); for a recommendation, the user's engagement with the product in that
session: purchase 3, add to cart 2, click 1, shown but ignored or not shown 0.

Rows are built with Ray Data: ``map_batches`` over requests with
:class:`RequestFeatures`, a callable class that loads the run's context once per
actor (without an encoder: the requests' queries come embedded) and calls
:func:`~shoprank.recsys.retrieval.rank_inputs`, the function whose parts
(:func:`~shoprank.recsys.retrieval.retrieve`, then
:func:`~shoprank.recsys.features.compute_features`) the online retriever and ranker call.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from shoprank.config import Config
from shoprank.data.io import read_table
from shoprank.recsys.context import load_context, ranker_cutoff
from shoprank.recsys.features import FEATURES, epoch_seconds
from shoprank.recsys.retrieval import rank_inputs
from shoprank.store.run import Run

GRADES = {"click": 1, "add_to_cart": 2, "purchase": 3}
REQUEST_COLUMNS = ("user_id", "session_id", "product_id", "event_type", "ts", "query", "split")
SPLITS = ("train", "validation", "test")
DAY_S = 86_400.0


def sessions_of(events: pa.Table) -> pd.DataFrame:
    """One request per session: user, start time, query (searches), split, and the products engaged with."""
    frame = events.select([c for c in events.column_names if c != "ts"]).to_pandas()
    frame["ts_s"] = epoch_seconds(events.column("ts"))
    frame["grade"] = frame["event_type"].map(GRADES).fillna(0).astype(np.int8)
    sessions = frame.groupby("session_id", sort=True).agg(
        user_id=("user_id", "first"), ts_s=("ts_s", "min"), query=("query", "first"), split=("split", "first")
    )
    engaged = frame[frame["grade"] > 0].groupby(["session_id", "product_id"])["grade"].max().reset_index()
    lists = engaged.groupby("session_id").agg(engaged_ids=("product_id", list), engaged_grades=("grade", list))
    sessions = sessions.join(lists)
    for column in ("engaged_ids", "engaged_grades"):
        sessions[column] = sessions[column].apply(lambda v: v if isinstance(v, list) else [])
    sessions["kind"] = np.where(sessions["query"].notna(), "search", "recommend")
    return sessions.reset_index().rename(columns={"session_id": "request_id"})


def sessions_are_visits(events: pa.Table) -> bool:
    """Whether the browsing sessions of ``events`` are visits a request can start: not when the median shopper has
    one session (months of a ratings export cut as one) or the median session has one event (a session per event),
    where a request at a session's start has no history to answer from, or nothing to be right about."""
    browsing = events.filter(pc.is_null(events.column("query"))).select(["user_id", "session_id"]).to_pandas()
    if browsing.empty:
        return True
    per_user = browsing.groupby("user_id")["session_id"].nunique()
    per_session = browsing.groupby("session_id").size()
    return bool(per_user.median() > 1 and per_session.median() > 1)


def windows_of(events: pa.Table, starts: dict[str, float], window_days: float) -> pd.DataFrame:
    """One recommendation request per shopper and window of ``window_days`` that the shopper engaged in, the windows
    tiling each split from its start in ``starts`` (split -> seconds): the request is at the window's start, its
    truth what the shopper engaged with in the window, so every shopper with engagements in a split is a request of
    it, whatever the log's sessions look like."""
    frame = events.select(["user_id", "product_id", "event_type", "split"]).to_pandas()
    frame["ts_s"] = epoch_seconds(events.column("ts"))
    frame["grade"] = frame["event_type"].map(GRADES).fillna(0).astype(np.int8)
    frame["start_s"] = frame["split"].map(starts)
    frame = frame[(frame["grade"] > 0) & (frame["ts_s"] >= frame["start_s"])]
    width = window_days * DAY_S
    frame["request_ts_s"] = frame["start_s"] + (frame["ts_s"] - frame["start_s"]) // width * width
    keys = ["split", "user_id", "request_ts_s"]
    engaged = frame.groupby([*keys, "product_id"])["grade"].max().reset_index()
    windows = engaged.groupby(keys).agg(engaged_ids=("product_id", list), engaged_grades=("grade", list)).reset_index()
    return pd.DataFrame({
        "request_id": ["window:" + hashlib.blake2b(f"{s}:{u}:{t!r}".encode(), digest_size=8).hexdigest()
                       for s, u, t in zip(windows["split"], windows["user_id"], windows["request_ts_s"])],
        "user_id": windows["user_id"], "ts_s": windows["request_ts_s"], "query": None, "split": windows["split"],
        "engaged_ids": windows["engaged_ids"], "engaged_grades": windows["engaged_grades"], "kind": "recommend",
    })


def split_starts(events: pa.Table, cutoff: float) -> dict[str, float]:
    """Where each split's windowed requests start: the ranker's cut-off for training (earlier events feed the
    statistics), the first event of validation and of test (the time split's boundaries)."""
    ts = epoch_seconds(events.column("ts"))
    split = np.asarray(events.column("split").to_numpy(zero_copy_only=False))
    starts = {s: float(ts[split == s].min()) for s in ("validation", "test") if (split == s).any()}
    return {"train": cutoff, **starts}


def build_requests(config: Config, run: Run) -> pd.DataFrame:
    """Every request of the three splits with what the user engaged with (see the module docstring)."""
    events = read_table(run, "data", "events", columns=list(REQUEST_COLUMNS))
    cutoff = ranker_cutoff(events, config.features.history_fraction)
    sessions = sessions_of(events)
    windows = config.features.requests == "windows" or (
        config.features.requests == "auto" and not sessions_are_visits(events))
    if windows:
        sessions = pd.concat([sessions[sessions["kind"] == "search"],
                              windows_of(events, split_starts(events, cutoff), config.features.request_window_days)],
                             ignore_index=True)
    pairs = read_table(run, "data", "query_pairs")
    query_split = dict(zip(pairs.column("query").to_pylist(), pairs.column("split").to_pylist()))
    keep = (sessions["split"] != "train") | (sessions["ts_s"] >= cutoff)
    keep &= (sessions["kind"] == "recommend") | (sessions["query"].map(query_split) == sessions["split"])
    sessions = pd.concat([sessions[keep], judged_requests(pairs, sessions[keep], cutoff)], ignore_index=True)
    sessions = (sessions.sort_values("ts_s").groupby("split", group_keys=False)
                .tail(config.features.max_requests).sort_values(["split", "request_id"]))
    return sessions.reset_index(drop=True)


def judged_requests(pairs: pa.Table, searched: pd.DataFrame, ts_s: float) -> pd.DataFrame:
    """One user-less search request (at ``ts_s``) per judged query of a split that no request of that split searched."""
    judged = pairs.filter(pc.equal(pairs.column("source"), "judgment")).select(["query", "split"]).to_pandas()
    judged = judged.drop_duplicates().sort_values(["split", "query"])
    already = set(zip(searched["query"], searched["split"]))
    judged = judged[np.array([(q, s) not in already for q, s in zip(judged["query"], judged["split"])], dtype=bool)]
    return pd.DataFrame({
        "request_id": ["judged:" + hashlib.blake2b(f"{s}:{q}".encode(), digest_size=8).hexdigest()
                       for q, s in zip(judged["query"], judged["split"])],
        "user_id": None, "ts_s": ts_s, "query": judged["query"].to_numpy(), "split": judged["split"].to_numpy(),
        "engaged_ids": [[] for _ in range(len(judged))], "engaged_grades": [[] for _ in range(len(judged))],
        "kind": "search",
    })


def relevance(query: str | None, engaged_ids: list[str], engaged_grades: list[int],
              judged: dict[str, dict[str, int]]) -> dict[str, int]:
    """Product -> grade of what answers a request: the ranker's labels and the evaluation's qrels.

    A judged search: the query's judgments (ESCI 0..3). A recommendation, or a search
    for a query nobody judged: the session's engagements (purchase 3, cart 2, click 1).
    """
    truth = judged.get(query) if query is not None else None
    return truth if truth is not None else dict(zip(engaged_ids, engaged_grades))


def judgments(run: Run) -> dict[str, dict[str, int]]:
    """query -> product -> ESCI label, over the whole query pool."""
    pairs = read_table(run, "data", "query_pairs")
    judged = pairs.filter(pc.equal(pairs.column("source"), "judgment"))
    out: dict[str, dict[str, int]] = {}
    for query, product, label in zip(judged.column("query").to_pylist(), judged.column("product_id").to_pylist(),
                                      judged.column("label").to_pylist()):
        out.setdefault(query, {})[product] = label
    return out


FEATURE_ROW_SCHEMA = pa.schema([("request_id", pa.string()), ("split", pa.string()), ("kind", pa.string()),
                                ("product_id", pa.string()), ("label", pa.int8()),
                                *((name, pa.float32()) for name in FEATURES)])
"""The features stage's rows: a candidate of a request, its label and its features."""


class RequestFeatures:
    """Ray Data callable class: the run's context is loaded once per actor, then requests become rows.

    ``queries`` are every search query of the requests and ``query_vectors`` their embeddings (a row each) by the
    encoder the rows are for (the driver's :func:`shoprank.ranker.stages.embed_queries`), so the actor loads no
    encoder.
    """

    def __init__(
        self, config: dict[str, Any], run: Run, queries: list[str], query_vectors: np.ndarray,
        new_events: pa.Table | None = None,
    ) -> None:
        self.config = Config.model_validate(config)
        self.context = load_context(self.config, run, new_events=new_events, encoder=False)
        self.judgments = judgments(run)
        self.query_vectors = dict(zip(queries, query_vectors))

    def __call__(self, requests: pd.DataFrame) -> pa.Table:
        vectors = self.query_vectors
        ids = self.context.catalogue.stats.product_ids
        # Columns grow as lists and become one frame per batch: a frame per request with its columns inserted
        # one by one was a third of a feature actor's time.
        keys: dict[str, list[Any]] = {"request_id": [], "split": [], "kind": [], "product_id": [], "label": []}
        features = []
        for request in requests.itertuples(index=False):
            query = request.query if isinstance(request.query, str) else None
            inputs = rank_inputs(self.context, request.user_id, query, vectors.get(query), float(request.ts_s))
            products = [ids[r] for r in inputs.candidates.rows]
            truth = relevance(query, request.engaged_ids, request.engaged_grades, self.judgments)
            for name, value in (("request_id", request.request_id), ("split", request.split), ("kind", request.kind)):
                keys[name].extend([value] * len(products))
            keys["product_id"].extend(products)
            keys["label"].extend(truth.get(p, 0) for p in products)
            features.append(inputs.features)
        matrix = np.concatenate(features) if features else np.zeros((0, len(FEATURES)), np.float32)
        columns = {name: pa.array(values, FEATURE_ROW_SCHEMA.field(name).type) for name, values in keys.items()}
        columns |= {name: pa.array(matrix[:, i], pa.float32()) for i, name in enumerate(FEATURES)}
        # typed here, not inferred from the batch: a batch whose feature is missing on every row (no candidate
        # ever bought) would otherwise be written as a column of type null, which no reader can merge
        return pa.table(columns, schema=FEATURE_ROW_SCHEMA)
