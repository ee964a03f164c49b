"""API keys and their roles: who may call which endpoint of the Serve app, and the page's logins.

Two roles: ``client`` (``/search``, ``/recommend``, ``/events``: what a shop's frontend
calls) and ``admin`` (everything a client may, plus ``/users``, ``/variants``,
``/ab/report`` and the page's simulated traffic). A request names its key in
``Authorization: Bearer <key>`` or ``X-API-Key``; none or an unknown one is a 401, a
client key on an admin endpoint a 403. ``/healthz`` needs none.

Where the app finds keys (both are read, together):

* the **key file** ``serve.api_keys`` (under ``run.root`` unless absolute):
  ``{"keys": [{"name", "role", "sha256"}]}``, each key stored only as its SHA-256 (a key
  is 32 random bytes, so a fast hash cannot be searched back; the file may sit beside
  the run on shared storage for every ingress replica to read);
* the environment variable ``SHOPRANK_API_KEYS`` of the ingress replicas,
  ``role:key[,role:key...]`` (a secret manager's injection), hashed when read.

A presented key is hashed and compared with every stored digest in constant time
(``hmac.compare_digest``, no early exit), so the answer's timing says nothing of how much
of a key matched. ``shoprank keys create`` (which ``make demo`` runs through ``shoprank
serve``) writes a client key, an admin key and the page's two logins, the plain values
only in this machine's ``secrets/client_keys.json`` (mode 0600) for the page and the
CLI, and their digests in the key file; it prints where. Rotate a key by creating a new
one and deleting the old entry from the key file, then redeploying.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shoprank.config import Config
from shoprank.errors import ConfigError
from shoprank.store.location import Location, file_under, local_state_dir

Role = Literal["client", "admin"]
ROLES: tuple[Role, ...] = ("client", "admin")
KEYS_ENV = "SHOPRANK_API_KEYS"
CLIENT_KEYS = ("secrets", "client_keys.json")
"""Under this machine's state directory of the run root: the plain keys and page logins (mode 0600)."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def allows(role: Role, needed: Role) -> bool:
    """An admin may do what a client may; a client only that."""
    return role == "admin" or role == needed


@dataclass(frozen=True)
class KeyRing:
    """(name, role, SHA-256) of every key the app accepts."""

    entries: tuple[tuple[str, Role, str], ...]

    def role_of(self, presented: str | None) -> Role | None:
        """The role of ``presented``, or None for no key or an unknown one (every digest compared, in constant
        time)."""
        if not presented:
            return None
        found: Role | None = None
        candidate = digest(presented)
        for _, role, known in self.entries:
            if hmac.compare_digest(candidate, known):
                found = role
        return found


def _key_file(config: Config) -> tuple[Location, str]:
    """(directory, file name) of ``serve.api_keys``."""
    return file_under(config.run.root, config.serve.api_keys)


def load_keyring(config: Config, environ: dict[str, str] | None = None) -> KeyRing:
    """The keys of the key file and of ``SHOPRANK_API_KEYS``; a :class:`ConfigError` naming what is wrong."""
    entries: list[tuple[str, Role, str]] = []
    directory, name = _key_file(config)
    if directory.exists(name):
        try:
            stored = json.loads(directory.read_text(name))["keys"]
            for i, key in enumerate(stored):
                if key["role"] not in ROLES or len(key["sha256"]) != 64:
                    raise ValueError(f"key {i}: role must be one of {ROLES} and sha256 a hex digest")
                entries.append((str(key.get("name", f"key-{i}")), key["role"], key["sha256"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"serve.api_keys: {directory.uri(name)} is not a key file: {exc}") from None
    for i, item in enumerate(filter(None, (environ if environ is not None else os.environ).get(KEYS_ENV, "")
                                    .split(","))):
        role, _, key = item.strip().partition(":")
        if role not in ROLES or len(key) < 16:
            raise ConfigError(f"{KEYS_ENV}: item {i + 1} must be role:key with a role of {ROLES} and a key of at "
                              "least 16 characters")
        entries.append((f"env-{i + 1}", role, digest(key)))  # type: ignore[arg-type]
    return KeyRing(tuple(entries))


def client_keys_path(config: Config) -> Path:
    return local_state_dir(config.run.root).joinpath(*CLIENT_KEYS)


def create_keys(config: Config) -> Path:
    """A client key, an admin key and the page's logins (``admin`` and ``viewer``), unless this machine has them
    already and the key file still accepts them; where the plain values are (mode 0600)."""
    path = client_keys_path(config)
    ring = load_keyring(config, environ={})
    if path.exists():
        held = json.loads(path.read_text())
        if all(ring.role_of(held.get(role)) == role for role in ROLES):
            return path
    plain = {role: secrets.token_urlsafe(32) for role in ROLES}
    logins = {"admin": secrets.token_urlsafe(12), "viewer": secrets.token_urlsafe(12)}
    directory, name = _key_file(config)
    stored = json.loads(directory.read_text(name))["keys"] if directory.exists(name) else []
    stored += [{"name": f"{role}-{digest(key)[:8]}", "role": role, "sha256": digest(key)} for role, key in plain.items()]
    directory.write_secret(json.dumps({"keys": stored}, indent=2), name)
    Location(str(path.parent)).write_secret(json.dumps({**plain, "page_logins": logins}, indent=2), path.name)
    return path


def client_keys(config: Config) -> dict[str, str]:
    """This machine's plain keys and page logins (:func:`create_keys`); a :class:`ConfigError` saying how to make
    them when there are none."""
    path = client_keys_path(config)
    if not path.exists():
        raise ConfigError(f"no API keys on this machine ({path}): create them with `shoprank keys create --config "
                          "<preset>` (make demo does)")
    return json.loads(path.read_text())
