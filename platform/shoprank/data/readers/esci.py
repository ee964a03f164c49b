"""The Amazon Shopping Queries data set (ESCI): its parquet files as products and judgments.

ESCI is a fixed public format, so its columns are not mapped by config but required by
name (:data:`ESCI_EXAMPLE_COLUMNS`, :data:`ESCI_PRODUCT_COLUMNS`); the values go
through the same checks as a shop's own files, with errors naming the ESCI file, column
and row.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shoprank.config import EsciConfig
from shoprank.data.readers.formats import read_parquet_file
from shoprank.data.readers.records import record_table
from shoprank.data.readers.tables import OrphanPolicy, SourceTables, TableOrigin, validate_source
from shoprank.data.readers.values import (
    ATTRIBUTES_TYPE, AnyArray, Where, as_text, combined, first_true, require_present,
)
from shoprank.data.schema import ESCI_LABELS, EVENT_SCHEMA
from shoprank.errors import DataError
from shoprank.privacy import Pseudonyms

logger = logging.getLogger(__name__)

ESCI_EXAMPLE_COLUMNS: tuple[str, ...] = (
    "query_id",
    "query",
    "product_id",
    "product_locale",
    "esci_label",
)

ESCI_PRODUCT_COLUMNS: tuple[str, ...] = (
    "product_id",
    "product_title",
    "product_description",
    "product_bullet_point",
    "product_brand",
    "product_color",
    "product_locale",
)

def read_esci(esci: EsciConfig, orphan_events: OrphanPolicy = "drop") -> SourceTables:
    """Read the Amazon Shopping Queries (ESCI) parquet files as products and judgments.

    Mapping, and why:

    * judgments: ``query_id`` (as text), ``query``, ``product_id`` and
      ``label = ESCI_LABELS[esci_label]`` (E 3, S 2, C 1, I 0).
    * products: ``title = product_title``; ``description`` is
      ``product_description`` and ``product_bullet_point`` joined by a newline (either
      alone when the other is missing; HTML is left for preprocessing to strip);
      ``brand = product_brand`` (null when blank); ``category`` null and
      ``price = NaN`` because ESCI has neither; ``attributes`` hold ``color`` (when
      set) and ``locale``.
    * events: none; ESCI has no behaviour, so the table is empty. ``orphan_events``
      is accepted for symmetry with :func:`read_files` and has nothing to act on.
    * Rows are kept only for ``esci.locale`` unless it is ``all``. Product ids are
      unique only within a locale, so with ``all`` they become ``"{locale}:{id}"``
      in both tables.
    * A product without a title cannot be encoded; it is dropped and counted in
      ``drops["products_without_title"]`` (its judgments then count as
      ``judgments_unknown_product``).
    """
    locale = esci.locale
    ex_file, pr_file = esci.examples_path, esci.products_path
    examples, ex_names = read_parquet_file(ex_file, set(ESCI_EXAMPLE_COLUMNS))
    _require_columns(ex_names, ESCI_EXAMPLE_COLUMNS, ex_file)
    products, pr_names = read_parquet_file(pr_file, set(ESCI_PRODUCT_COLUMNS))
    _require_columns(pr_names, ESCI_PRODUCT_COLUMNS, pr_file)

    examples, ex_rows, ex_locales = _filter_locale(examples, locale, ex_file)
    products, pr_rows, pr_locales = _filter_locale(products, locale, pr_file)
    judgments = _judgments(examples, ex_file, ex_rows, ex_locales if locale == "all" else None)
    product_table, kept_rows, drops = _products(products, pr_file, pr_rows, pr_locales, prefix=locale == "all")

    source = validate_source(
        product_table,
        EVENT_SCHEMA.empty_table(),
        judgments,
        orphan_events=orphan_events,
        origins={
            "products": TableOrigin(pr_file, "product_id", kept_rows),
            "judgments": TableOrigin(ex_file, "product_id", ex_rows),
        },
    )
    source.drops.update(drops)
    return source


@dataclass(frozen=True)
class EsciReader:
    """The ESCI files (``source.kind: esci``) as a :class:`~shoprank.data.readers.tables.Reader`.

    ESCI names no shoppers (it has no events), so there is nothing for ``users`` to do.
    """

    esci: EsciConfig

    def read(self, orphan_events: OrphanPolicy = "drop", users: Pseudonyms | None = None) -> SourceTables:
        return read_esci(self.esci, orphan_events=orphan_events)


def _judgments(examples: pa.Table, ex_file: str, ex_rows: np.ndarray, id_locales: AnyArray | None) -> pa.Table:
    """The judgments of the examples file: letters to graded labels, ids prefixed by ``id_locales`` when given."""
    label_where = Where(ex_file, "esci_label", ex_rows)
    letters = as_text(examples.column("esci_label"), label_where, "esci_label")
    require_present(letters, label_where, "esci_label")
    keys = pa.array(list(ESCI_LABELS), pa.string())
    positions = pc.index_in(letters, value_set=keys)
    bad = first_true(pc.is_null(positions))
    if bad >= 0:
        raise label_where.error(
            f"esci_label must be one of {', '.join(ESCI_LABELS)}, got {letters[bad].as_py()!r}",
            bad,
        )
    labels = pc.take(pa.array(list(ESCI_LABELS.values()), pa.int8()), positions)
    ex_ids = as_text(examples.column("product_id"), Where(ex_file, "product_id", ex_rows), "product_id")
    if id_locales is not None:
        ex_ids = pc.binary_join_element_wise(id_locales, ex_ids, ":")
    raw_judgments = pa.table(
        {
            "query_id": examples.column("query_id"),
            "query": examples.column("query"),
            "product_id": ex_ids,
            "esci_label": labels,
        }
    )
    return record_table(
        raw_judgments,
        raw_judgments.column_names,
        "judgments",
        {"label": "esci_label"},
        file=ex_file,
        rows=ex_rows,
    )


def _products(
    products: pa.Table, pr_file: str, pr_rows: np.ndarray, pr_locales: AnyArray, *, prefix: bool
) -> tuple[pa.Table, np.ndarray, dict[str, int]]:
    """The products with a title as records, the file rows they came from, and the drops.

    With ``prefix`` (locale ``all``) the ids become ``"{locale}:{id}"``, unique across locales.
    """

    def text_of(name: str) -> AnyArray:
        return as_text(products.column(name), Where(pr_file, name, pr_rows), name)

    pr_ids = text_of("product_id")
    if prefix:
        pr_ids = pc.binary_join_element_wise(pr_locales, pr_ids, ":")
    titles = text_of("product_title")
    has_title = pc.is_valid(titles)
    without_title = len(titles) - pc.sum(has_title).as_py() if len(titles) else 0
    if without_title:
        examples_ids = pc.unique(pc.filter(pr_ids, pc.invert(has_title)))[:5].to_pylist()
        logger.warning(
            "%s: dropped %d products without a title, e.g. %s",
            pr_file,
            without_title,
            ", ".join(map(str, examples_ids)),
        )
    raw_products = pa.table(
        {
            "product_id": pr_ids,
            "product_title": titles,
            "product_description": _description(text_of("product_description"), text_of("product_bullet_point")),
            "product_brand": text_of("product_brand"),
        }
    )
    n = len(pr_ids)
    fixed = {
        "category": pa.nulls(n, pa.string()),
        "price": pa.array(np.full(n, np.nan), pa.float64()),
        "attributes": _esci_attributes(text_of("product_color"), pr_locales),
    }
    keep = has_title
    raw_products = raw_products.filter(keep)
    fixed = {name: pc.filter(values, keep) for name, values in fixed.items()}
    kept_rows = pr_rows[np.asarray(keep.to_numpy(zero_copy_only=False), dtype=bool)]
    product_table = record_table(
        raw_products,
        raw_products.column_names,
        "products",
        {"title": "product_title", "description": "product_description", "brand": "product_brand"},
        file=pr_file,
        rows=kept_rows,
        fixed=fixed,
    )
    return product_table, kept_rows, {"products_without_title": without_title}


def _description(description: AnyArray, bullets: AnyArray) -> AnyArray:
    """Description and bullet points joined by a newline, either alone when the other is missing, else ``""``."""
    return pc.coalesce(
        pc.binary_join_element_wise(description, bullets, "\n"),
        description,
        bullets,
        pa.scalar("", pa.string()),
    )


def _require_columns(names: list[str], required: Iterable[str], file: str) -> None:
    """ESCI's columns are fixed by the data set, not mapped: a missing one is named with what the file has."""
    for name in required:
        if name not in names:
            raise DataError(
                f"missing column {name!r}; the file has columns: {', '.join(names) or '(none)'}",
                file=file,
                column=name,
            )


