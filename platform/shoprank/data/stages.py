"""The data stages of a run (ingest, preprocess), each skipped when already current."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from shoprank.config import Config
from shoprank.data.ingest import ingest, ingest_outputs
from shoprank.data.preprocess import preprocess, preprocess_outputs
from shoprank.store.run import Run, StageRecord

log = logging.getLogger(__name__)


def run_stage(
    run: Run,
    config: Config,
    name: str,
    config_hash: str,
    outputs: list[str],
    body: Callable[[Config, Run, StageRecord], None],
) -> bool:
    """Run ``body`` as stage ``name`` unless it is current; True when it ran. Each attempt goes to the stage log."""
    if run.stage_is_current(name, config_hash):
        log.info("stage %s is current (config hash %s): skipped", name, config_hash)
        run.log_stage(name, "skipped")
        return False
    log.info("stage %s: running (config hash %s)", name, config_hash)
    run.log_stage(name, "started")
    started = time.perf_counter()
    try:
        with run.stage(name, config, config_hash, outputs) as record:
            body(config, run, record)
    except BaseException:
        run.log_stage(name, "failed", time.perf_counter() - started)
        raise
    for note in record.notes:
        log.warning("stage %s: %s", name, note)
    run.log_stage(name, "done", time.perf_counter() - started, record.notes)
    return True


def prepare_data(config: Config, run: Run | None = None) -> Run:
    """Ingest the configured source and preprocess it into the run; returns the run.

    ``run`` defaults to the one ``config`` names; pass one to put the run on a
    filesystem object rather than a path or URI (a ``SubTreeFileSystem``, say).

    Ingest depends on ``source`` only; preprocessing on ``source`` and ``preprocess``,
    so changing a split fraction re-runs preprocessing but not generation.
    """
    run = run or Run.for_config(config)
    run_stage(run, config, "ingest", config.section_hash("source"), ingest_outputs(config), ingest)
    run_stage(
        run, config, "preprocess", config.section_hash("source", "preprocess"), preprocess_outputs(), preprocess
    )
    return run
