"""The pipeline's stages in their one order, and the one runner that skips, resumes, times and records them.

A :class:`Stage` names its body (a function of the config, the run and the record
it fills, living in its own package and imported only when the stage runs), the paths it writes, the config it reads and
the stages before it. Its identity (:func:`stage_hash`) is derived, never listed by
hand: the hash of its own config sections (or the sub-sections it reads: ``policy.exclude``), a
version for what its code writes, and the hashes of its upstream stages. So changing
one section's setting reruns the stage that reads it and every stage after it, and
nothing before it.

:func:`run_stages` runs the list, or a prefix of it (``until``: the sweep's
preparation stops after the features) or some stages alone (``only``); every job,
the sweep, the pipeline and the benchmarks call it, never a copy of a stage. A stage
that is current (same hash, outputs all there, upstream outputs still the ones it
read) is skipped; a failed or killed one leaves none of its outputs behind and is not
current, so a rerun continues where a crash stopped and never trusts a stage that a
crash cut short (:mod:`shoprank.store.run`). Every attempt goes to the run's stage log
(``stage_log.json``); a stage counts as done only once its manifest entry is written
(:meth:`shoprank.store.run.Run.record_stage`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from shoprank.config import Config
from shoprank.data.ingest import catalogue_identity, erasure_mark, ingest_outputs
from shoprank.data.preprocess import preprocess_outputs
from shoprank.encoder.fill import text_identity
from shoprank.encoder.index import PRODUCT_EMBEDDINGS, ZERO_SHOT_PRODUCTS
from shoprank.encoder.runtime import EXPORT, STUDENT
from shoprank.encoder.text import PRETRAINED, pretrain_texts_identity
from shoprank.errors import ConfigError, ShopRankError
from shoprank.privacy import key_id, pseudonyms
from shoprank.recsys.features import FEATURE_SCHEMA_VERSION
from shoprank.recsys.types import EXCLUSION
from shoprank.store.run import Run, StageRecord

log = logging.getLogger(__name__)

Body = Callable[[Config, Run, StageRecord], None]


@dataclass(frozen=True)
class Stage:
    """One step of a run: what it does, what it writes, and what its identity covers."""

    name: str
    body: Body
    outputs: Callable[[Config], list[str]]
    """Paths relative to the run that the stage writes (removed before it runs, and on failure)."""
    sections: tuple[str, ...] = ()
    """Config sections (or sub-sections: ``policy.exclude``) the stage reads, each whole: a setting it reads
    belongs to one of them, never to a list of settings kept by hand."""
    settings: Callable[[Config], dict[str, Any]] | None = None
    """What it reads beyond the config (the users' key id, the store's last erasure) -> its current value."""
    upstream: tuple[str, ...] = ()
    """The stages whose outputs it reads; their identities are part of its own."""
    version: str = ""
    """What its code writes (a feature schema version): bumped, every run rebuilds it."""
    inputs: tuple[str, ...] = ()
    """Paths relative to the run that it reads: a stage run alone (``only``) checks they are there."""
    enabled: Callable[[Config], bool] | None = None
    """An optional stage's switch: while off, its identity is only that it is off (and its upstream), so changing
    its other settings reruns nothing; its body then writes nothing and notes why, and the stages after it do not
    count it among what they read (:meth:`reads`)."""

    def is_on(self, config: Config) -> bool:
        """Whether the stage does anything under ``config`` (a stage without a switch always does)."""
        return self.enabled is None or self.enabled(config)

    def reads(self, config: Config) -> tuple[str, ...]:
        """The upstream stages whose outputs and identities count for this one under ``config``: every one that is
        on. An optional stage switched off writes nothing to read, so it is left out: a run made before the stage
        existed, or while it was off, stays current once the stage is added or switched off again."""
        return tuple(up for up in self.upstream if BY_NAME[up].is_on(config))


def _fixed(paths: list[str]) -> Callable[[Config], list[str]]:
    return lambda config: list(paths)


def _body(path: str) -> Body:
    """The stage body ``module:function``, imported when the stage runs: a job that runs the data stages alone
    (``jobs/preprocess.py``) then imports no PyTorch, transformers or XGBoost, about 8 s of CPU here."""
    module, function = path.split(":")

    def run_body(config: Config, run: Run, record: StageRecord) -> None:
        getattr(importlib.import_module(module), function)(config, run, record)

    run_body.__qualname__ = path
    return run_body


def _steps(*paths: str) -> Body:
    """A stage body of several ``module:function`` steps run in order (:func:`_body` each): ingest reads the records
    in the data package, then predicts their missing categories with an encoder, which that package sits below."""
    steps = [_body(path) for path in paths]

    def run_steps(config: Config, run: Run, record: StageRecord) -> None:
        for step in steps:
            step(config, run, record)

    run_steps.__qualname__ = " + ".join(paths)
    return run_steps


STAGES: tuple[Stage, ...] = (
    # v2: derived session and event ids from pseudonyms and the key id recorded (the app checks it), so a run
    # ingested before ingests again
    Stage("ingest", _steps("shoprank.data.ingest:ingest", "shoprank.encoder.fill:fill_missing_categories"),
          ingest_outputs, sections=("source",),
          settings=lambda config: {"user_key": key_id(config), "erasures": erasure_mark(config),
                                   **catalogue_identity(config), **text_identity(config)},
          version="ingest-v2"),
    Stage("preprocess", _body("shoprank.data.preprocess:preprocess"), lambda config: preprocess_outputs(),
          sections=("preprocess",), upstream=("ingest",), inputs=("data/records",)),
    # optional: masked-language pre-training of the backbone on the shop's text; the encoder starts from it
    Stage("pretrain", _body("shoprank.encoder.pretrain:pretrain"), _fixed(["pretrain/ray", "/".join(PRETRAINED)]),
          sections=("pretrain",), settings=pretrain_texts_identity, upstream=("preprocess",),
          enabled=lambda config: config.pretrain.enabled, inputs=("data/products", "data/query_pairs")),
    Stage("encoder", _body("shoprank.encoder.stages:fine_tune"), _fixed(["encoder/ray", "encoder/model"]),
          sections=("encoder",), upstream=("preprocess", "pretrain"),
          inputs=("data/products", "data/query_pairs", "data/coengagement", "data/user_histories")),
    # the fine-tuned encoder's student (student.enabled; else it writes nothing), which the export judges beside it
    Stage("distil", _body("shoprank.encoder.distil:distil"), _fixed(["encoder/distil", "/".join(STUDENT)]),
          sections=("student",), upstream=("encoder",), enabled=lambda config: config.student.enabled,
          inputs=("encoder/model", "data/products", "data/query_pairs", "data/events", "data/user_histories")),
    Stage("export", _body("shoprank.encoder.export:export_encoders"), _fixed(["/".join(EXPORT)]),
          sections=("export",), upstream=("encoder", "distil"),
          inputs=("encoder/model", "data/products", "data/query_pairs", "data/events", "data/user_histories")),
    Stage("embed", _body("shoprank.encoder.stages:embed_and_index"),
          _fixed(["/".join(PRODUCT_EMBEDDINGS), "embeddings/users", "index", "/".join(ZERO_SHOT_PRODUCTS)]),
          sections=("embed",), upstream=("export",),
          inputs=("encoder/model", "/".join(EXPORT), "data/products", "data/user_histories")),
    Stage("features", _body("shoprank.ranker.stages:build_features"),
          _fixed(["ranker/features", "/".join(EXCLUSION)]),
          sections=("retrieval", "features", "policy.exclude"), upstream=("embed",),
          version=f"features-v{FEATURE_SCHEMA_VERSION}",
          inputs=("embeddings", "index", "encoder/model", "data/products", "data/events", "data/query_pairs")),
    Stage("ranker", _body("shoprank.ranker.stages:fit_ranker"), _fixed(["ranker/ray", "ranker/model"]),
          sections=("ranker",), upstream=("features",), inputs=("ranker/features",)),
    # v2: the diversity re-ranking's strength chosen on validation and recorded (evaluation/diversity.json), which
    # Serve reads: a run evaluated before has none, and evaluates again. v3: a search for a product's exact title
    # answers it first (Ranking), as Serve now does: a run evaluated before ranked those queries otherwise. v4: the
    # categorisation's top-1 and top-3 accuracy on the held-out products
    Stage("evaluate", _body("shoprank.evaluation.offline:evaluate_offline"), _fixed(["evaluation"]),
          sections=("policy.diversity",), upstream=("ranker",), version="evaluate-v4",
          inputs=("ranker/features", "ranker/model", "/".join(EXCLUSION), "embeddings", "index", "data/events",
                  "data/products", "encoder/model")),
)
"""Every stage of a run, in the order they run: the only list of them."""

STAGE_NAMES = tuple(stage.name for stage in STAGES)
BY_NAME = {stage.name: stage for stage in STAGES}


def stage_hashes(config: Config) -> dict[str, str]:
    """The identity of every stage under ``config``: own sections and settings, version, upstream hashes.

    Computed in list order, each stage once: a stage's settings may read outside the config (ingest's, the event
    store's last tombstone), so a run, a sweep or an update asks once, not once per stage downstream of it."""
    hashes: dict[str, str] = {}
    for stage in STAGES:
        off = not stage.is_on(config)
        payload = {
            "sections": "off" if off else config.section_hash(*stage.sections) if stage.sections else "",
            "settings": {} if off or not stage.settings else stage.settings(config),
            "version": stage.version,
            "upstream": {up: hashes[up] for up in stage.reads(config)},
        }
        hashes[stage.name] = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return hashes


