"""The preprocessing stage: records in, training data out, as a Ray Data pipeline.

Reads ``data/records`` and writes, under ``data/`` of the run:

========================  ====================================================================
table                     rows
========================  ====================================================================
``products``              normalised product text (lower case, HTML and entities removed,
                          NFKC, whitespace collapsed, description cut), ``leaf``,
                          ``category_label`` (none for a predicted category) and
                          ``category_predicted`` (ingest predicted the category)
``categories``            ``category`` path -> ``category_label`` (sorted), product counts
``product_labels``        ``product_id``, ``category``, ``category_label`` (classification)
``events``                every event with ``split``: ``train`` before the validation
                          cut-off, ``validation`` before the test cut-off, ``test`` after
                          (cut-offs are quantiles of ``ts``, or ``split_dates``' days, so no
                          training event is later than any validation event)
``user_histories``        per user, the last ``history_length`` *training* behaviour events
                          (no "not interested": a hide is no behaviour), oldest first:
                          ``product_ids``, ``event_types``, ``ts``
``coengagement``          product pairs from *training* sessions: ``viewed_together`` (both
                          clicked, i.e. both product pages opened) and ``bought_together``
                          (both added to cart or bought), with their session counts
``query_pairs``           (query, product, label 0..3): judgments, plus behaviour from
                          *training* search events (best engagement: purchase 3, cart 2,
                          click 1, shown but ignored or hidden 0); ``split`` by a hash of the normalised
                          query, so one query text is never in two splits
========================  ====================================================================
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable
from itertools import combinations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.context import DataContext, ShuffleStrategy
from ray.data.expressions import col

from shoprank.config import Config, PreprocessConfig
from shoprank.data.ingest import PREDICTIONS, RECORDS
from shoprank.data.io import count_rows, read_dataset, read_table, write_dataset, write_table
from shoprank.data.schema import ENGAGEMENT_TYPES, EVENT_SCHEMA, EVENT_STRENGTH, NEGATIVE_EVENT_TYPES, PRODUCT_SCHEMA
from shoprank.data.catalogue import normalised_products
from shoprank.data.text import normalize_text
from shoprank.errors import ConfigError
from shoprank.store.run import Run, StageRecord

log = logging.getLogger(__name__)

OUTPUTS = ("products", "categories", "product_labels", "events", "user_histories", "coengagement", "query_pairs")
SPLITS = ("train", "validation", "test")


def preprocess_outputs() -> list[str]:
    """Paths (relative to the run) the preprocessing stage writes."""
    return [f"data/{name}" for name in OUTPUTS]


def _unit_interval(key: str, seed: int, salt: str) -> float:
    """A stable pseudo-random number in [0, 1) from a string: same key, same number, any process."""
    digest = hashlib.blake2b(f"{seed}:{salt}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_query_splits(queries: pa.Array | pa.ChunkedArray, config: PreprocessConfig) -> pa.Array:
    """The split of each normalised query: a function of the query text alone.

    Hashing the text (not sampling rows) keeps every pair of one query in one split,
    in every block and every rerun.
    """
    split_of: dict[str, str] = {}
    for query in pc.unique(queries).to_pylist():
        u = _unit_interval(query, config.seed, "split")
        split_of[query] = (
            "test" if u < config.test_fraction
            else "validation" if u < config.test_fraction + config.validation_fraction
            else "train"
        )
    return pa.array([split_of[q] for q in queries.to_pylist()], pa.string())


class _Steps:
    """Numbered progress lines across the stage's steps (Ray Data draws bars within each)."""

    def __init__(self, total: int, record: StageRecord) -> None:
        self.total, self.done, self.record = total, 0, record

    def run(self, name: str, fn: Callable[[], None]) -> None:
        self.done += 1
        log.info("[preprocess %d/%d] %s ...", self.done, self.total, name)
        started = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - started
        self.record.timings[f"{name}_s"] = round(elapsed, 3)
        log.info("[preprocess %d/%d] %s done in %.1fs", self.done, self.total, name, elapsed)


def _add_time_split(batch: pa.Table, validation_from: pa.Scalar, test_from: pa.Scalar) -> pa.Table:
    ts = batch.column("ts")
    split = pc.if_else(
        pc.less(ts, validation_from), "train", pc.if_else(pc.less(ts, test_from), "validation", "test")
    )
    return batch.append_column("split", split)


