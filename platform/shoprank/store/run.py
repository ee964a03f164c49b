"""A run: one directory (local path or pyarrow filesystem URI) with a manifest.

Runs live under a run root that may be a local path, a ``file://`` URI or a cloud URI
(``s3://``, ``gs://``...) resolved by pyarrow, as Ray Train's ``storage_path`` is, or a
directory of any pyarrow filesystem object (a ``SubTreeFileSystem``, say). Tables go
through pyarrow and Ray Data directly; model files, which transformers, FAISS and
XGBoost read and write only on local disk, pass through :meth:`Location.local_path`
(a cached download) and :meth:`Location.local_output` (a local directory uploaded
when it is complete).

``manifest.json`` names the run's config, its config hash, the code version and,
per stage, the config hash the stage ran under, its outputs, row counts, drops,
metrics and timings. The manifest is the commit point, so a crash (a SIGKILL
included) leaves nothing that a later run would trust:

* a stage's entry is cleared before its body runs (:meth:`Run.forget_stage`) and
  written only after its outputs are complete (:meth:`Run.record_stage`);
* the body writes into a staging folder (:class:`StagedRun`), moved into place
  once the body has finished (:meth:`Run.commit_outputs`), so a killed stage
  leaves no half-written folder where its outputs belong;
* each entry records the attempt it was (a new id every time the stage runs) and
  the attempts of the stages it read, so a stage is current only while what it
  read is still what those stages wrote: an upstream stage that ran again (its
  outputs lost, even under the same identity) makes every later one run again,
  in the same invocation or in the next one after a crash.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

import shoprank
from shoprank.config import Config
from shoprank.store.location import Location


MANIFEST = "manifest.json"
STAGE_LOG = "stage_log.json"
"""Every stage attempt in order: started, done, failed or skipped (what a rerun after a crash shows)."""
STAGING = "staging"
"""Where a running stage writes its outputs (``staging/<stage>/<output>``) until they are complete. Not hidden:
readers such as pyarrow's datasets skip paths that start with a dot or an underscore."""


