"""The registry: names (``A``, ``B``, ``latest``, ...) that point at runs.

Serve variants name a registry entry, so promoting a model is one registry write.
The registry is one JSON file, ``registry.json``, beside the runs under the run
root; each write replaces it atomically (a temporary file, then a rename) and
appends the move to ``history``, so a reader never sees half an entry and every
promotion can be traced.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from shoprank.errors import ShopRankError

REGISTRY_FILE = "registry.json"


class Registry:
    """Aliases -> runs, stored in ``<root>/registry.json`` (a local or mounted directory)."""

    def __init__(self, root: str | Path) -> None:
        self.path = Path(root) / REGISTRY_FILE

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"aliases": {}, "history": []}
        try:
            return json.loads(self.path.read_text())
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as handle:
            json.dump(state, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, self.path)
        return entry
