"""Opening an input file, local or remote, as a raw Arrow table: CSV, Parquet and JSON Lines.

Raw means as the file holds it: CSV columns all as text, JSON Lines and Parquet with
their own types. Turning columns into record fields, with row-precise errors, is
:mod:`~shoprank.data.readers.records`' job; here every error names the file (and, where
the format has them, the line), and an empty file is refused.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.fs as pafs
import pyarrow.json as pjson
import pyarrow.parquet as pq

from shoprank.config import TableFile
from shoprank.errors import DataError

FORMATS: tuple[str, ...] = ("csv", "parquet", "jsonl")
"""Formats a :class:`TableFile` may name explicitly."""

EXTENSIONS: dict[str, str] = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
"""File extensions recognised when ``format`` is ``auto``."""

COMPRESSION_EXTENSIONS: tuple[str, ...] = (".gz", ".bz2", ".zst", ".lz4", ".br")
"""Compression suffixes stripped before looking at the extension (``x.csv.gz`` is CSV);
Arrow decompresses CSV and JSON Lines streams by the same suffix."""


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """Local paths and filesystem URIs (``s3://``, ``gs://``, ...) alike."""
    if "://" in path:
        try:
            return pafs.FileSystem.from_uri(path)
        except (pa.ArrowException, OSError) as exc:  # unknown scheme, bad URI
            raise DataError(f"cannot open: {exc}", file=path) from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def _format_of(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    name = path.rstrip("/").lower()
    for suffix in COMPRESSION_EXTENSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    ext = os.path.splitext(name)[1]
    if ext not in EXTENSIONS:
        raise DataError(
            f"cannot tell the format from the extension {ext or '(none)'!r}; "
            "use .csv, .parquet or .pq, .jsonl, .ndjson or .json, "
            f"or set format to one of: {', '.join(FORMATS)}",
            file=path,
        )
    return EXTENSIONS[ext]


def _stat(path: str) -> tuple[pafs.FileSystem, str, pafs.FileInfo]:
    fs, fs_path = _filesystem(path)
    try:
        info = fs.get_file_info(fs_path)
    except OSError as exc:
        raise DataError(f"cannot open: {exc}", file=path) from None
    if info.type == pafs.FileType.NotFound:
        raise DataError("file not found", file=path)
    return fs, fs_path, info


def read_raw(spec: TableFile, wanted: set[str]) -> tuple[pa.Table, list[str]]:
    """The file's table (for Parquet only the ``wanted`` columns) and all its column names."""
    fs, fs_path, info = _stat(spec.path)
    fmt = _format_of(spec.path, spec.format)
    if info.type == pafs.FileType.Directory and fmt != "parquet":
        raise DataError("is a directory; only parquet inputs may be directories", file=spec.path)
    if info.type == pafs.FileType.File and info.size == 0:
        raise DataError("file is empty (0 bytes)", file=spec.path)
    if fmt == "csv":
        table = _read_csv(fs, fs_path, spec.path)
        names = table.column_names
    elif fmt == "jsonl":
        table = _read_jsonl(fs, fs_path, spec.path)
        names = table.column_names
    else:
        table, names = _read_parquet(fs, fs_path, info, spec.path, wanted)
    if table.num_rows == 0:
        raise DataError("file is empty: it has no data rows", file=spec.path)
    return table, names


def _read_csv(fs: pafs.FileSystem, fs_path: str, path: str) -> pa.Table:
    """Every column as text, so ids keep leading zeros and we convert with row-precise errors."""
    bad_rows: list[Any] = []

    def on_invalid(row: Any) -> str:
        bad_rows.append(row)
        return "error"

    parse = pcsv.ParseOptions(newlines_in_values=True, invalid_row_handler=on_invalid)
    try:
        with fs.open_input_stream(fs_path, compression="detect") as stream:
            names = pcsv.open_csv(stream, parse_options=parse).schema.names
        convert = pcsv.ConvertOptions(
            column_types={name: pa.string() for name in names},
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
            null_values=[""],
        )
        with fs.open_input_stream(fs_path, compression="detect") as stream:
            return pcsv.read_csv(stream, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            raise DataError("file is empty (no header)", file=path) from None
        if bad_rows:
            row = bad_rows[0]
            where = f"line {row.number}: " if row.number is not None else ""
            raise DataError(
                f"cannot read as CSV: {where}expected {row.expected_columns} columns, "
                f"got {row.actual_columns}: {row.text!r}",
                file=path,
            ) from None
        raise DataError(f"cannot read as CSV: {exc}", file=path) from None
    except OSError as exc:
        raise DataError(f"cannot read: {exc}", file=path) from None


def _read_jsonl(fs: pafs.FileSystem, fs_path: str, path: str) -> pa.Table:
    """Arrow's fast reader first; a Python parse when it gives up (mixed types, a JSON array)."""
    try:
        with fs.open_input_stream(fs_path, compression="detect") as stream:
            return pjson.read_json(stream)
    except pa.ArrowInvalid:
        pass
    except OSError as exc:
        raise DataError(f"cannot read: {exc}", file=path) from None
    with fs.open_input_stream(fs_path, compression="detect") as stream:
        data = stream.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"is not UTF-8 text: {exc}", file=path) from None
    records: list[Any]
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"line {exc.lineno} is not valid JSON: {exc.msg}", file=path) from None
        if not isinstance(records, list):
            raise DataError("must hold JSON objects, one per line", file=path)
    else:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue  # as Arrow does: blank lines are not rows
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"line {lineno} is not valid JSON: {exc.msg}", file=path, row=len(records) + 1
                ) from None
    names: dict[str, None] = {}
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(
                f"each row must be a JSON object, got {type(record).__name__}",
                file=path,
                row=index + 1,
            )
        names.update(dict.fromkeys(record))
    return pa.table({name: _py_column([r.get(name) for r in records]) for name in names})


def _py_column(values: list[Any]) -> pa.Array:
    """An Arrow array of parsed JSON values; a column of mixed types becomes text to convert later."""
    try:
        return pa.array(values)
    except (pa.ArrowException, ValueError, TypeError):
        return pa.array(
            [v if v is None or isinstance(v, str) else json.dumps(v, ensure_ascii=False) for v in values],
            pa.string(),
        )


def _read_parquet(
    fs: pafs.FileSystem, fs_path: str, info: pafs.FileInfo, path: str, wanted: set[str]
) -> tuple[pa.Table, list[str]]:
    try:
        if info.type == pafs.FileType.File:
            with fs.open_input_file(fs_path) as handle:
                parquet = pq.ParquetFile(handle)
                names = parquet.schema_arrow.names
                if parquet.metadata.num_rows == 0:
                    raise DataError("file is empty: it has no data rows", file=path)
                return parquet.read(columns=[n for n in names if n in wanted]), names
        table = pq.read_table(fs_path, filesystem=fs)
        return table.select([n for n in table.column_names if n in wanted]), table.column_names
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"cannot read as Parquet: {exc}", file=path) from None


def read_parquet_file(path: str, wanted: set[str]) -> tuple[pa.Table, list[str]]:
    """A Parquet file (or directory) whose format is fixed by its source (ESCI's), with the ``wanted`` columns."""
    fs, fs_path, info = _stat(path)
    table, names = _read_parquet(fs, fs_path, info, path, wanted)
    if table.num_rows == 0:
        raise DataError("file is empty: it has no data rows", file=path)
    return table, names
