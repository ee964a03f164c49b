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

import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

import shoprank
from shoprank.config import Config
from shoprank.errors import ShopRankError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STAGE_LOG = "stage_log.json"
"""Every stage attempt in order: started, done, failed or skipped (what a rerun after a crash shows)."""
CACHE_ENV = "SHOPRANK_CACHE"
"""Where downloads of remote model files go (default ``~/.cache/shoprank``)."""


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


def resolve_filesystem(root: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path inside it, URI prefix for Ray Data) of a local path or URI."""
    if "://" in root:
        fs, path = pafs.FileSystem.from_uri(root)
        scheme = root.split("://", 1)[0]
        prefix = "" if scheme == "file" else f"{scheme}://"
        return fs, path.rstrip("/"), prefix
    return pafs.LocalFileSystem(), str(Path(root).expanduser().resolve()), ""


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


class Location:
    """A directory on a pyarrow filesystem: paths, URIs, JSON files and local copies of model files."""

    def __init__(self, root: str, *, filesystem: pafs.FileSystem | None = None) -> None:
        if filesystem is not None:
            self.fs, self.base, self._prefix = filesystem, root.rstrip("/"), ""
        else:
            self.fs, self.base, self._prefix = resolve_filesystem(root)
        self.root = root
        self.filesystem = filesystem
        """The filesystem object given, if any (a URI or path alone names the others)."""

    def child(self, *parts: str) -> "Location":
        """The directory ``parts`` below this one, on the same filesystem."""
        child = Location.__new__(Location)
        child.fs, child.base, child._prefix = self.fs, self.path(*parts), self._prefix
        child.root, child.filesystem = self.uri(*parts), self.filesystem
        return child

    def path(self, *parts: str) -> str:
        """Path inside the filesystem."""
        return "/".join([self.base, *parts])

    def uri(self, *parts: str) -> str:
        """Path with its scheme, as Ray Data, Ray Train and pyarrow readers take it."""
        return self._prefix + self.path(*parts)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def filesystem_for_ray(self) -> pafs.FileSystem | None:
        """Filesystem argument for Ray Data and Ray Train; None lets Ray resolve plain paths and URIs."""
        return None if self.is_local or self._prefix else self.fs

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def remove(self, *parts: str) -> None:
        """Delete a file or directory if it exists."""
        info = self.fs.get_file_info(self.path(*parts))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(info.path)

    def read_text(self, *parts: str) -> str:
        with self.fs.open_input_stream(self.path(*parts)) as stream:
            return stream.read().decode()

    def read_json(self, *parts: str) -> dict[str, Any]:
        return json.loads(self.read_text(*parts))

    def write_text(self, text: str, *parts: str) -> None:
        """Write a file atomically: a temporary file moved into place, never half a file."""
        target = self.path(*parts)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        tmp = f"{target}.{uuid.uuid4().hex[:8]}.tmp"  # unique: concurrent writers never share one
        with self.fs.open_output_stream(tmp) as stream:
            stream.write(text.encode())
        self.fs.move(tmp, target)

    def write_json(self, payload: dict[str, Any], *parts: str) -> None:
        self.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str), *parts)

    def local_path(self, *parts: str) -> Path:
        """A file or directory as a local path, for libraries that read only local files.

        On a local filesystem, the path itself. Otherwise a download into the cache
        (``$SHOPRANK_CACHE``), keyed by every file's path, size and modification time, so
        a model written again is fetched again and an unchanged one only once per machine.
        """
        if self.is_local:
            return Path(self.path(*parts))
        source = self.path(*parts)
        info = self.fs.get_file_info(source)
        if info.type == pafs.FileType.NotFound:
            raise ShopRankError(f"{self.uri(*parts)}: not found")
        files = [info] if info.type == pafs.FileType.File else self.fs.get_file_info(
            pafs.FileSelector(source, recursive=True))
        key = repr([self.fs.type_name, source, sorted((f.path, f.size, f.mtime_ns) for f in files)])
        target = cache_root() / hashlib.sha256(key.encode()).hexdigest()[:20] / source.rsplit("/", 1)[-1]
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
        try:
            if info.type == pafs.FileType.Directory:
                (staging / target.name).mkdir()  # copy_files makes the subfolders, not the top one
            pafs.copy_files(source, str(staging / target.name), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            os.replace(staging / target.name, target)
        except OSError:
            if not target.exists():  # not a concurrent download of the same files that won the rename
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    @contextmanager
    def local_output(self, *parts: str) -> Iterator[Path]:
        """A directory to write with libraries that write only local files.

        On a local filesystem, the directory itself. Otherwise a temporary directory,
        uploaded when the body finishes without an error (nothing is uploaded otherwise).
        """
        if self.is_local:
            directory = Path(self.path(*parts))
            directory.mkdir(parents=True, exist_ok=True)
            yield directory
            return
        with tempfile.TemporaryDirectory(prefix="shoprank-output-") as tmp:
            yield Path(tmp)
            self.fs.create_dir(self.path(*parts), recursive=True)
            pafs.copy_files(tmp, self.path(*parts), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, "~/.cache/shoprank")).expanduser()


def local_state_dir(root: str) -> Path:
    """Where this machine keeps its own files for a run root (the web page's pid and log):
    the root itself on a local disk, else a cache folder named after the root."""
    location = Location(root)
    if location.is_local:
        return Path(location.path())
    return cache_root() / "state" / hashlib.sha256(location.uri().encode()).hexdigest()[:20]


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

    @contextmanager
    def stage(self, stage: str, config: Config, config_hash: str, outputs: list[str]) -> Iterator[StageRecord]:
        """Run a stage: clear its outputs first, remove them on failure, record it on success.

        ``outputs`` are paths relative to the run; the stage body fills the record's
        rows, drops and metrics, which land in the manifest with the elapsed time.
        """
        for rel in outputs:
            self.remove(*rel.split("/"))
        record = StageRecord(outputs={rel.rsplit("/", 1)[-1]: rel for rel in outputs})
        started = time.perf_counter()
        try:
            yield record
        except BaseException:
            for rel in outputs:
                self.remove(*rel.split("/"))
            raise
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
            "timings": {**record.timings, "total_s": round(time.perf_counter() - started, 3)},
            "notes": record.notes,
            "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self.write_json(manifest, MANIFEST)
        log.info("stage %s done in %.1fs: %s", stage, time.perf_counter() - started, record.rows)
