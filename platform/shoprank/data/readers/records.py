"""A file's raw columns to a table of exactly one record schema: column lookup and the per-file checks.

Every record field is looked up by its name or the name ``columns`` maps it to; a
missing column is an error naming the file, the column and the field, and listing the
columns the file has. Every field in :data:`~shoprank.data.schema.REQUIRED_FIELDS` must
have a column (or a default, :data:`~shoprank.data.readers.values.DEFAULTS`), and every
row a value. Optional event fields (``query``, ``position``, ``request_id``,
``variant``, ``quantity``) are filled with nulls when the file has no column for them.
Columns of the file that no record field uses are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shoprank.data.readers.values import DEFAULTS, AnyArray, Where, convert_field
from shoprank.data.schema import REQUIRED_FIELDS, SCHEMAS
from shoprank.privacy import Pseudonyms

Kind = Literal["products", "events", "judgments"]


def record_table(
    raw: pa.Table,
    file_columns: list[str],
    kind: str,
    mapping: Mapping[str, str],
    *,
    file: str,
    rows: np.ndarray | None = None,
    fixed: Mapping[str, AnyArray] | None = None,
) -> pa.Table:
    """Convert ``raw`` (columns as in the file) to the ``kind`` schema, checking every value.

    ``file_columns`` are all the file's columns (for messages; Parquet reads only
    the needed ones). ``fixed`` supplies fields a reader derives itself (ESCI's
    constant category and NaN price), taken as they are.
    """
    schema = SCHEMAS[kind]
    fixed = fixed or {}
    defaults = DEFAULTS[kind]
    arrays: list[AnyArray] = []
    for f in schema:
        if f.name in fixed:
            arrays.append(fixed[f.name])
            continue
        column = mapping.get(f.name, f.name)
        where = Where(file, column, rows)
        index = column_index(raw, column, where)
        if index is None:
            explicit = f.name in mapping
            required = f.name in REQUIRED_FIELDS[kind] and f.name not in defaults
            if explicit or required:
                how = f"mapped by columns.{f.name}" if explicit else "required"
                raise where.error(
                    f"missing column {column!r} for record field {f.name!r} ({how}); "
                    f"the file has columns: {', '.join(file_columns) or '(none)'}"
                )
            arrays.append(_default_array(f, defaults.get(f.name), raw.num_rows))
            continue
        arrays.append(convert_field(raw.column(index), f, kind, where))
    table = pa.Table.from_arrays(arrays, schema=schema)
    if kind == "products":
        check_unique(
            table.column("product_id"),
            Where(file, mapping.get("product_id", "product_id"), rows),
            "product_id",
        )
    return table


def column_index(raw: pa.Table, column: str, where: Where) -> int | None:
    """Position of ``column`` in ``raw``, None when absent; a header naming it twice is ambiguous."""
    matches = [i for i, name in enumerate(raw.column_names) if name == column]
    if len(matches) > 1:
        raise where.error(f"the header names this column {len(matches)} times")
    return matches[0] if matches else None


def _default_array(f: pa.Field, default: Any, n: int) -> pa.Array:
    if default is None:
        return pa.nulls(n, f.type)
    return pa.array([default] * n, f.type)


def check_unique(ids: AnyArray, where: Where, field_name: str) -> None:
    """Product ids key everything downstream; a duplicate would silently merge two products."""
    if len(ids) == 0 or pc.count_distinct(ids, mode="all").as_py() == len(ids):
        return
    first_seen: dict[Any, int] = {}
    for index, value in enumerate(ids.to_pylist()):
        if value in first_seen:
            raise where.error(
                f"duplicate {field_name} {value!r}; first seen at row {where.row(first_seen[value])}",
                index,
            )
        first_seen[value] = index


def pseudonymous(records: pa.Table, users: Pseudonyms | None) -> pa.Table:
    """``records`` with their user ids replaced by pseudonyms when ``users`` is given (a table without users as
    it is)."""
    return users.table(records) if users is not None else records
