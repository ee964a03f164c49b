"""The preprocessing stage: records in, training data out, as a Ray Data pipeline.

Reads ``data/records`` and writes, under ``data/`` of the run:

========================  ====================================================================
table                     rows
========================  ====================================================================
``products``              normalised product text (lower case, HTML and entities removed,
                          NFKC, whitespace collapsed, description cut), ``leaf`` and
                          ``category_label``
``categories``            ``category`` path -> ``category_label`` (sorted), product counts
``product_labels``        ``product_id``, ``category``, ``category_label`` (classification)
``events``                every event with ``split``: ``train`` before the validation
                          cut-off, ``validation`` before the test cut-off, ``test`` after
                          (cut-offs are quantiles of ``ts``, so no training event is later
                          than any validation event)
``user_histories``        per user, the last ``history_length`` *training* events, oldest
                          first: ``product_ids``, ``event_types``, ``ts``
``coengagement``          product pairs from *training* sessions: ``viewed_together`` (both
                          clicked, i.e. both product pages opened) and ``bought_together``
                          (both added to cart or bought), with their session counts
``query_pairs``           (query, product, label 0..3): judgments, plus behaviour from
                          *training* search events (best engagement: purchase 3, cart 2,
                          click 1, shown but ignored 0); ``split`` by a hash of the normalised
                          query, so one query text is never in two splits; optional ``fold``
========================  ====================================================================
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from itertools import combinations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import SaveMode
from ray.data.aggregate import Count, Max
from ray.data.context import DataContext, ShuffleStrategy

from shoprank.config import Config, PreprocessConfig
from shoprank.data.ingest import RECORDS
from shoprank.data.io import PartFilenames, count_rows, read_table, write_table
from shoprank.data.schema import EVENT_STRENGTH
from shoprank.data.text import normalize_text
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


def assign_query_splits(queries: pa.Array | pa.ChunkedArray, config: PreprocessConfig) -> tuple[pa.Array, pa.Array]:
    """(split, fold) of each normalised query: a function of the query text alone.

    Hashing the text (not sampling rows) keeps every pair of one query in one split,
    in every block and every rerun.
    """
    split_of: dict[str, str] = {}
    fold_of: dict[str, int] = {}
    for query in pc.unique(queries).to_pylist():
        u = _unit_interval(query, config.seed, "split")
        split_of[query] = (
            "test" if u < config.test_fraction
            else "validation" if u < config.test_fraction + config.validation_fraction
            else "train"
        )
        fold_of[query] = int(_unit_interval(query, config.seed, "fold") * config.kfold) if config.kfold else -1
    values = queries.to_pylist()
    return (
        pa.array([split_of[q] for q in values], pa.string()),
        pa.array([fold_of[q] for q in values], pa.int16()),
    )


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


def _products_batch(batch: pa.Table, labels: dict[str, int], description_chars: int) -> pa.Table:
    category = batch.column("category")
    return (
        batch.set_column(batch.schema.get_field_index("title"), "title", normalize_text(batch.column("title")))
        .set_column(
            batch.schema.get_field_index("description"),
            "description",
            normalize_text(batch.column("description"), max_chars=description_chars),
        )
        .set_column(batch.schema.get_field_index("brand"), "brand", normalize_text(batch.column("brand")))
        .append_column("leaf", normalize_text(_leaf_of(category)))
        .append_column("category_label", pa.array([labels[c] for c in category.to_pylist()], pa.int32()))
    )


def _leaf_of(category: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The last element of a category path (``Home > Cookware > Woks`` -> ``Woks``)."""
    return pa.array([c.rsplit(">", 1)[-1] for c in category.to_pylist()], pa.string())


def _add_time_split(batch: pa.Table, validation_from: pa.Scalar, test_from: pa.Scalar) -> pa.Table:
    ts = batch.column("ts")
    split = pc.if_else(
        pc.less(ts, validation_from), "train", pc.if_else(pc.less(ts, test_from), "validation", "test")
    )
    return batch.append_column("split", split)


