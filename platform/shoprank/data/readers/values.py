"""One column's values checked and converted to its record field's type: the type checks every reader shares.

A reader hands each record field's column here with a :class:`Where` (file, column and
the rows it came from), so the first bad value is reported with its file, column and
1-based data row whichever source it came from. Values are validated and converted with
vectorised :mod:`pyarrow.compute`; only on the error path do we fall back to Python, and
only over the failing column, to find the first bad row.

Text is kept as given apart from stripping leading/trailing whitespace; real
normalisation (case, HTML, truncation) belongs to preprocessing, which must be able to
change without re-reading inputs. A blank text value (empty after stripping, or an empty
CSV cell) counts as missing: a required field that is blank is an error, an optional one
is null.

Optional product fields (``description``, ``category``, ``brand``: nullable in the schema,
because many real catalogs lack them and a missing one does not stop any model from
working) are null when the file has no column for them or the cell is blank; never a
made-up value, so no stage mistakes "not known" for a category or brand of its own.
A field with a default (:data:`DEFAULTS`) gets it instead:

* ``attributes`` -> empty map. When present it is a column of JSON object strings
  (``{"color": "red"}``), or a map or struct column (Parquet, JSON Lines). Keys
  and values become strings (non-string values are written as JSON); null values
  are left out, so a struct with optional members becomes a map of what is set.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shoprank.data.schema import ALL_EVENT_TYPES, EVENT_SCHEMA, MAX_QUANTITY, PRODUCT_SCHEMA
from shoprank.errors import DataError

AnyArray = Union[pa.Array, pa.ChunkedArray]

DEFAULTS: dict[str, dict[str, Any]] = {
    "products": {"attributes": []},
    "events": {},
    "judgments": {},
}
"""Required record fields that may be missing from a file, and the value they get then."""

LABEL_RANGE: tuple[int, int] = (0, 3)
"""Graded relevance labels, 0 (irrelevant) .. 3 (exact), as :data:`~shoprank.data.schema.ESCI_LABELS` uses."""

EPOCH_RANGE: tuple[float, float] = (0.0, 4_102_444_800.0)
"""Numeric ``ts`` values are epoch seconds in 1970..2099; anything outside is far more
likely milliseconds or microseconds than a real date, so it is an error, not a guess."""

ATTRIBUTES_TYPE = PRODUCT_SCHEMA.field("attributes").type
_TS_TYPE = EVENT_SCHEMA.field("ts").type
_EPOCH_RE = r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?$"
# A zone offset only counts after a time of day, so the "-05" of "2026-01-05" is a day.
_OFFSET_RE = r"\d{2}:\d{2}(?::\d{2}(?:[.,]\d*)?)?\s*(?:[zZ]|[+-]\d{2}(?::?\d{2})?)$"


@dataclass(frozen=True)
class Where:
    """A column of a file being converted; builds errors that point into it."""

    file: str
    column: str | None
    rows: np.ndarray | None = None

    def row(self, index: int) -> int:
        return int(self.rows[index]) if self.rows is not None else index + 1

    def error(self, message: str, index: int | None = None) -> DataError:
        return DataError(
            message,
            file=self.file,
            column=self.column,
            row=None if index is None else self.row(index),
        )


def convert_field(arr: AnyArray, f: pa.Field, kind: str, where: Where) -> AnyArray:
    """Dispatch by record field to the converter that knows its rules."""
    name = f.name
    default = DEFAULTS[kind].get(name)
    required = not f.nullable and default is None
    if name == "attributes":
        return _attributes(arr, where)
    if name == "price":
        return prices(arr, where)
    if name == "ts":
        return _timestamp(arr, where, name)
    if name == "label":
        return _integer(arr, where, name, LABEL_RANGE, pa.int8(), required=True)
    if name == "position":
        return _integer(arr, where, name, (0, 2**31 - 1), pa.int32(), required=False)
    if name == "quantity":
        return _integer(arr, where, name, (1, MAX_QUANTITY), pa.int32(), required=False)
    text = as_text(arr, where, name)
    if required:
        require_present(text, where, name)
    elif default is not None:
        text = pc.fill_null(text, default)
    if name == "event_type":  # the funnel, and the "not interested" an event store's export carries
        allowed = pa.array(ALL_EVENT_TYPES, pa.string())
        bad = first_true(pc.invert(pc.is_in(text, value_set=allowed)))
        if bad >= 0:
            raise where.error(
                f"event_type must be one of {', '.join(ALL_EVENT_TYPES)}; got {text[bad].as_py()!r}",
                bad,
            )
    return text


def combined(arr: AnyArray) -> pa.Array:
    """One array of all chunks: value sets and buffers need one, a column read from a file may have many."""
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def first_true(mask: AnyArray) -> int:
    """Index of the first true value, or -1."""
    if len(mask) == 0:
        return -1
    return int(pc.index(pc.fill_null(mask, False), True).as_py())


def _is_textual(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or (
        hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t)
    )


def _decode(arr: AnyArray) -> AnyArray:
    """Dictionary-encoded columns (pandas categoricals) behave like their values."""
    if pa.types.is_dictionary(arr.type):
        return pc.cast(arr, arr.type.value_type)
    return arr


def as_text(arr: AnyArray, where: Where, name: str) -> AnyArray:
    """A column as stripped text, blanks as null. Numbers and booleans are written as text
    (an id stored as an integer is still an id); nested values are an error."""
    arr = _decode(arr)
    t = arr.type
    if pa.types.is_null(t):
        return pa.nulls(len(arr), pa.string())
    if not (
        _is_textual(t)
        or pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
        or pa.types.is_decimal(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
    ):
        raise where.error(f"{name} must be text, but the column holds {t}")
    arr = _cast_or_raise(arr, pa.string(), where, lambda v: f"{name} is not UTF-8 text: {v!r}")
    arr = pc.utf8_trim_whitespace(arr)
    return pc.if_else(pc.equal(arr, ""), pa.scalar(None, pa.string()), arr)


def require_present(arr: AnyArray, where: Where, name: str) -> None:
    bad = first_true(pc.is_null(arr))
    if bad >= 0:
        raise where.error(f"{name} is required but this row has no value", bad)


def _try_cast(arr: AnyArray, to: pa.DataType) -> tuple[AnyArray | None, int]:
    """Cast, or return the index of the first value that does not convert.

    The failing index is found by halving: a cast that fails on a range fails on one of
    its halves, so O(n) values are re-cast in total and no Python loop runs over them.
    """
    try:
        return pc.cast(arr, to), -1
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    lo, hi = 0, len(arr)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            pc.cast(arr.slice(lo, mid - lo), to)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            hi = mid
        else:
            lo = mid
    return None, lo


def _cast_or_raise(
    arr: AnyArray, to: pa.DataType, where: Where, message: Callable[[Any], str]
) -> AnyArray:
    result, bad = _try_cast(arr, to)
    if result is None:
        raise where.error(message(arr[bad].as_py()), bad)
    return result


def numbers(arr: AnyArray, where: Where, name: str, what: str) -> AnyArray:
    """A numeric column as float64/int64, text parsed; nulls (and NaN) stay missing."""
    arr = _decode(arr)
    t = arr.type
    if pa.types.is_null(t):
        return pa.nulls(len(arr), pa.float64())
    if _is_textual(t):
        text = as_text(arr, where, name)
        return _cast_or_raise(text, pa.float64(), where, lambda v: f"{name} must be {what}, got {v!r}")
    if pa.types.is_integer(t):
        return pc.cast(arr, pa.int64())
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        return pc.cast(arr, pa.float64())
    raise where.error(f"{name} must be {what}, but the column holds {t}")


def prices(arr: AnyArray, where: Where, *, required: bool = True) -> AnyArray:
    """Prices are finite and not negative, and a record's is required: a missing price is not zero
    (``required=False``: blanks stay null, for a catalogue derived from events that skips them)."""
    values = pc.cast(numbers(arr, where, "price", "a number"), pa.float64())
    if required:
        require_present(values, where, "price")
    bad = first_true(pc.or_(pc.invert(pc.is_finite(values)), pc.less(values, 0.0)))
    if bad >= 0:
        raise where.error(f"price must be a finite number >= 0, got {values[bad].as_py()!r}", bad)
    return values


def _integer(
    arr: AnyArray,
    where: Where,
    name: str,
    bounds: tuple[int, int],
    out: pa.DataType,
    *,
    required: bool,
) -> AnyArray:
    """Whole numbers within ``bounds``; text and integral floats (3.0, as pandas writes) accepted."""
    lo, hi = bounds
    what = f"an integer {lo}..{hi}"
    original = _decode(arr)
    if pa.types.is_boolean(original.type):
        raise where.error(f"{name} must be {what}, but the column holds booleans")
    values = numbers(original, where, name, what)
    if pa.types.is_floating(values.type):
        values = pc.if_else(pc.is_nan(values), pa.scalar(None, values.type), values)
    if required:
        require_present(values, where, name)
    if pa.types.is_floating(values.type):
        result, bad = _try_cast(values, pa.int64())
        if result is None:
            raise where.error(f"{name} must be {what}, got {original[bad].as_py()!r}", bad)
        values = result
    bad = first_true(pc.or_(pc.less(values, lo), pc.greater(values, hi)))
    if bad >= 0:
        raise where.error(f"{name} must be {what}, got {original[bad].as_py()!r}", bad)
    return pc.cast(values, out)


def _epoch(seconds: AnyArray, where: Where, name: str, shown: AnyArray) -> AnyArray:
    """Epoch seconds (int or float) to microsecond UTC timestamps."""
    lo, hi = EPOCH_RANGE
    floats = pc.cast(seconds, pa.float64())
    bad = first_true(
        pc.or_(pc.invert(pc.is_finite(floats)), pc.or_(pc.less(floats, lo), pc.greater_equal(floats, hi)))
    )
    if bad >= 0:
        raise where.error(
            f"{name} {shown[bad].as_py()!r} as epoch seconds is not in 1970..2099 "
            "(epoch values must be seconds, not milliseconds)",
            bad,
        )
    if pa.types.is_integer(seconds.type):
        micros = pc.multiply_checked(pc.cast(seconds, pa.int64()), 1_000_000)
    else:
        micros = pc.cast(pc.round(pc.multiply(floats, 1e6)), pa.int64())
    return pc.cast(pc.cast(micros, pa.timestamp("us")), _TS_TYPE)


def _timestamp(arr: AnyArray, where: Where, name: str) -> AnyArray:
    """Timestamps, ISO-8601 text (naive means UTC) or epoch seconds, as timestamp[us, UTC]."""
    arr = _decode(arr)
    t = arr.type
    cast_naive = pc.CastOptions(pa.timestamp("us"), allow_time_truncate=True)
    if pa.types.is_timestamp(t):
        require_present(arr, where, name)
        if t.tz is None:  # naive timestamps are UTC wall-clock times
            return pc.cast(pc.cast(arr, options=cast_naive), _TS_TYPE)
        return pc.cast(arr, options=pc.CastOptions(_TS_TYPE, allow_time_truncate=True))
    if pa.types.is_date(t):
        require_present(arr, where, name)
        return pc.cast(pc.cast(arr, pa.timestamp("us")), _TS_TYPE)
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        if pa.types.is_floating(t):
            arr = pc.if_else(pc.is_nan(arr), pa.scalar(None, t), arr)
        require_present(arr, where, name)
        return _epoch(arr, where, name, arr)
    if not (_is_textual(t) or pa.types.is_null(t)):
        raise where.error(f"{name} must be a timestamp, ISO-8601 text or epoch seconds, but the column holds {t}")
    text = as_text(arr, where, name)
    require_present(text, where, name)
    null_text = pa.scalar(None, pa.string())
    numeric = pc.match_substring_regex(text, _EPOCH_RE)
    aware = pc.and_(pc.invert(numeric), pc.match_substring_regex(text, _OFFSET_RE))
    naive = pc.invert(pc.or_(numeric, aware))
    message = (
        f"{name} must be an ISO-8601 date-time (e.g. 2026-01-31T12:00:00Z; no zone means UTC) "
        "or epoch seconds, got {!r}"
    )
    numbers, bad_number = _try_cast(pc.if_else(numeric, text, null_text), pa.float64())
    aware_ts, bad_aware = _try_cast(
        pc.if_else(aware, text, null_text), pa.timestamp("us", tz="UTC")
    )
    naive_ts, bad_naive = _try_cast(pc.if_else(naive, text, null_text), pa.timestamp("us"))
    failures = [b for b in (bad_number, bad_aware, bad_naive) if b >= 0]
    if failures:
        bad = min(failures)
        raise where.error(message.format(text[bad].as_py()), bad)
    assert numbers is not None and aware_ts is not None and naive_ts is not None
    if pc.any(numeric).as_py():
        from_epoch = _epoch(pc.fill_null(numbers, 0.0), where, name, text)
    else:
        from_epoch = pa.nulls(len(text), _TS_TYPE)
    from_naive = pc.cast(naive_ts, _TS_TYPE)
    return pc.if_else(numeric, from_epoch, pc.if_else(aware, aware_ts, from_naive))


def _attr_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _attr_pairs(obj: Mapping[Any, Any] | Iterable[tuple[Any, Any]]) -> list[tuple[str, str]]:
    items = obj.items() if isinstance(obj, Mapping) else obj
    return [(str(k), _attr_value(v)) for k, v in items if v is not None]


def _attributes(arr: AnyArray, where: Where) -> AnyArray:
    """Free-form product attributes as map<string, string>; null or blank means none."""
    arr = _decode(arr)
    t = arr.type
    n = len(arr)
    if pa.types.is_null(t):
        return pa.array([[] for _ in range(n)], ATTRIBUTES_TYPE)
    out: list[list[tuple[str, str]]] = []
    if _is_textual(t):
        for index, text in enumerate(as_text(arr, where, "attributes").to_pylist()):
            if text is None:
                out.append([])
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise where.error(
                    f"attributes must be a JSON object, got {text!r} ({exc.msg})", index
                ) from None
            if not isinstance(obj, dict):
                raise where.error(f"attributes must be a JSON object, got {text!r}", index)
            out.append(_attr_pairs(obj))
    elif pa.types.is_map(t) or pa.types.is_struct(t):
        for value in arr.to_pylist():
            out.append(_attr_pairs(value) if value else [])
    else:
        raise where.error(
            f"attributes must be JSON object text, a map or a struct, but the column holds {t}"
        )
    return pa.array(out, ATTRIBUTES_TYPE)
