"""A directory on a local disk or any pyarrow filesystem, and where this machine caches it.

The base of :class:`shoprank.store.run.Run` and of the registry, kept apart from runs
so that the config (which reads a sweep's ``best_config.yaml`` from shared storage)
can use it without importing the run module, which imports the config.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from shoprank.errors import ShopRankError

CACHE_ENV = "SHOPRANK_CACHE"
"""Where downloads of remote model files go (default ``~/.cache/shoprank``)."""


def resolve_filesystem(root: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path inside it, URI prefix for Ray Data) of a local path or URI."""
    if "://" in root:
        fs, path = pafs.FileSystem.from_uri(root)
        scheme = root.split("://", 1)[0]
        prefix = "" if scheme == "file" else f"{scheme}://"
        return fs, path.rstrip("/"), prefix
    return pafs.LocalFileSystem(), str(Path(root).expanduser().resolve()), ""


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

    def move(self, source: str, target: str) -> None:
        """Move a file or directory (paths inside the filesystem) to ``target``, which must not exist.

        A rename where the filesystem has one (a local disk: atomic); object stores rename files only, so a
        directory there is copied, then deleted.
        """
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        if _on_local_disk(self.fs) or self.fs.get_file_info(source).type != pafs.FileType.Directory:
            self.fs.move(source, target)
            return
        pafs.copy_files(source, target, source_filesystem=self.fs, destination_filesystem=self.fs)
        self.fs.delete_dir(source)

    def read_text(self, *parts: str) -> str:
        with self.fs.open_input_stream(self.path(*parts)) as stream:
            return stream.read().decode()

    def read_json(self, *parts: str) -> dict[str, Any]:
        return json.loads(self.read_text(*parts))

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write a file atomically: a temporary file moved into place, never half a file."""
        target = self.path(*parts)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        tmp = f"{target}.{uuid.uuid4().hex[:8]}.tmp"  # unique: concurrent writers never share one
        with self.fs.open_output_stream(tmp) as stream:
            stream.write(data)
        self.fs.move(tmp, target)

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode(), *parts)

    def write_json(self, payload: dict[str, Any], *parts: str) -> None:
        self.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str), *parts)

    def write_secret(self, text: str, *parts: str) -> None:
        """Write a secret atomically; on a local disk the file is mode 0600 from its creation (never readable by
        others, not even for a moment). Elsewhere (object stores) the storage's own access control applies."""
        if not self.is_local:
            self.write_text(text, *parts)
            return
        target = Path(self.path(*parts))
        os.replace(_private_file(text, target), target)

    def create_secret(self, text: str, *parts: str) -> bool:
        """Write a secret only if the file does not exist yet; True when this call made it.

        Exclusive on a local disk: the secret is written, mode 0600, to a temporary file that is then hard-linked
        to its name, which fails if the name exists, so of several processes creating it at once exactly one wins
        and the others read the winner's file, never half of it. Object stores have no exclusive create through
        pyarrow: there the check and the write are two steps, so create such a secret from one process (the
        pipeline's driver) before starting others.
        """
        if not self.is_local:
            if self.exists(*parts):
                return False
            self.write_text(text, *parts)
            return True
        target = Path(self.path(*parts))
        tmp = _private_file(text, target)
        try:
            os.link(tmp, target)
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
        return True

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


def _private_file(text: str, target: Path) -> Path:
    """``text`` in a new file beside ``target``, mode 0600 from its creation (never readable by others, not even for
    a moment), under a unique temporary name: the caller moves or links it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as stream:
        stream.write(text)
    return tmp


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, "~/.cache/shoprank")).expanduser()


def file_under(root: str, path: str) -> tuple[Location, str]:
    """(directory, file name) of ``path``: itself when absolute or a URI, else relative to ``root`` (``run.root``)."""
    if path.startswith("/") or "://" in path:
        parent, _, name = path.rstrip("/").rpartition("/")
        return Location(parent or "/"), name
    parent, _, name = path.rpartition("/")
    location = Location(root)
    return (location.child(*parent.split("/")) if parent else location), name


def local_state_dir(root: str) -> Path:
    """Where this machine keeps its own files for a run root (the web page's pid and log):
    the root itself on a local disk, else a cache folder named after the root."""
    location = Location(root)
    if location.is_local:
        return Path(location.path())
    return cache_root() / "state" / hashlib.sha256(location.uri().encode()).hexdigest()[:20]


def _on_local_disk(fs: pafs.FileSystem) -> bool:
    """Whether ``fs`` is a local disk, also seen through sub-tree views (``SubTreeFileSystem``), which rename
    directories as the disk does; copying there would need every sub-directory made first."""
    while isinstance(fs, pafs.SubTreeFileSystem):
        fs = fs.base_fs
    return isinstance(fs, pafs.LocalFileSystem)