def code_version() -> str:
    """The package version plus the git commit when the code runs from a checkout."""
    repo = Path(shoprank.__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return shoprank.__version__
    return f"{shoprank.__version__}+g{sha}" if sha else shoprank.__version__


@dataclass
class StageRecord:
    """What a running stage reports into the manifest when it completes."""

    outputs: dict[str, str] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    drops: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """What the stage could not do with this data, and why (an empty input, a metric with no requests);
    shown in the stage log and the pipeline's summary."""


class Run(Location):
    """A run directory and its manifest."""

    def __init__(self, root: str, name: str, *, filesystem: pafs.FileSystem | None = None) -> None:
        super().__init__(root, filesystem=filesystem)
        self.name = name
        self.base = f"{self.base}/{name}"

    @classmethod
    def from_uri(cls, uri: str) -> "Run":
        """The run at ``uri`` (as :meth:`uri` wrote it, e.g. in the registry)."""
        root, _, name = uri.rstrip("/").rpartition("/")
        return cls(root or ".", name)

    @classmethod
    def for_config(cls, config: Config) -> "Run":
        """The run that ``config`` names (``run.root`` / ``run.name``)."""
        return cls(config.run.root, config.run.name)

    def manifest(self) -> dict[str, Any]:
        """The manifest, or an empty one for a new run."""
        if not self.exists(MANIFEST):
            return {"run_id": self.name, "stages": {}}
        return self.read_json(MANIFEST)

    def stage_log(self) -> list[dict[str, Any]]:
        return self.read_json(STAGE_LOG)["entries"] if self.exists(STAGE_LOG) else []

    def log_stage(self, stage: str, status: str, seconds: float | None = None, notes: list[str] | None = None) -> None:
        """Add one entry to the stage log (rewritten atomically: object stores cannot append)."""
        entry: dict[str, Any] = {"stage": stage, "status": status, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if seconds is not None:
            entry["seconds"] = round(seconds, 3)
        if notes:
            entry["notes"] = notes
        self.write_json({"entries": [*self.stage_log(), entry]}, STAGE_LOG)

    def stage_is_current(self, stage: str, config_hash: str, upstream: Sequence[str] = ()) -> bool:
        """True when ``stage`` completed under ``config_hash``, its outputs are all there, and each ``upstream``
        stage's outputs are still those it read (the same attempt: see the module docstring)."""
        stages = self.manifest().get("stages", {})
        entry = stages.get(stage)
        if not entry or entry.get("config_hash") != config_hash:
            return False
        read = entry.get("upstream_attempts", {})
        if any(read.get(up) != stages.get(up, {}).get("attempt") for up in upstream):
            return False
        return all(self.exists(*rel.split("/")) for rel in entry.get("outputs", {}).values())

    def forget_stage(self, stage: str) -> None:
        """Clear ``stage``'s manifest entry: from now until it completes again, it is not current (a crash in
        between makes the next run run it, never skip it on its old entry)."""
        manifest = self.manifest()
        if manifest.get("stages", {}).pop(stage, None) is not None:
            self.write_json(manifest, MANIFEST)

    def remove_outputs(self, outputs: Sequence[str]) -> None:
        """Delete a stage's outputs (paths relative to the run): before it runs, and when it fails."""
        for rel in outputs:
            self.remove(*rel.split("/"))

    def staged(self, stage: str, outputs: Sequence[str]) -> "StagedRun":
        """This run as ``stage``'s body sees it: ``outputs`` lead into a fresh staging folder (what a killed
        attempt left there is removed first)."""
        self.drop_staging(stage)
        return StagedRun(self, stage, outputs)

    def commit_outputs(self, staged: "StagedRun", outputs: Sequence[str]) -> None:
        """Move what ``staged``'s body wrote of ``outputs`` into place (an output it did not write stays absent),
        then drop the staging folder."""
        for rel in outputs:
            parts = rel.split("/")
            if staged.exists(*parts):
                self.remove(*parts)
                self.move(staged.path(*parts), self.path(*parts))
        self.drop_staging(staged.stage)

    def drop_staging(self, stage: str) -> None:
        """Remove ``stage``'s staging folder, and the staging folder itself once no stage has one."""
        self.remove(STAGING, stage)
        selector = pafs.FileSelector(self.path(STAGING), allow_not_found=True)
        if self.exists(STAGING) and not self.fs.get_file_info(selector):
            self.remove(STAGING)

    def record_stage(self, stage: str, config: Config, config_hash: str, record: StageRecord, seconds: float,
                     upstream: Sequence[str] = ()) -> None:
        """Write a finished stage's entry into the manifest: the commit point of its outputs. It names this
        attempt and the attempts of the ``upstream`` stages it read."""
        manifest = self.manifest()
        stages = manifest.get("stages", {})
        manifest.update(
            run_id=self.name,
            run_uri=self.uri(),
            config=config.model_dump(mode="json"),
            config_hash=config.config_hash(),
            code_version=code_version(),
        )
        manifest.setdefault("stages", {})[stage] = {
            "config_hash": config_hash,
            "attempt": uuid.uuid4().hex[:12],
            "upstream_attempts": {up: stages.get(up, {}).get("attempt") for up in upstream},
            "outputs": record.outputs,
            "rows": record.rows,
            "drops": record.drops,
            "metrics": record.metrics,
            "timings": {**record.timings, "total_s": round(seconds, 3)},
            "notes": record.notes,
            "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.write_json(manifest, MANIFEST)


class StagedRun(Run):
    """A run whose stage outputs lead into ``staging/<stage>/`` (see :meth:`Run.staged`).

    Every path a body asks for goes through :meth:`path` (``uri``, ``exists``, ``child``, ``local_output``,
    Ray Data's writers given ``uri``), so the body needs no change to write into staging, and what it reads of
    its own outputs it reads from there. Picklable: Ray tasks and actors that a body starts get the same view.
    """

    def __init__(self, run: Run, stage: str, outputs: Sequence[str]) -> None:
        self.__dict__.update(run.__dict__)
        self.stage = stage
        self.outputs = tuple(outputs)
        self.staging = Run.path(run, STAGING, stage)

    def path(self, *parts: str) -> str:
        relative = "/".join(parts)
        if any(relative == out or relative.startswith(out + "/") for out in self.outputs):
            return f"{self.staging}/{relative}"
        return super().path(*parts)
