"""API keys and roles (:mod:`shoprank.serving.keys`), Ray-free; the app's refusals over HTTP are in
``tests/test_serving.py``."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from shoprank.config import load_config
from shoprank.errors import ConfigError
from shoprank.serving.keys import KEYS_ENV, allows, client_keys, create_keys, digest, load_keyring


def test_created_keys_are_stored_hashed_kept_private_and_reused(tmp_path: Path) -> None:
    config = load_config("tiny", [f"run.root={tmp_path}"])
    with pytest.raises(ConfigError, match="shoprank keys create"):
        client_keys(config)
    path = create_keys(config)
    keys = client_keys(config)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = tmp_path / config.serve.api_keys
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    text = stored.read_text()
    assert keys["client"] not in text and keys["admin"] not in text and digest(keys["admin"]) in text
    ring = load_keyring(config, environ={})
    assert ring.role_of(keys["client"]) == "client" and ring.role_of(keys["admin"]) == "admin"
    assert ring.role_of(None) is None and ring.role_of(keys["admin"] + "x") is None
    assert create_keys(config) == path and client_keys(config) == keys  # a second `make demo` keeps them
    assert set(keys["page_logins"]) == {"admin", "viewer"}


def test_keys_from_the_environment_and_clear_errors(tmp_path: Path) -> None:
    config = load_config("tiny", [f"run.root={tmp_path}"])
    ring = load_keyring(config, environ={KEYS_ENV: "client:" + "c" * 20 + ", admin:" + "a" * 20})
    assert ring.role_of("c" * 20) == "client" and ring.role_of("a" * 20) == "admin"
    assert load_keyring(config, environ={}).entries == ()
    with pytest.raises(ConfigError, match=f"{KEYS_ENV}: item 1"):
        load_keyring(config, environ={KEYS_ENV: "root:" + "x" * 20})
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "api_keys.json").write_text(json.dumps({"keys": [{"role": "owner", "sha256": "0"}]}))
    with pytest.raises(ConfigError, match="is not a key file"):
        load_keyring(config, environ={})


def test_an_admin_may_do_what_a_client_may_and_not_the_other_way() -> None:
    assert allows("admin", "client") and allows("admin", "admin") and allows("client", "client")
    assert not allows("client", "admin")
