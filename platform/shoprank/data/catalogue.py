"""The catalogue as data: product rows validated as ingest validates them, and normalised the way every stage
reads them.

Ray-free, so the serving layer validates a product put (``PUT /products``, ``shoprank catalogue sync``) with the
ingest stage's own rules (:func:`validated_products`), and a serving replica that applies a put live (the catalogue
change log) normalises it with the very function the preprocess stage maps over the catalogue.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shoprank.config import TableFile
from shoprank.data.readers.formats import _py_column, read_raw
from shoprank.data.readers.records import check_unique, record_table
from shoprank.data.readers.values import Where, as_text, require_present
from shoprank.data.schema import PRODUCT_SCHEMA
from shoprank.data.text import normalize_text
from shoprank.errors import DataError

if TYPE_CHECKING:
    from shoprank.store.run import Run

CATALOGUE_SEQ = "catalogue_seq"
"""The ingest stage's manifest metric: the last catalogue change (its sequence number in the event store's change
log) folded into the run's products. Whatever serves the run follows the log from there."""


def recorded_catalogue_seq(run: Run) -> int:
    """The last catalogue change ``run``'s ingest folded in (0: none, or a run ingested before the log existed, whose
    catalogue holds no change at all): where a replica serving it starts to follow the log."""
    ingest = run.manifest().get("stages", {}).get("ingest", {})
    return int(ingest.get("metrics", {}).get(CATALOGUE_SEQ, 0))


DELETED = "deleted"
"""The optional boolean column of a change file (``shoprank catalogue sync``) that marks a row as a delete."""
_TRUE = frozenset({"true", "t", "yes", "y", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "0"})


def validated_products(records: list[dict[str, Any]], file: str, rows: np.ndarray | None = None) -> pa.Table:
    """Product records (JSON-like dicts, as a request body or a JSON Lines file holds them) as a ``PRODUCT_SCHEMA``
    table, checked by the ingest stage's rules (:func:`~shoprank.data.readers.records.record_table`: text stripped
    and blank = missing, title and price required, a finite price >= 0, attributes a map, unique ids), so a product
    put live is one the next pipeline run would ingest. An error is a :class:`~shoprank.errors.DataError` naming
    ``file``, the column and the row (``rows``: each record's row, 1-based; default its position + 1)."""
    names = list(dict.fromkeys(name for record in records for name in record))
    raw = pa.table({name: _py_column([record.get(name) for record in records]) for name in names})
    return record_table(raw, names, "products", {}, file=file, rows=rows)


def product_rows(products: pa.Table) -> list[dict[str, Any]]:
    """A ``PRODUCT_SCHEMA`` table as the record rows the catalogue change log stores (attributes as a dict)."""
    return [{**row, "attributes": dict(row["attributes"] or [])} for row in products.to_pylist()]


def products_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """The change log's record rows (attributes as a dict) as a ``PRODUCT_SCHEMA`` table, the inverse of
    :func:`product_rows`: what ingest folds in, and what a replica or the ingress normalises."""
    return pa.Table.from_pylist([{**{name: row.get(name) for name in PRODUCT_SCHEMA.names},
                                  "attributes": list((row.get("attributes") or {}).items())} for row in rows],
                                schema=PRODUCT_SCHEMA)


