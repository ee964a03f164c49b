"""Pseudonymous users: past the entrance, a shopper is a keyed hash of their id, never the id itself.

A user id enters the platform in two places: the pipeline's ingest stage (the shop's
event log, or the simulated shop) and the Serve app's requests. Both replace it at once
with its **pseudonym**, ``ps_`` and the first 128 bits of HMAC-SHA256(key, user id) in
hex, so the run's tables, the event store, the impressions, the exports, the logs and
the web page only ever hold pseudonyms, and the two places agree on every shopper. A
keyed hash, not a plain one: without the key nobody can hash a list of known ids (email
addresses, loyalty numbers) and look them up.

An id that already is a pseudonym (``ps_`` and 32 hex digits) is kept as it is: the web
page picks shoppers from ``/users``, which lists pseudonyms, and an export of the event
store can feed a ranker update. A shop whose own ids have exactly that form would have
them stored as they are; no other id is.

The key: ``SHOPRANK_USER_KEY`` (hex, at least 32 bytes) where a secret manager injects
it, else the file ``run.user_key`` (under ``run.root`` unless absolute), created with 32
random bytes, mode 0600, by the pipeline before its ingest stage, exclusively (of several
processes creating it at once, one writes it and all use that one). Its fingerprint
(:attr:`Pseudonyms.key_id`, which reveals nothing of the key) is part of the ingest
stage's identity and recorded in its manifest entry, so **rotating the key** (a new file
or variable) makes the next pipeline run ingest, train and evaluate again under the new
pseudonyms; deploy that run with the new key. The app never creates a key: it refuses to
start without one, or with one other than the key each served run's ingest recorded
(:func:`serving_pseudonyms`), since a request pseudonymised under another key would match
none of the run's shoppers (no personalisation, an erasure missing their rows). The event store's rows keep the old pseudonyms: export and erase them
(or let ``serve.retention_days`` age them out) when the old key is retired.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from shoprank.config import Config
from shoprank.errors import ConfigError
from shoprank.store.location import file_under
from shoprank.store.run import Run

KEY_ENV = "SHOPRANK_USER_KEY"
PREFIX = "ps_"
PSEUDONYM = re.compile(r"^ps_[0-9a-f]{32}$")


class Pseudonyms:
    """The keyed hash of user ids (see the module docstring)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ConfigError("the user pseudonym key must hold at least 32 bytes")
        self._key = key

    @property
    def key_id(self) -> str:
        """A fingerprint of the key: which key made a run's pseudonyms, without revealing it."""
        return hmac.new(self._key, b"shoprank key id", hashlib.sha256).hexdigest()[:16]

    def of(self, user_id: str) -> str:
        """``user_id``'s pseudonym (an id that already is one is kept)."""
        if PSEUDONYM.match(user_id):
            return user_id
        return PREFIX + hmac.new(self._key, user_id.encode(), hashlib.sha256).hexdigest()[:32]

    def column(self, user_ids: pa.Array | pa.ChunkedArray) -> pa.Array:
        """Every id of a column replaced by its pseudonym, each distinct id hashed once (nulls stay null)."""
        encoded = pc.dictionary_encode(pa.chunked_array([user_ids]) if isinstance(user_ids, pa.Array)
                                       else user_ids).combine_chunks()
        hashed = pa.array([self.of(u) for u in encoded.dictionary.to_pylist()], pa.string())
        return pc.take(hashed, encoded.indices)

    def table(self, table: pa.Table, column: str = "user_id") -> pa.Table:
        """``table`` with ``column`` pseudonymous (a table without it is returned as it is)."""
        if column not in table.column_names:
            return table
        return table.set_column(table.column_names.index(column), table.schema.field(column),
                                self.column(table.column(column)))


_FOUND: dict[tuple[str, str, str | None], Pseudonyms] = {}
"""Keys read once per process (a remote run root is read once, not at every stage hash)."""


def _from_text(text: str, where: str) -> Pseudonyms:
    try:
        return Pseudonyms(bytes.fromhex(text.strip()))
    except ValueError:
        raise ConfigError(f"{where} must hold the user pseudonym key in hex (64 hex digits or more)") from None


def find_pseudonyms(config: Config) -> Pseudonyms | None:
    """The key of ``SHOPRANK_USER_KEY``, else of the file ``run.user_key`` if it exists (None: not made yet)."""
    from_env = os.environ.get(KEY_ENV) or None
    cache_key = (config.run.root, config.run.user_key, from_env)
    if cache_key not in _FOUND:
        if from_env:
            _FOUND[cache_key] = _from_text(from_env, KEY_ENV)
        else:
            directory, name = file_under(config.run.root, config.run.user_key)
            if not directory.exists(name):
                return None
            _FOUND[cache_key] = _from_text(directory.read_text(name), f"run.user_key ({directory.uri(name)})")
    return _FOUND[cache_key]


def pseudonyms(config: Config) -> Pseudonyms:
    """The run root's pseudonyms (:func:`find_pseudonyms`), the key file created (32 random bytes, mode 0600) if
    there is none yet: exclusively, then read back, so concurrent creators all use the one that was written."""
    found = find_pseudonyms(config)
    if found is None:
        directory, name = file_under(config.run.root, config.run.user_key)
        directory.create_secret(secrets.token_hex(32), name)
        found = find_pseudonyms(config)
        assert found is not None
    return found


INGEST_KEY_ID = "user_key_id"
"""The ingest stage's manifest metric naming the key its pseudonyms were made with (:attr:`Pseudonyms.key_id`)."""


def recorded_key_id(run: Run) -> str | None:
    """The key id that ``run``'s ingest recorded (None: no ingest, or one from before shoprank recorded it)."""
    ingest = run.manifest().get("stages", {}).get("ingest", {})
    return ingest.get("metrics", {}).get(INGEST_KEY_ID)


def serving_pseudonyms(config: Config, runs: Iterable[str] = ()) -> Pseudonyms:
    """The key the app pseudonymises requests with, checked: the run root's existing key (never created here) and
    the one that every run in ``runs`` (URIs) was ingested under. Raises :class:`ConfigError` naming both key ids
    otherwise: a request pseudonymised under another key matches none of the run's shoppers."""
    found = find_pseudonyms(config)
    if found is None:
        directory, name = file_under(config.run.root, config.run.user_key)
        raise ConfigError(f"no user pseudonym key: {KEY_ENV} is empty and run.user_key ({directory.uri(name)}) does "
                          "not exist. The app never creates one (it must be the key the served runs were ingested "
                          f"under): set {KEY_ENV} or restore that file, or run the pipeline, which creates it")
    for uri in sorted(set(runs)):
        recorded = recorded_key_id(Run.from_uri(uri))
        if recorded is None:
            raise ConfigError(f"run {uri} records no user pseudonym key id (ingested before shoprank recorded it): "
                              f"run the pipeline again (it ingests again) and deploy that run; serving key "
                              f"{found.key_id}")
        if recorded != found.key_id:
            raise ConfigError(f"run {uri} was ingested under user pseudonym key {recorded}, but the app's key "
                              f"({KEY_ENV} or run.user_key) is {found.key_id}: serve with the key the run was "
                              "ingested under, or run the pipeline again under this one and deploy that run")
    return found


def key_id(config: Config) -> str:
    """The fingerprint of the key the ingest stage uses (empty before there is one): part of its identity, so a
    rotated key re-ingests. Reads, never creates: a stage hash has no side effect (the runner makes the key
    first)."""
    found = find_pseudonyms(config)
    return found.key_id if found else ""
