"""The registry: names (``A``, ``B``, ``latest``, ...) that point at runs.

Serve variants name a registry entry, so promoting a model is one registry write.
The registry is one JSON file, ``registry.json``, beside the runs under the run
root (a local path or any filesystem URI a run root may be); each write replaces it
atomically (a temporary file, then a move) and appends the move to ``history``, so
a reader never sees half an entry and every promotion can be traced.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pyarrow.fs as pafs

from shoprank.errors import ShopRankError
from shoprank.store.location import Location
from shoprank.store.run import Run

REGISTRY_FILE = "registry.json"


class Registry:
    """Aliases -> runs, stored in ``<root>/registry.json``."""

    def __init__(self, root: str, *, filesystem: pafs.FileSystem | None = None) -> None:
        self.location = Location(str(root), filesystem=filesystem)
        self.path = self.location.uri(REGISTRY_FILE)

    @classmethod
    def beside(cls, run: Run) -> "Registry":
        """The registry of the run root that holds ``run``."""
        return cls(run.root, filesystem=run.filesystem)

    def _read(self) -> dict[str, Any]:
        if not self.location.exists(REGISTRY_FILE):
            return {"aliases": {}, "history": []}
        try:
            return json.loads(self.location.read_text(REGISTRY_FILE))
        except json.JSONDecodeError as exc:
            raise ShopRankError(f"{self.path}: not a registry file ({exc})") from None

    def aliases(self) -> dict[str, dict[str, Any]]:
        return self._read()["aliases"]

    def get(self, alias: str) -> dict[str, Any]:
        """The entry of ``alias``: its run directory, and what was recorded with it."""
        aliases = self.aliases()
        if alias not in aliases:
            known = ", ".join(sorted(aliases)) or "none yet"
            raise ShopRankError(f"registry {self.path}: no alias {alias!r} (known: {known})")
        return aliases[alias]

    def set(self, alias: str, run: str, **details: Any) -> dict[str, Any]:
        """Point ``alias`` at ``run`` (one atomic write)."""
        state = self._read()
        entry = {"run": str(run), **details, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        state["history"].append({"alias": alias, "from": state["aliases"].get(alias, {}).get("run"), **entry})
        state["aliases"][alias] = entry
        self.location.write_json(state, REGISTRY_FILE)
        return entry