HISTORY_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string()),
        pa.field("product_ids", pa.list_(pa.string())),
        pa.field("event_types", pa.list_(pa.string())),
        pa.field("ts", pa.list_(pa.timestamp("us", tz="UTC"))),
        pa.field("num_events", pa.int32()),
    ]
)
PAIR_SCHEMA = pa.schema(
    [pa.field("product_a", pa.string()), pa.field("product_b", pa.string()), pa.field("kind", pa.string())]
)
"""One co-engaged pair of one session, before counting."""
COENGAGEMENT_SCHEMA = PAIR_SCHEMA.append(pa.field("sessions", pa.int64()))
MISSING_FIELD_EFFECTS: dict[str, str] = {
    "category": "the encoder's category head, the category features and the category sources are off for {them}, "
                "and the diversity cap by category does not apply to {them}",
    "brand": "the brand features are missing for {them}, and the diversity cap by brand does not apply to {them}",
    "description": "the encoder reads the other fields of {them} (title, and category and brand where known)",
}
"""What each optional catalogue field's absence takes away, for the stage's note."""


def missing_field_notes(products: pa.Table) -> list[str]:
    """A note per optional field some product lacks: what the run could not use (never an invented value)."""
    notes = []
    for name, effect in MISSING_FIELD_EFFECTS.items():
        missing = products.column(name).null_count
        if missing and missing == products.num_rows:
            notes.append(f"no product has a {name}: " + effect.format(them="every product"))
        elif missing:
            notes.append(f"{missing} of {products.num_rows} products have no {name}: " + effect.format(them="them"))
    return notes


PRODUCTS_SCHEMA = (PRODUCT_SCHEMA.append(pa.field("leaf", pa.string())).append(pa.field("category_label", pa.int32()))
                   .append(pa.field("category_predicted", pa.bool_())))
SPLIT_EVENTS_SCHEMA = EVENT_SCHEMA.append(pa.field("split", pa.string()))
QUERY_PAIRS_SCHEMA = pa.schema(
    [pa.field("query", pa.string()), pa.field("product_id", pa.string()), pa.field("label", pa.int8()),
     pa.field("impressions", pa.int32()), pa.field("source", pa.string()), pa.field("split", pa.string())]
)
"""The output tables' schemas: what an empty table is written with, so every reader finds its columns."""


def predicted_categories(run: Run) -> frozenset[str]:
    """The products whose category ingest predicted (:mod:`shoprank.encoder.fill`); none for a run ingested
    before it predicted any."""
    if not run.exists(*PREDICTIONS):
        return frozenset()
    return frozenset(read_table(run, *PREDICTIONS, columns=["product_id"]).column("product_id").to_pylist())


