"""What a transactions export needs: row filters counted as drops, and a catalogue derived from its events.

A shop's order-line export (one row per product of an order: invoice, product code,
title, quantity, time, unit price, customer) is behaviour and catalogue in one file,
with rows that are not shoppers' purchases mixed in. Two pieces of an
:class:`~shoprank.config.EventsFile` config read it as it is:

* ``keep`` (:func:`filter_rows`): tests on the raw columns, applied before anything is
  converted, so a cancellation's negative quantity or a fee's odd code never reaches the
  type checks. Every dropped row is counted as ``events_<drop_as>`` and logged.
* ``products: {from_events: ...}`` (:func:`catalogue_from_events`): one product per
  distinct product id of the kept rows, its title and price chosen by the rule of
  :class:`~shoprank.config.CatalogueFromEvents`; every other product field is missing.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from shoprank.config import CatalogueFromEvents, EventsFile, RowFilter
from shoprank.data.readers.records import column_index
from shoprank.data.readers.values import AnyArray, Where, as_text, numbers, prices
from shoprank.data.schema import PRODUCT_SCHEMA

logger = logging.getLogger(__name__)


def filter_rows(raw: pa.Table, names: list[str], spec: EventsFile) -> tuple[pa.Table, np.ndarray | None, dict[str, int]]:
    """``raw`` less the rows failing a ``keep`` filter, the kept rows' 1-based file rows (None: all kept, in
    order), and the drops by reason (a filter that drops nothing still has its key, 0)."""
    if not spec.keep:
        return raw, None, {}
    keep = np.ones(raw.num_rows, dtype=bool)
    drops: dict[str, int] = {}
    for rule in spec.keep:
        passes = _passes(raw, names, rule, spec.path)
        reason = f"events_{rule.drop_as}"
        drops[reason] = drops.get(reason, 0) + int((keep & ~passes).sum())
        keep &= passes
    for reason, count in drops.items():
        if count:
            logger.info("%s: dropped %d rows (%s)", spec.path, count, reason)
    return raw.filter(pa.array(keep)), np.flatnonzero(keep) + 1, drops


def _passes(raw: pa.Table, names: list[str], rule: RowFilter, file: str) -> np.ndarray:
    """Per row, whether it passes every test ``rule`` sets (a blank value fails all but ``not_matches``)."""
    where = Where(file, rule.column)
    index = column_index(raw, rule.column, where)
    if index is None:
        raise where.error(f"missing column {rule.column!r} named by the keep filter {rule.drop_as!r}; "
                          f"the file has columns: {', '.join(names) or '(none)'}")
    text = as_text(raw.column(index), where, rule.column)
    passes = np.ones(raw.num_rows, dtype=bool)
    if rule.present:
        passes &= _mask(pc.is_valid(text))
    for pattern, wanted in ((rule.matches, True), (rule.not_matches, False)):
        if pattern is not None:
            try:
                found = _mask(pc.match_substring_regex(text, pattern))
            except pa.ArrowInvalid as exc:
                raise where.error(f"the keep filter {rule.drop_as!r}'s pattern {pattern!r} cannot be used: {exc}") from None
            passes &= found if wanted else ~found
    if rule.above is not None or rule.at_most is not None:
        values = numbers(text, where, rule.column, f"a number (the keep filter {rule.drop_as!r} compares it)")
        values = np.asarray(pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
        present = ~np.isnan(values)
        with np.errstate(invalid="ignore"):
            if rule.above is not None:
                passes &= present & (values > rule.above)
            if rule.at_most is not None:
                passes &= present & (values <= rule.at_most)
    return passes


def _mask(values: AnyArray) -> np.ndarray:
    """A boolean column as a numpy mask, null as false."""
    return np.asarray(pc.fill_null(values, False).to_numpy(zero_copy_only=False), dtype=bool)


def catalogue_from_events(raw: pa.Table, names: list[str], events: pa.Table, rows: np.ndarray | None,
                          rule: CatalogueFromEvents, file: str) -> tuple[pa.Table, np.ndarray, dict[str, int]]:
    """The products of ``events`` (read from ``raw``, row for row), each product's first file row, and the
    products dropped for want of a title or a price.

    Title: the most frequent non-blank spelling, ties to the one seen latest (by event
    time, then file row). Price: the median of the non-blank prices (a negative or
    non-finite one is an error naming its row).
    """
    file_rows = rows if rows is not None else np.arange(1, raw.num_rows + 1)
    columns = {}
    for field, column in (("title", rule.title), ("price", rule.price)):
        where = Where(file, column, rows)
        index = column_index(raw, column, where)
        if index is None:
            raise where.error(f"missing column {column!r} for products.from_events.{field}; "
                              f"the file has columns: {', '.join(names) or '(none)'}")
        columns[field] = raw.column(index)
    frame = pd.DataFrame({
        "product_id": events.column("product_id").to_numpy(zero_copy_only=False),
        "title": as_text(columns["title"], Where(file, rule.title, rows), "title").to_numpy(zero_copy_only=False),
        "price": prices(columns["price"], Where(file, rule.price, rows), required=False)
        .to_numpy(zero_copy_only=False),
        "ts": pc.cast(pc.cast(events.column("ts"), pa.timestamp("us")), pa.int64()).to_numpy(zero_copy_only=False),
        "row": file_rows,
    })
    first = frame.drop_duplicates("product_id")[["product_id", "row"]]
    spellings = (frame.dropna(subset=["title"]).groupby(["product_id", "title"], sort=False)
                 .agg(count=("row", "size"), ts=("ts", "max"), row=("row", "max")).reset_index())
    titles = (spellings.sort_values(["product_id", "count", "ts", "row"], ascending=[True, False, False, False])
              .drop_duplicates("product_id").set_index("product_id")["title"])
    median = frame.dropna(subset=["price"]).groupby("product_id")["price"].median()
    products = first.assign(title=first["product_id"].map(titles), price=first["product_id"].map(median))
    drops = {"products_without_title": int(products["title"].isna().sum())}
    products = products.dropna(subset=["title"])
    drops["products_without_price"] = int(products["price"].isna().sum())
    products = products.dropna(subset=["price"])
    for reason, count in drops.items():
        if count:
            logger.warning("%s: dropped %d derived products (%s) and their events", file, count, reason)
    n = len(products)
    table = pa.Table.from_arrays([
        pa.array(products["product_id"], pa.string()),
        pa.array(products["title"], pa.string()),
        pa.nulls(n, pa.string()),
        pa.nulls(n, pa.string()),
        pa.nulls(n, pa.string()),
        pa.array(products["price"], pa.float64()),
        pa.array([[] for _ in range(n)], PRODUCT_SCHEMA.field("attributes").type),
    ], schema=PRODUCT_SCHEMA)
    return table, products["row"].to_numpy(np.int64), drops
