"""Parquet table directories of a run read into memory with pyarrow alone, no Ray.

The ranking context (:mod:`shoprank.recsys.context`) and Serve read the run's tables
through these, so a process on the request path imports no Ray Data;
:mod:`shoprank.data.io` adds the Ray Data reads and writes beside them.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads

from shoprank.store.run import Run


def read_table(run: Run, *parts: str, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet table directory of the run into memory (for small tables)."""
    return pads.dataset(run.path(*parts), format="parquet", filesystem=run.fs).to_table(columns=columns)


def column_names(run: Run, *parts: str) -> list[str]:
    """The columns of a Parquet table directory, from the files' schema."""
    return pads.dataset(run.path(*parts), format="parquet", filesystem=run.fs).schema.names


def count_rows(run: Run, *parts: str) -> int:
    """Rows of a Parquet table directory, from the files' metadata."""
    return pads.dataset(run.path(*parts), format="parquet", filesystem=run.fs).count_rows()