def read_changes(path: str, file_format: str = "auto") -> tuple[pa.Table, list[str]]:
    """A file of catalogue changes (CSV, Parquet or JSON Lines; ``shoprank catalogue sync``): its puts as a validated
    ``PRODUCT_SCHEMA`` table and the product ids it deletes, in file order.

    Each row is a product in the catalogue's schema, as the ingest stage reads a catalogue file; an optional boolean
    column ``deleted`` marks the rows that delete their product (they need only ``product_id``). The whole file is
    checked before anything is returned, and the first problem is a :class:`~shoprank.errors.DataError` naming the
    file, the column and the row: a missing id, a value of the wrong type, a ``deleted`` that is no boolean, or an id
    named twice (put twice, or put and deleted: which the file means would depend on the order)."""
    wanted = {f.name for f in PRODUCT_SCHEMA} | {DELETED}
    raw, names = read_raw(TableFile(path=path, format=file_format), wanted)
    if "product_id" not in raw.column_names:
        raise DataError(f"missing column 'product_id'; the file has columns: {', '.join(names)}", file=path,
                        column="product_id")
    ids = as_text(raw.column("product_id"), Where(path, "product_id"), "product_id")
    require_present(ids, Where(path, "product_id"), "product_id")
    check_unique(ids, Where(path, "product_id"), "product_id")
    deleted = _deleted(raw, path)
    put_rows = np.flatnonzero(~deleted)
    puts = (record_table(raw.take(put_rows), names, "products", {}, file=path, rows=put_rows + 1)
            if len(put_rows) else PRODUCT_SCHEMA.empty_table())
    return puts, [ids[int(i)].as_py() for i in np.flatnonzero(deleted)]


def _deleted(raw: pa.Table, path: str) -> np.ndarray:
    """The ``deleted`` column as booleans (missing, null or blank: a put), or a DataError naming the row of a value
    that is no boolean."""
    if DELETED not in raw.column_names:
        return np.zeros(raw.num_rows, dtype=bool)
    column = raw.column(DELETED)
    if pa.types.is_boolean(column.type):
        return np.asarray(pc.fill_null(column, False).to_numpy(zero_copy_only=False), dtype=bool)
    where = Where(path, DELETED)
    flags = []
    for index, value in enumerate(as_text(column, where, DELETED).to_pylist()):
        text = (value or "false").lower()
        if text not in _TRUE | _FALSE:
            raise where.error(f"deleted must be true or false, got {value!r}", index)
        flags.append(text in _TRUE)
    return np.array(flags, dtype=bool)


def normalised_products(batch: pa.Table, labels: dict[str, int], description_chars: int,
                        predicted: Collection[str] = ()) -> pa.Table:
    """Record rows of products as every stage reads them (the run's ``data/products``): normalised text, the
    category's leaf and label, and ``category_predicted``: whether the category is ingest's prediction
    (``predicted``: those products' ids, :mod:`shoprank.encoder.fill`) rather than the catalogue's. A missing
    description, brand or category stays null, and so do its leaf and label; a predicted category has no label
    (it is no truth to train or measure the category head on). The preprocess stage maps it over the catalogue,
    and a serving replica over a product put live, so a live product is shown and embedded exactly as the next run
    would."""
    category = batch.column("category")
    flagged = (pc.is_in(batch.column("product_id"), value_set=pa.array(sorted(predicted), pa.string()))
               if predicted else pa.array(np.zeros(batch.num_rows, dtype=bool)))
    label = [None if guessed else labels.get(c)
             for c, guessed in zip(category.to_pylist(), flagged.to_pylist())]
    return (
        batch.set_column(batch.schema.get_field_index("title"), "title", normalize_text(batch.column("title")))
        .set_column(
            batch.schema.get_field_index("description"),
            "description",
            normalized_or_null(batch.column("description"), max_chars=description_chars),
        )
        .set_column(batch.schema.get_field_index("brand"), "brand", normalized_or_null(batch.column("brand")))
        .append_column("leaf", normalized_or_null(leaf_of(category)))
        .append_column("category_label", pa.array(label, pa.int32()))
        .append_column("category_predicted", flagged)
    )


def normalized_or_null(values: pa.ChunkedArray | pa.Array, max_chars: int | None = None) -> pa.Array:
    """:func:`normalize_text`, keeping a missing value missing (not an empty string a stage could take for one)."""
    return pc.if_else(pc.is_null(values), pa.scalar(None, pa.string()), normalize_text(values, max_chars=max_chars))


def leaf_of(category: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The last element of a category path (``Home > Cookware > Woks`` -> ``Woks``); null without a category."""
    return pa.array([c.rsplit(">", 1)[-1] if c is not None else None for c in category.to_pylist()], pa.string())