def _history(group: pa.Table, length: int) -> pa.Table:
    group = group.sort_by([("ts", "ascending"), ("event_id", "ascending")]).slice(max(0, group.num_rows - length))
    return pa.table(
        {
            "user_id": [group.column("user_id")[0].as_py()],
            "product_ids": pa.array([group.column("product_id").to_pylist()], pa.list_(pa.string())),
            "event_types": pa.array([group.column("event_type").to_pylist()], pa.list_(pa.string())),
            "ts": pa.array([group.column("ts").to_pylist()], pa.list_(pa.timestamp("us", tz="UTC"))),
            "num_events": pa.array([group.num_rows], pa.int32()),
        }
    )


def _session_pairs(group: pa.Table, max_products: int) -> pa.Table:
    """Unordered product pairs engaged together in one session."""
    group = group.sort_by([("ts", "ascending"), ("event_id", "ascending")])
    products = group.column("product_id").to_pylist()
    types = group.column("event_type").to_pylist()
    clicked = list(dict.fromkeys(p for p, t in zip(products, types) if t == "click"))[:max_products]
    bought = list(
        dict.fromkeys(p for p, t in zip(products, types) if t in ("add_to_cart", "purchase"))
    )[:max_products]
    rows: list[tuple[str, str, str]] = []
    for kind, items in (("viewed_together", clicked), ("bought_together", bought)):
        rows.extend((min(a, b), max(a, b), kind) for a, b in combinations(items, 2))
    return pa.table(
        {
            "product_a": pa.array([r[0] for r in rows], pa.string()),
            "product_b": pa.array([r[1] for r in rows], pa.string()),
            "kind": pa.array([r[2] for r in rows], pa.string()),
        }
    )


def _search_strength(batch: pa.Table) -> pa.Table:
    """Search events only: normalised query, product and engagement grade."""
    query = normalize_text(batch.column("query"))
    keep = pc.and_(pc.is_valid(batch.column("query")), pc.not_equal(query, ""))
    strength = pa.array([EVENT_STRENGTH[t] for t in batch.column("event_type").to_pylist()], pa.int8())
    return pa.table({"query": query, "product_id": batch.column("product_id"), "strength": strength}).filter(keep)


def _behaviour_pairs(batch: pa.Table) -> pa.Table:
    return pa.table(
        {
            "query": batch.column("query"),
            "product_id": batch.column("product_id"),
            "label": pc.cast(batch.column("max(strength)"), pa.int8()),
            "impressions": pc.cast(batch.column("count()"), pa.int32()),
        }
    )


def _split_pairs(batch: pa.Table, config: PreprocessConfig) -> pa.Table:
    split, fold = assign_query_splits(batch.column("query"), config)
    batch = batch.append_column("split", split)
    return batch.append_column("fold", fold) if config.kfold else batch


def _write(ds: ray.data.Dataset, run: Run, name: str) -> None:
    ds.write_parquet(run.uri("data", name), filename_provider=PartFilenames(), mode=SaveMode.OVERWRITE, filesystem=run.filesystem_for_ray)