def _filter_locale(
    table: pa.Table, locale: str, file: str
) -> tuple[pa.Table, np.ndarray, AnyArray]:
    """Rows of one locale (all for ``all``), with their 1-based file rows and locale values."""
    where = Where(file, "product_locale")
    locales = as_text(table.column("product_locale"), where, "product_locale")
    require_present(locales, where, "product_locale")
    rows = np.arange(1, table.num_rows + 1)
    if locale == "all":
        return table, rows, locales
    mask = pc.equal(locales, locale)
    keep = np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)
    if not keep.any():
        present = sorted(pc.unique(locales).to_pylist())
        raise where.error(
            f"no rows with product_locale {locale!r}; the file has: {', '.join(present)}"
        )
    return table.filter(mask), rows[keep], pc.filter(locales, mask)


def _esci_attributes(colors: AnyArray, locales: AnyArray) -> pa.Array:
    """``{"color": c, "locale": l}`` per product (no color key when it is missing), vectorised."""
    n = len(locales)
    has_color = np.asarray(pc.is_valid(colors).to_numpy(zero_copy_only=False), dtype=bool)
    sizes = 1 + has_color.astype(np.int32)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(sizes, out=offsets[1:])
    # Entry j takes its value from colors[k] (k < n) or locales[k - n].
    source = np.empty(offsets[-1], dtype=np.int64)
    source[offsets[:-1][has_color]] = np.nonzero(has_color)[0]
    source[offsets[1:] - 1] = n + np.arange(n)
    values = pc.take(
        pa.concat_arrays([combined(pc.cast(colors, pa.string())), combined(pc.cast(locales, pa.string()))]),
        pa.array(source),
    )
    keys = pa.array(np.where(source < n, "color", "locale"), pa.string())
    return pa.MapArray.from_arrays(pa.array(offsets), keys, values, type=ATTRIBUTES_TYPE)
