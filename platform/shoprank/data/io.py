"""Parquet tables inside a run: deterministic file names, row counts from metadata, and empty
tables written with their schema (never a missing folder)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import SaveMode
from ray.data.context import DataContext
from ray.data.datasource import FilenameProvider

from shoprank.store.run import Run
from shoprank.store.tables import column_names, count_rows, read_table  # noqa: F401 (the stages' one module for tables)


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


def write_dataset(dataset: ray.data.Dataset, run: Run, *parts: str, schema: pa.Schema) -> None:
    """Write a Ray dataset as a Parquet table directory of the run, replacing what was there.

    Ray Data writes no file at all for an empty dataset, and a missing folder reads as
    "this stage never ran" to everything downstream; a shop's data often has nothing for
    some table (no search log, no co-engagement), so an empty result is written as one
    empty file with ``schema``, the table's contract.
    """
    dataset.write_parquet(run.uri(*parts), filename_provider=PartFilenames(), mode=SaveMode.OVERWRITE,
                          filesystem=run.filesystem_for_ray)
    selector = pafs.FileSelector(run.path(*parts), allow_not_found=True)
    if not any(info.path.endswith(".parquet") for info in run.fs.get_file_info(selector)):
        write_table(run, schema.empty_table(), *parts)


def pool_takes_every_cpu(actors: int, cpus_per_actor: float = 1.0) -> bool:
    """Whether an actor pool of this size holds every CPU of the cluster (as one actor per core does on a laptop).

    Ray Data's read and write tasks beside such a pool would wait for a CPU that only frees when the pool
    stops, so its input is then materialised before it starts and its output before it is written.
    """
    return actors * cpus_per_actor >= ray.cluster_resources().get("CPU", 0)


def read_dataset(run: Run, *parts: str) -> ray.data.Dataset:
    """A Parquet table directory of the run as a Ray dataset: Ray Data's first Parquet reader, a block per file.

    Ray 2.60's default reader (``use_datasource_v2``) starts a pool of footer-reading
    actors, 32 by default, for every ``read_parquet`` call, and kills them after the
    listing: a Python process each, whatever the table's size. On a 2-CPU machine that
    cost 3-4 s per read (a 20,000-row read, map and write: 4 s against 0.3), and the
    preprocessing stage reads five times. The first reader samples a few footers in
    tasks and reads the rest in its read tasks. Left to itself it would also split the
    few files of a run's table into ``read_op_min_num_blocks`` (200) blocks, and a sort of
    n blocks moves n * n pieces (the demo's preprocessing: 24 -> 61 s); one block per
    file is what the stage that wrote the table chose, and what the default reader gave.
    """
    selector = pafs.FileSelector(run.path(*parts), recursive=True)
    files = sum(1 for info in run.fs.get_file_info(selector) if info.path.endswith(".parquet"))
    context = DataContext.get_current()
    before = context.use_datasource_v2
    context.use_datasource_v2 = False  # read_parquet picks its reader when called; the plan keeps it
    try:
        return ray.data.read_parquet(run.uri(*parts), filesystem=run.filesystem_for_ray,
                                     override_num_blocks=max(1, files))
    finally:
        context.use_datasource_v2 = before
