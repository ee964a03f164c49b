"""Readers that turn a shop's own files and the ESCI data set into exactly-typed record tables.

Everything downstream (preprocessing, training, serving) trusts the record schemas
of :mod:`shoprank.data.schema`: names, types and nullability. That trust is only
safe if every broken input is stopped *here*, at the edge, with a message a user
can act on without a debugger. So each check raises :class:`~shoprank.errors.DataError`
naming the file, the file's column and the 1-based data row (the header is not counted)
of the first bad value, and shows that value.

Every source is a :class:`Reader`: its config in, one :class:`SourceTables` out (the
three record tables and every row dropped on purpose, counted by reason), so the ingest
stage reads every source kind the same way (:func:`reader_for`). The simulated shop is
not one: it is generated straight into the run by Ray tasks, block by block
(:func:`shoprank.data.ingest.generate_shop`), and never held as one table.

One module per source or format, and what they share:

* :mod:`~shoprank.data.readers.files`: a shop's own catalogue, events and judgments;
* :mod:`~shoprank.data.readers.esci`: the Amazon Shopping Queries data set;
* :mod:`~shoprank.data.readers.derive`: event type, event id and session id, for an
  events file that lacks them;
* :mod:`~shoprank.data.readers.formats`: CSV, Parquet and JSON Lines files, local or remote;
* :mod:`~shoprank.data.readers.records` (column lookup and record tables),
  :mod:`~shoprank.data.readers.values` (each field's type checks) and
  :mod:`~shoprank.data.readers.tables` (the result, the protocol and the cross-table checks).
"""

from __future__ import annotations

from shoprank.config import SourceConfig
from shoprank.data.readers.esci import EsciReader, read_esci
from shoprank.data.readers.files import FilesReader, read_files, read_table
from shoprank.data.readers.records import Kind
from shoprank.data.readers.tables import OrphanPolicy, Reader, SourceTables, TableOrigin, validate_source

__all__ = [
    "EsciReader",
    "FilesReader",
    "Kind",
    "OrphanPolicy",
    "Reader",
    "SourceTables",
    "TableOrigin",
    "read_esci",
    "read_files",
    "read_table",
    "reader_for",
    "validate_source",
]


def reader_for(source: SourceConfig) -> Reader:
    """The reader of a source that is read (``files``, ``esci``); the simulated shop is generated instead."""
    if source.kind == "esci":
        return EsciReader(source.esci)
    if source.kind == "files":
        assert source.files is not None  # checked by the config
        return FilesReader(source.files)
    raise ValueError(f"source.kind {source.kind!r} is generated, not read")