def stage_hash(config: Config, name: str) -> str:
    """The identity of stage ``name`` under ``config`` (:func:`stage_hashes`)."""
    return stage_hashes(config)[name]


def selected(until: str | None = None, only: Sequence[str] | None = None) -> list[Stage]:
    """The stages to run: all, those up to and including ``until``, or ``only`` these (in list order)."""
    for name in [*(only or []), *([until] if until else [])]:
        if name not in BY_NAME:
            raise ConfigError(f"unknown stage {name!r}; the stages are {', '.join(STAGE_NAMES)}")
    stages = list(STAGES[: STAGE_NAMES.index(until) + 1] if until else STAGES)
    return [s for s in stages if s.name in only] if only else stages


def run_stages(config: Config, run: Run | None = None, *, until: str | None = None,
               only: Sequence[str] | None = None) -> Run:
    """Run the selected stages (see :func:`selected`) of ``config``'s run, each skipped when current; the run.

    ``run`` defaults to the one ``config`` names; pass one to put the run on a
    filesystem object rather than a path or URI (a ``SubTreeFileSystem``, say).
    """
    run = run or Run.for_config(config)
    stages = selected(until, only)
    if any(stage.name == "ingest" for stage in stages):
        pseudonyms(config)  # the users' key exists before any stage's identity is computed (shoprank.privacy)
    names = {stage.name for stage in stages}
    hashes = stage_hashes(config)
    for stage in stages:
        missing = [path for path in stage.inputs if only and not run.exists(*path.split("/"))]
        if missing:
            raise ShopRankError(f"stage {stage.name} reads {', '.join(missing)}, which {run.uri()} does not have: "
                                f"run the stages before it first (until={stage.name!r})")
        stale = [up for up in stage.reads(config) if up not in names
                 and not run.stage_is_current(up, hashes[up], BY_NAME[up].reads(config))]
        if stale:
            raise ShopRankError(f"stage {stage.name} reads what {', '.join(stale)} wrote, which is not current for this "
                                f"config in {run.uri()}: run the stages before it too (until={stage.name!r})")
        run_stage(run, config, stage.name, hashes[stage.name], stage.outputs(config), stage.body,
                  upstream=stage.reads(config))
    return run


