"""Parquet tables inside a run: deterministic file names, row counts from metadata."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from ray.data.datasource import FilenameProvider

from shoprank.store.run import Run


class PartFilenames(FilenameProvider):
    """``part-00000.parquet``, ``part-00001.parquet``...: names from the write task's index alone.

    Ray's default names carry a random write id; these make a rerun with the same
    seed produce the same files, byte for byte.
    """

    def __init__(self) -> None:
        super().__init__(file_format="parquet")

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{task_index:05d}.parquet"


def write_table(run: Run, table: pa.Table, *parts: str) -> None:
    """Write one Arrow table as a single-part Parquet table directory of the run."""
    directory = run.path(*parts)
    run.fs.create_dir(directory, recursive=True)
    pq.write_table(table, f"{directory}/part-00000.parquet", filesystem=run.fs)


def read_table(run: Run, *parts: str, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet table directory of the run into memory (for small tables)."""
    return pads.dataset(run.path(*parts), format="parquet", filesystem=run.fs).to_table(columns=columns)


def count_rows(run: Run, *parts: str) -> int:
    """Rows of a Parquet table directory, from the files' metadata."""
    return pads.dataset(run.path(*parts), format="parquet", filesystem=run.fs).count_rows()
