"""Find raw user ids in what the platform wrote: every file's bytes, and the text inside compressed formats.

A column check ("``user_id`` holds pseudonyms") misses an id copied into another field
(a derived session id, a log line, a tokenizer's vocabulary). So the privacy tests look
for the input's raw ids as bytes in every file under the directories a run, its registry
and the event store wrote, and in the cluster's logs. Bytes alone would miss a value
inside a compressed Parquet page or Arrow IPC buffer (and a dictionary page keeps each
value once, compressed), so those files are also read with pyarrow and every string
value of every column, nested ones included, is scanned; gzip files and zip archives
(PyTorch checkpoints) are scanned decompressed too.
"""

from __future__ import annotations

import gzip
import re
import zipfile
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import ray

PARQUET_MAGIC, ARROW_MAGIC, GZIP_MAGIC, ZIP_MAGIC = b"PAR1", b"ARROW1", b"\x1f\x8b", b"PK\x03\x04"


def ray_logs() -> Path:
    """The session cluster's log folder (every Ray process and task writes there)."""
    return Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"


def raw_ids_in(roots: Iterable[Path], raw_ids: Collection[str], *texts: str) -> dict[str, set[str]]:
    """Where any of ``raw_ids`` occurs: file path (or ``text #i`` for the extra ``texts``, captured logs) -> the ids
    found there. Empty when none is anywhere."""
    pattern = re.compile(b"|".join(re.escape(i.encode()) for i in sorted(raw_ids, key=len, reverse=True)))
    found: dict[str, set[str]] = {}

    def scan(where: str, data: bytes) -> None:
        hits = {m.decode() for m in pattern.findall(data)}
        if hits:
            found.setdefault(where, set()).update(hits)

    for i, text in enumerate(texts):
        scan(f"text #{i}", text.encode())
    for root in roots:
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            data = path.read_bytes()
            scan(str(path), data)
            for inner, decoded in _decoded(path, data):
                scan(f"{path} ({inner})", decoded)
    return found


def _decoded(path: Path, data: bytes) -> Iterator[tuple[str, bytes]]:
    """The text a compressed or columnar file holds: (what part, its bytes)."""
    if data[:4] == PARQUET_MAGIC:
        yield "parquet values", _strings(pq.read_table(path))
    elif data[:6] == ARROW_MAGIC:
        with ipc.open_file(pa.BufferReader(data)) as reader:
            yield "arrow values", _strings(reader.read_all())
    elif data[:2] == GZIP_MAGIC:
        yield "gunzipped", gzip.decompress(data)
    elif data[:4] == ZIP_MAGIC:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                yield member, archive.read(member)


def _strings(table: pa.Table) -> bytes:
    """Every string and binary value of ``table`` (nested ones too), NUL-separated."""
    values: list[bytes] = []
    for column in table.columns:
        for chunk in column.chunks:
            for leaf in _leaves(chunk):
                if pa.types.is_string(leaf.type) or pa.types.is_large_string(leaf.type):
                    values += [v.encode() for v in leaf.to_pylist() if v is not None]
                elif pa.types.is_binary(leaf.type) or pa.types.is_large_binary(leaf.type):
                    values += [v for v in leaf.to_pylist() if v is not None]
    return b"\x00".join(values)


def _leaves(array: pa.Array) -> Iterator[pa.Array]:
    """The arrays of plain values inside ``array``: a dictionary's values, a struct's fields, a list's or a map's
    items (keys too)."""
    kind = array.type
    if pa.types.is_dictionary(kind):
        yield from _leaves(array.dictionary)
    elif pa.types.is_struct(kind):
        for index in range(kind.num_fields):
            yield from _leaves(array.field(index))
    elif pa.types.is_map(kind):
        yield from _leaves(array.keys)
        yield from _leaves(array.items)
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        yield from _leaves(array.flatten())
    else:
        yield array
