"""What every reader returns (:class:`SourceTables`, with its drops), the :class:`Reader` protocol, and the
cross-table checks every source shares.

Nothing is lost silently: rows are only ever dropped deliberately (events or judgments
naming products the catalog does not have, ESCI products without a title), and every
such drop is counted in :attr:`SourceTables.drops` and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shoprank.data.readers.records import check_unique
from shoprank.data.readers.values import AnyArray, Where, combined, first_true
from shoprank.data.schema import EVENT_SCHEMA, JUDGMENT_SCHEMA, conform
from shoprank.privacy import Pseudonyms

logger = logging.getLogger(__name__)

OrphanPolicy = Literal["drop", "error"]


@dataclass
class SourceTables:
    """The validated records of one source, ready for preprocessing.

    ``products``, ``events`` and ``judgments`` have exactly the record schemas
    (``events`` and ``judgments`` may have no rows: ESCI has no behaviour, and
    judgments are optional for user files). ``drops`` counts every row removed on
    purpose, by reason, so a run can report it and nothing disappears unseen; the
    keys ``events_unknown_product`` and ``judgments_unknown_product`` are always set.
    """

    products: pa.Table
    events: pa.Table
    judgments: pa.Table
    drops: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class TableOrigin:
    """Where a table's rows came from, so cross-table errors can name file, column and row.

    ``rows`` holds, per table row, its 1-based data row in ``file``; ``None`` means
    the table is the file in order (row ``i`` is data row ``i + 1``). Readers that
    filter rows (ESCI's locale filter) pass the surviving rows' numbers.
    """

    file: str
    product_id_column: str = "product_id"
    rows: np.ndarray | None = None


class Reader(Protocol):
    """A source the ingest stage reads: its config in, one :class:`SourceTables` out.

    Ingest calls every source through this one method, so a new source is a new module
    with a class that has it, and nothing in ingest changes. ``orphan_events`` is the
    config's ``source.orphan_events``; ``users`` are the run's pseudonyms, which a
    source whose records name shoppers applies before anything is derived from them.
    """

    def read(self, orphan_events: OrphanPolicy = "drop", users: Pseudonyms | None = None) -> SourceTables: ...


def validate_source(
    products: pa.Table,
    events: pa.Table | None = None,
    judgments: pa.Table | None = None,
    *,
    orphan_events: OrphanPolicy = "drop",
    origins: Mapping[str, TableOrigin] | None = None,
) -> SourceTables:
    """Cross-table checks every source shares, ending in a :class:`SourceTables`.

    The tables must already hold valid values (the readers check those per file);
    here they are shaped to the exact schemas, product ids are checked to be unique,
    and rows naming products the catalog lacks are handled: events are dropped and
    counted (``orphan_events="drop"``) or stopped with an error naming the file,
    column, row and id (``"error"``); judgments are always dropped and counted,
    since ESCI's judged products are not all in its catalog. ``origins`` (keyed
    ``products`` / ``events`` / ``judgments``) says where rows came from so
    errors can point into the files; without it they name the table kind.
    """
    if orphan_events not in ("drop", "error"):
        raise ValueError(f"orphan_events must be 'drop' or 'error', got {orphan_events!r}")
    origins = origins or {}

    def origin(kind: str) -> TableOrigin:
        return origins.get(kind) or TableOrigin(kind)

    products = conform(products, "products")
    events = conform(events if events is not None else EVENT_SCHEMA.empty_table(), "events")
    judgments = conform(
        judgments if judgments is not None else JUDGMENT_SCHEMA.empty_table(), "judgments"
    )
    p_origin = origin("products")
    check_unique(
        products.column("product_id"),
        Where(p_origin.file, p_origin.product_id_column, p_origin.rows),
        "product_id",
    )
    catalog = products.column("product_id")
    events, dropped_events = _handle_orphans(
        events, catalog, origin("events"), p_origin.file, "events", orphan_events
    )
    judgments, dropped_judgments = _handle_orphans(
        judgments, catalog, origin("judgments"), p_origin.file, "judgments", "drop"
    )
    drops = {
        "events_unknown_product": dropped_events,
        "judgments_unknown_product": dropped_judgments,
    }
    return SourceTables(products=products, events=events, judgments=judgments, drops=drops)


def _handle_orphans(
    table: pa.Table,
    catalog: AnyArray,
    origin: TableOrigin,
    catalog_file: str,
    what: str,
    policy: OrphanPolicy,
) -> tuple[pa.Table, int]:
    """Drop (and count, and log) or reject rows whose product_id is not in the catalog."""
    if table.num_rows == 0:
        return table, 0
    known = pc.is_in(table.column("product_id"), value_set=combined(catalog))
    missing = table.num_rows - pc.sum(known).as_py()
    if missing == 0:
        return table, 0
    if policy == "error":
        index = first_true(pc.invert(known))
        product_id = table.column("product_id")[index].as_py()
        raise Where(origin.file, origin.product_id_column, origin.rows).error(
            f"product_id {product_id!r} is not in the catalog ({catalog_file}); "
            f"{missing} {what} row(s) name unknown products. Fix the ids, or set "
            "source.orphan_events: drop to drop and count them",
            index,
        )
    orphans = pc.filter(table.column("product_id"), pc.invert(known))
    examples = pc.unique(orphans)[:5].to_pylist()
    logger.warning(
        "%s: dropped %d %s naming products not in the catalog (%s), e.g. %s",
        origin.file,
        missing,
        what,
        catalog_file,
        ", ".join(map(str, examples)),
    )
    return table.filter(known), missing