def _event_cutoffs(events: ray.data.Dataset, config: PreprocessConfig) -> tuple[pa.Scalar, pa.Scalar]:
    """Validation and test cut-offs: the (1 - val - test) and (1 - test) quantiles of ``ts``."""
    ts = np.concatenate(
        [b["ts"].astype("datetime64[us]").astype(np.int64)
         for b in events.select_columns(["ts"]).iter_batches(batch_format="numpy", batch_size=1_000_000)]
    )
    if len(ts) == 0:
        raise ValueError("no events to split")
    q_val, q_test = np.quantile(
        ts, [1.0 - config.validation_fraction - config.test_fraction, 1.0 - config.test_fraction],
        method="higher",
    )
    to_scalar = lambda us: pa.scalar(int(us), pa.timestamp("us", tz="UTC"))  # noqa: E731
    return to_scalar(q_val), to_scalar(q_test)


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
    fs = run.filesystem_for_ray

    def records(name: str) -> ray.data.Dataset:
        return ray.data.read_parquet(run.uri(*RECORDS, name), filesystem=fs)

    def products() -> None:
        categories = read_table(run, *RECORDS, "products", columns=["category"]).column("category")
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
        clean = records("products").map_batches(
            _products_batch, fn_kwargs={"labels": labels, "description_chars": pre.description_chars},
            batch_format="pyarrow",
        ).materialize()
        _write(clean, run, "products")
        _write(clean.select_columns(["product_id", "category", "category_label"]), run, "product_labels")
        record.metrics["categories"] = len(vocab)

    def events() -> None:
        raw = records("events")
        validation_from, test_from = _event_cutoffs(raw, pre)
        record.metrics["validation_from"] = validation_from.as_py().isoformat()
        record.metrics["test_from"] = test_from.as_py().isoformat()
        _write(
            raw.map_batches(_add_time_split, fn_args=(validation_from, test_from), batch_format="pyarrow"),
            run, "events",
        )

    def train_events() -> ray.data.Dataset:
        return ray.data.read_parquet(run.uri("data", "events"), filesystem=fs).filter(
            expr="split == 'train'"
        )

    def histories() -> None:
        _write(
            train_events().groupby("user_id", num_partitions=pre.shuffle_partitions).map_groups(
                _history, fn_kwargs={"length": pre.history_length}, batch_format="pyarrow"
            ),
            run, "user_histories",
        )

    def coengagement() -> None:
        engaged = train_events().filter(expr="event_type != 'view'")
        pairs = engaged.groupby("session_id", num_partitions=pre.shuffle_partitions).map_groups(
            _session_pairs, fn_kwargs={"max_products": pre.max_session_pairs}, batch_format="pyarrow"
        )
        counted = pairs.groupby(["product_a", "product_b", "kind"], num_partitions=pre.shuffle_partitions).count()
        _write(counted.rename_columns({"count()": "sessions"}), run, "coengagement")

    def query_pairs() -> None:
        judged = records("judgments").map_batches(
            lambda b: pa.table(
                {
                    "query": normalize_text(b.column("query")),
                    "product_id": b.column("product_id"),
                    "label": pc.cast(b.column("label"), pa.int8()),
                    "impressions": pa.nulls(b.num_rows, pa.int32()),
                    "source": pa.array(["judgment"] * b.num_rows, pa.string()),
                }
            ),
            batch_format="pyarrow",
        )
        behaviour = (
            train_events().map_batches(_search_strength, batch_format="pyarrow")
            .groupby(["query", "product_id"], num_partitions=pre.shuffle_partitions)
            .aggregate(Max("strength"), Count())
            .map_batches(_behaviour_pairs, batch_format="pyarrow")
            .map_batches(lambda b: b.append_column("source", pa.array(["behaviour"] * b.num_rows, pa.string())),
                         batch_format="pyarrow")
        )
        combined = judged.union(behaviour).map_batches(_split_pairs, fn_args=(pre,), batch_format="pyarrow")
        _write(combined, run, "query_pairs")

    steps.run("products", products)
    steps.run("events", events)
    steps.run("user_histories", histories)
    steps.run("coengagement", coengagement)
    steps.run("query_pairs", query_pairs)
    steps.run("counts", lambda: _count(run, record))


def _count(run: Run, record: StageRecord) -> None:
    for name in OUTPUTS:
        record.rows[name] = count_rows(run, "data", name)
    for table, key in (("events", "events_split"), ("query_pairs", "query_pairs_split")):
        splits = read_table(run, "data", table, columns=["split"]).column("split")
        counts = pc.value_counts(splits)
        record.metrics[key] = dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist()))
    pairs = read_table(run, "data", "query_pairs", columns=["query", "split"])
    per_split = pairs.group_by("split").aggregate([("query", "count_distinct")])
    record.metrics["queries_split"] = dict(
        zip(per_split.column("split").to_pylist(), per_split.column("query_count_distinct").to_pylist())
    )
