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
metrics and timings. The manifest is the commit point: a stage counts as done
only once its entry is written, after all its outputs are complete, so a crash
leaves no artifact that a later run would trust. A stage whose config hash is
unchanged is skipped; otherwise its old outputs are removed before it runs again.
"""

from __future__ import annotations

import subprocess
import time
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

    def stage_is_current(self, stage: str, config_hash: str) -> bool:
        """True when ``stage`` completed under ``config_hash`` and its outputs are all there."""
        entry = self.manifest().get("stages", {}).get(stage)
        if not entry or entry.get("config_hash") != config_hash:
            return False
        return all(self.exists(*rel.split("/")) for rel in entry.get("outputs", {}).values())

    def remove_outputs(self, outputs: list[str]) -> None:
        """Delete a stage's outputs (paths relative to the run): before it runs, and when it fails."""
        for rel in outputs:
            self.remove(*rel.split("/"))

    def record_stage(self, stage: str, config: Config, config_hash: str, record: StageRecord, seconds: float) -> None:
        """Write a finished stage's entry into the manifest: the commit point of its outputs."""
        manifest = self.manifest()
        manifest.update(
            run_id=self.name,
            run_uri=self.uri(),
            config=config.model_dump(mode="json"),
            config_hash=config.config_hash(),
            code_version=code_version(),
        )
        manifest.setdefault("stages", {})[stage] = {
            "config_hash": config_hash,
            "outputs": record.outputs,
            "rows": record.rows,
            "drops": record.drops,
            "metrics": record.metrics,
            "timings": {**record.timings, "total_s": round(seconds, 3)},
            "notes": record.notes,
            "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.write_json(manifest, MANIFEST)
