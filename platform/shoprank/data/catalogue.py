"""The catalogue as data: product rows normalised the way every stage reads them.

Ray-free, so a serving replica that applies a product put live (the catalogue change log) normalises it with
the very function the preprocess stage maps over the catalogue.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from shoprank.data.text import normalize_text

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


def normalised_products(batch: pa.Table, labels: dict[str, int], description_chars: int) -> pa.Table:
    """Record rows of products as every stage reads them (the run's ``data/products``): normalised text, the
    category's leaf and label; a missing description, brand or category stays null, and so do its leaf and label.
    The preprocess stage maps it over the catalogue, and a serving replica over a product put live, so a live
    product is shown and embedded exactly as the next run would."""
    category = batch.column("category")
    return (
        batch.set_column(batch.schema.get_field_index("title"), "title", normalize_text(batch.column("title")))
        .set_column(
            batch.schema.get_field_index("description"),
            "description",
            normalized_or_null(batch.column("description"), max_chars=description_chars),
        )
        .set_column(batch.schema.get_field_index("brand"), "brand", normalized_or_null(batch.column("brand")))
        .append_column("leaf", normalized_or_null(leaf_of(category)))
        .append_column("category_label", pa.array([labels.get(c) for c in category.to_pylist()], pa.int32()))
    )


def normalized_or_null(values: pa.ChunkedArray | pa.Array, max_chars: int | None = None) -> pa.Array:
    """:func:`normalize_text`, keeping a missing value missing (not an empty string a stage could take for one)."""
    return pc.if_else(pc.is_null(values), pa.scalar(None, pa.string()), normalize_text(values, max_chars=max_chars))


def leaf_of(category: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The last element of a category path (``Home > Cookware > Woks`` -> ``Woks``); null without a category."""
    return pa.array([c.rsplit(">", 1)[-1] if c is not None else None for c in category.to_pylist()], pa.string())