def run_stage(run: Run, config: Config, name: str, config_hash: str, outputs: list[str], body: Body, *,
              upstream: Sequence[str] = ()) -> None:
    """Run ``body`` as stage ``name`` unless it is current.

    The one place that times a stage and records it: in the stage log (started,
    skipped, failed or done, with seconds and notes) and, once its outputs are
    complete and in place, in the manifest. Its entry is cleared first and the body
    writes into staging (:class:`shoprank.store.run.StagedRun`), so a crash at any
    point leaves the stage to run again, never a stale or half-written stage that
    looks current. It is current only while the ``upstream`` stages' outputs are the
    ones it read: one of them that ran again (its outputs lost, say) under the same
    identity may have written other outputs (training is not bit for bit
    repeatable), so this one runs again too. A stage outside :data:`STAGES` (an
    incremental ranker update) comes through here too.
    """
    if run.stage_is_current(name, config_hash, upstream):
        log.info("stage %s is current (config hash %s): skipped", name, config_hash)
        run.log_stage(name, "skipped")
        return
    log.info("stage %s: running (config hash %s)", name, config_hash)
    run.log_stage(name, "started")
    run.forget_stage(name)
    run.remove_outputs(outputs)
    staged = run.staged(name, outputs)
    record = StageRecord(outputs={rel.rsplit("/", 1)[-1]: rel for rel in outputs})
    started = time.perf_counter()
    try:
        body(config, staged, record)
        run.commit_outputs(staged, list(record.outputs.values()))
    except BaseException:
        run.drop_staging(name)
        run.remove_outputs(outputs)
        run.log_stage(name, "failed", time.perf_counter() - started)
        raise
    seconds = time.perf_counter() - started
    run.record_stage(name, config, config_hash, record, seconds, upstream)
    for note in record.notes:
        log.warning("stage %s: %s", name, note)
    log.info("stage %s done in %.1fs: %s", name, seconds, record.rows)
    run.log_stage(name, "done", seconds, record.notes)