def _runs(sorted_keys: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Offsets where each run of equal keys starts in a sorted column, then its length."""
    keys = sorted_keys.to_numpy(zero_copy_only=False)
    return np.r_[0, np.flatnonzero(keys[1:] != keys[:-1]) + 1, len(keys)] if len(keys) else np.zeros(1, int)


def _histories(block: pa.Table, length: int) -> pa.Table:
    """Each user's last ``length`` events, oldest first, for every user of a key-partitioned block.

    Vectorised over all users of the block: one sort and one ``take``, instead of a
    Python call per user (the per-group form costs ~0.5 ms a user). Behaviour only: a
    "not interested" is left out, so it neither weighs in a user's embedding nor takes
    the place of an event in the window.
    """
    block = block.filter(pc.invert(pc.is_in(block.column("event_type"), pa.array(NEGATIVE_EVENT_TYPES))))
    if block.num_rows == 0:
        return HISTORY_SCHEMA.empty_table()
    block = block.sort_by([("user_id", "ascending"), ("ts", "ascending"), ("event_id", "ascending")])
    runs = _runs(block.column("user_id"))
    starts, ends = runs[:-1], runs[1:]
    first_kept = np.maximum(starts, ends - length)
    sizes = ends - first_kept
    offsets = np.r_[0, np.cumsum(sizes)]
    rows = np.repeat(first_kept, sizes) + np.arange(offsets[-1]) - np.repeat(offsets[:-1], sizes)
    kept = block.take(pa.array(rows))
    list_offsets = pa.array(offsets, pa.int32())

    def lists(name: str) -> pa.Array:
        return pa.ListArray.from_arrays(list_offsets, kept.column(name).combine_chunks())

    return pa.Table.from_arrays(
        [
            block.column("user_id").take(pa.array(starts)),
            lists("product_id"),
            lists("event_type"),
            lists("ts"),
            pa.array(sizes, pa.int32()),
        ],
        schema=HISTORY_SCHEMA,
    )


def _session_pairs(block: pa.Table, max_products: int) -> pa.Table:
    """Unordered product pairs engaged together, for every session of a key-partitioned block.

    ``viewed_together``: both clicked (product pages opened); ``bought_together``:
    both added to cart or bought; the first ``max_products`` distinct products of
    each kind in time order, so one long session cannot dominate the counts.
    """
    block = block.sort_by([("session_id", "ascending"), ("ts", "ascending"), ("event_id", "ascending")])
    runs = _runs(block.column("session_id"))
    products = block.column("product_id").to_pylist()
    types = block.column("event_type").to_pylist()
    rows: list[tuple[str, str, str]] = []
    for start, end in zip(runs[:-1], runs[1:]):
        clicked: dict[str, None] = {}
        bought: dict[str, None] = {}
        for i in range(start, end):
            if types[i] == "click":
                clicked.setdefault(products[i])
            elif types[i] in ("add_to_cart", "purchase"):
                bought.setdefault(products[i])
        for kind, items in (("viewed_together", clicked), ("bought_together", bought)):
            chosen = list(items)[:max_products]
            rows.extend((min(a, b), max(a, b), kind) for a, b in combinations(chosen, 2))
    pairs = pa.Table.from_arrays([pa.array([r[i] for r in rows], pa.string()) for i in range(3)], schema=PAIR_SCHEMA)
    # Count within the block first (its sessions are disjoint from other blocks'), so the
    # shuffle that adds counts up across blocks moves one row per pair, not per session.
    pairs = pairs.append_column("sessions", pa.array(np.ones(pairs.num_rows, np.int64)))
    return _aggregate_block(pairs, ["product_a", "product_b", "kind"], [("sessions", "sum")])


def _aggregate_block(block: pa.Table, keys: list[str], aggregations: list[tuple[str, str]]) -> pa.Table:
    """Arrow's group-by over one block, keeping the value columns' names."""
    out = block.group_by(keys).aggregate(aggregations)
    return out.rename_columns({f"{column}_{function}": column for column, function in aggregations})


def _aggregate(
    ds: ray.data.Dataset, keys: list[str], aggregations: list[tuple[str, str]], pre: PreprocessConfig
) -> ray.data.Dataset:
    """Group by ``keys`` and aggregate, e.g. ``[("sessions", "sum")]``.

    Partitions by the first key, then aggregates each block with Arrow. Ray Data's
    own multi-key ``groupby().aggregate()`` took ~10 s for 70k rows on 2 CPUs; this
    takes well under one.
    """
    return _grouped(ds, keys[0], pre).map_batches(
        _aggregate_block, fn_args=(keys, aggregations), batch_size=None, batch_format="pyarrow"
    )


def _grouped(ds: ray.data.Dataset, key: str, pre: PreprocessConfig) -> ray.data.Dataset:
    """``ds`` partitioned so that all rows of one ``key`` value sit in one block.

    The same partitioning Ray Data's ``map_groups`` uses; the functions applied to
    each block then work on all of its groups at once.
    """
    if DataContext.get_current().shuffle_strategy == ShuffleStrategy.HASH_SHUFFLE:
        return ds.repartition(pre.shuffle_partitions, keys=[key], sort=True)
    return ds.sort(key)


SEARCH_STRENGTH: dict[str, int] = {**EVENT_STRENGTH, **dict.fromkeys(NEGATIVE_EVENT_TYPES, 0)}
"""The grade a search event gives its (query, product) pair: the funnel's (:data:`EVENT_STRENGTH`), and 0 for a
"not interested" (of the product, its brand or its category): a showing the shopper turned down, a label-0 pair as
an ignored view is, and counted as a showing (a shopper hides only what was shown)."""
SHOWN_TYPES = pa.array(["view", *NEGATIVE_EVENT_TYPES])
"""The event types that count a showing of a searched product (``impressions`` of a behaviour pair)."""


def _search_strength(batch: pa.Table) -> pa.Table:
    """Per (normalised query, product) of a batch's search events: best engagement grade, times shown."""
    query = normalize_text(batch.column("query"))
    keep = pc.and_(pc.is_valid(batch.column("query")), pc.not_equal(query, ""))
    strength = pa.array([SEARCH_STRENGTH[t] for t in batch.column("event_type").to_pylist()], pa.int8())
    shown = pc.cast(pc.is_in(batch.column("event_type"), SHOWN_TYPES), pa.int32())
    rows = pa.table(
        {"query": query, "product_id": batch.column("product_id"), "strength": strength, "shown": shown}
    ).filter(keep)
    # Combine within the block first: views dominate, so the shuffle then moves far fewer rows.
    return _aggregate_block(rows, ["query", "product_id"], [("strength", "max"), ("shown", "sum")])


def _judged_pairs(batch: pa.Table) -> pa.Table:
    return pa.table(
        {
            "query": normalize_text(batch.column("query")),
            "product_id": batch.column("product_id"),
            "label": pc.cast(batch.column("label"), pa.int8()),
            "impressions": pa.nulls(batch.num_rows, pa.int32()),
            "source": pa.array(["judgment"] * batch.num_rows, pa.string()),
        }
    )


def _behaviour_pairs(batch: pa.Table) -> pa.Table:
    """Aggregated search behaviour as pairs: best engagement is the label; times shown, the impressions."""
    return pa.table(
        {
            "query": batch.column("query"),
            "product_id": batch.column("product_id"),
            "label": pc.cast(batch.column("strength"), pa.int8()),
            "impressions": pc.cast(batch.column("shown"), pa.int32()),
            "source": pa.array(["behaviour"] * batch.num_rows, pa.string()),
        }
    )


def _split_pairs(batch: pa.Table, config: PreprocessConfig) -> pa.Table:
    return batch.append_column("split", assign_query_splits(batch.column("query"), config))


def _event_cutoffs(events: ray.data.Dataset, config: PreprocessConfig) -> tuple[pa.Scalar, pa.Scalar] | None:
    """Validation and test cut-offs: ``split_dates`` (00:00 UTC of each) where set, else the (1 - val - test) and
    (1 - test) quantiles of ``ts``; None without events. A date before every event is an error (nothing would
    train); one after every event leaves its split empty, which the stage's split sizes show."""
    ts = np.concatenate(
        [np.zeros(0, np.int64)]
        + [b["ts"].astype("datetime64[us]").astype(np.int64)
           for b in events.select_columns(["ts"]).iter_batches(batch_format="numpy", batch_size=1_000_000)]
    )
    if len(ts) == 0:
        return None
    if config.split_dates is not None:
        q_val, q_test = (np.datetime64(day, "us").astype(np.int64)
                         for day in (config.split_dates.validation, config.split_dates.test))
        if not (ts < q_val).any():
            raise ConfigError(f"preprocess.split_dates.validation is {config.split_dates.validation}, but the first "
                              f"event is of {np.datetime64(int(ts.min()), 'us')}: no event would train; choose a "
                              "later date")
    else:
        q_val, q_test = np.quantile(
            ts, [1.0 - config.validation_fraction - config.test_fraction, 1.0 - config.test_fraction],
            method="higher",
        )
    return pa.scalar(int(q_val), pa.timestamp("us", tz="UTC")), pa.scalar(int(q_test), pa.timestamp("us", tz="UTC"))


def preprocess(config: Config, run: Run, record: StageRecord) -> None:
    """Build every training table of the run; rows, split sizes and cut-offs go to ``record``."""
    pre = config.preprocess
    context = DataContext.get_current()
    previous_strategy = context.shuffle_strategy
    context.shuffle_strategy = ShuffleStrategy(pre.shuffle_strategy)
    try:
        _preprocess(run, pre, record)
    finally:
        context.shuffle_strategy = previous_strategy


def _preprocess(run: Run, pre: PreprocessConfig, record: StageRecord) -> None:
    steps = _Steps(6, record)

    def _write(ds: ray.data.Dataset, name: str, schema: pa.Schema) -> None:
        write_dataset(ds, run, "data", name, schema=schema)

    def records(name: str) -> ray.data.Dataset:
        return read_dataset(run, *RECORDS, name)

    def products() -> None:
        known = read_table(run, *RECORDS, "products", columns=["category", "brand", "description"])
        record.notes.extend(missing_field_notes(known))
        categories = known.column("category").drop_null()
        counts = pc.value_counts(categories)
        vocab = sorted(counts.field("values").to_pylist())
        labels = {c: i for i, c in enumerate(vocab)}
        count_of = dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))
        write_table(
            run,
            pa.table({"category": vocab, "category_label": list(range(len(vocab))),
                      "products": [count_of[c] for c in vocab]}),
            "data", "categories",
        )
        predicted = predicted_categories(run)
        if predicted:
            record.metrics["categories_predicted"] = len(predicted)
        clean = records("products").map_batches(
            normalised_products,
            fn_kwargs={"labels": labels, "description_chars": pre.description_chars, "predicted": predicted},
            batch_format="pyarrow",
        ).materialize()
        _write(clean, "products", PRODUCTS_SCHEMA)
        _write(clean.select_columns(["product_id", "category", "category_label"]), "product_labels",
               pa.schema([PRODUCTS_SCHEMA.field(name) for name in ("product_id", "category", "category_label")]))
        record.metrics["categories"] = len(vocab)

    def events() -> None:
        raw = records("events")
        cutoffs = _event_cutoffs(raw, pre)
        if cutoffs is None:
            record.notes.append("no behaviour events: no user histories, co-engagement or recommendation "
                                "requests; search learns from judgments alone")
            write_table(run, SPLIT_EVENTS_SCHEMA.empty_table(), "data", "events")
            return
        validation_from, test_from = cutoffs
        record.metrics["validation_from"] = validation_from.as_py().isoformat()
        record.metrics["test_from"] = test_from.as_py().isoformat()
        _write(raw.map_batches(_add_time_split, fn_args=cutoffs, batch_format="pyarrow"), "events",
               SPLIT_EVENTS_SCHEMA)

    @functools.cache
    def train_events() -> ray.data.Dataset:
        """The training events, read and filtered once, then shared by the steps that need them."""
        return read_dataset(run, "data", "events").filter(expr="split == 'train'").materialize()

    def histories() -> None:
        _write(
            _grouped(train_events(), "user_id", pre).map_batches(
                _histories, fn_kwargs={"length": pre.history_length}, batch_size=None, batch_format="pyarrow"
            ),
            "user_histories", HISTORY_SCHEMA,
        )

    def coengagement() -> None:
        engaged = train_events().filter(expr=col("event_type").is_in(sorted(ENGAGEMENT_TYPES)))
        pairs = _grouped(engaged, "session_id", pre).map_batches(
            _session_pairs, fn_kwargs={"max_products": pre.max_session_pairs}, batch_size=None,
            batch_format="pyarrow",
        )
        _write(_aggregate(pairs, ["product_a", "product_b", "kind"], [("sessions", "sum")], pre), "coengagement",
               COENGAGEMENT_SCHEMA)

    def query_pairs() -> None:
        judged = records("judgments").map_batches(_judged_pairs, batch_format="pyarrow")
        behaviour = (
            _aggregate(
                train_events().map_batches(_search_strength, batch_format="pyarrow"),
                ["query", "product_id"], [("strength", "max"), ("shown", "sum")], pre,
            ).map_batches(_behaviour_pairs, batch_format="pyarrow")
        )
        combined = judged.union(behaviour).map_batches(_split_pairs, fn_args=(pre,), batch_format="pyarrow")
        _write(combined, "query_pairs", QUERY_PAIRS_SCHEMA)

    steps.run("products", products)
    steps.run("events", events)
    steps.run("user_histories", histories)
    steps.run("coengagement", coengagement)
    steps.run("query_pairs", query_pairs)
    steps.run("counts", lambda: _count(run, record))


def _count(run: Run, record: StageRecord) -> None:
    for name in OUTPUTS:
        record.rows[name] = count_rows(run, "data", name)
    if record.rows["query_pairs"] == 0:
        record.notes.append("no judged or searched queries: the encoder learns from co-engagement and user "
                            "sequences, and search has no training or evaluation requests")
    for table, key in (("events", "events_split"), ("query_pairs", "query_pairs_split")):
        splits = read_table(run, "data", table, columns=["split"]).column("split")
        counts = pc.value_counts(splits)
        record.metrics[key] = dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))
    pairs = read_table(run, "data", "query_pairs", columns=["query", "split"])
    per_split = pairs.group_by("split").aggregate([("query", "count_distinct")])
    record.metrics["queries_split"] = dict(
        zip(per_split.column("split").to_pylist(), per_split.column("query_count_distinct").to_pylist())
    )
