"""Serve's HAProxy ingress (``SHOPRANK_INGRESS``, ``shoprank.haproxy``): the environment a cluster starts with, and
the wrapper that holds HAProxy's own listeners on loopback. The rest of the suite runs against it wherever haproxy is
installed (``make test`` installs it; docs/serving.md, "The ingress")."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from shoprank.entrypoint import free_port
from shoprank.errors import ConfigError
from shoprank.haproxy import LOOPBACK_WRAPPER, chosen_ingress, ingress_env

RAY_CONFIG = """global
    stats socket /x/admin.sock mode 666 level admin expose-fd listeners
frontend prometheus
    bind :{metrics}
    mode http
frontend http_frontend
    bind {host}:8000
listen stats
  bind *:{stats}
  stats enable
backend app
    server replica-1 127.0.0.1:30000 check
"""


def run_wrapper(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The wrapper as Ray starts it (``-db -f FILE -dR``), ``echo`` standing in for haproxy."""
    return subprocess.run([str(LOOPBACK_WRAPPER), "-db", "-f", str(config), "-dR"], capture_output=True, text=True,
                          env={**os.environ, "SHOPRANK_HAPROXY": "/bin/echo", **env}, check=True)


@pytest.mark.parametrize("host", ["127.0.0.1", "*"])
def test_the_wrapper_moves_the_statistics_and_exporter_binds_to_loopback_only(tmp_path: Path, host: str) -> None:
    config = tmp_path / "haproxy.cfg"
    config.write_text(RAY_CONFIG.format(metrics=29101, stats=28404, host=host))
    ports = {"RAY_SERVE_HAPROXY_STATS_PORT": "28404", "RAY_SERVE_HAPROXY_METRICS_PORT": "29101"}
    ran = run_wrapper(config, {**ports, "SHOPRANK_HAPROXY_LOOPBACK": "1"})
    assert ran.stdout.split() == ["-db", "-f", str(config), "-dR"]  # haproxy gets Ray's arguments unchanged
    binds = [line.strip() for line in config.read_text().splitlines() if line.strip().startswith("bind")]
    # the HTTP frontend keeps serve.host (a user who set 0.0.0.0 meant it); the other two are held to loopback
    assert binds == ["bind 127.0.0.1:29101", f"bind {host}:8000", "bind 127.0.0.1:28404"]
    assert "server replica-1 127.0.0.1:30000 check" in config.read_text()

    config.write_text(RAY_CONFIG.format(metrics=29101, stats=28404, host=host))
    run_wrapper(config, {**ports, "SHOPRANK_HAPROXY_LOOPBACK": "0"})  # a multi-node cluster: Ray's config as is
    assert config.read_text() == RAY_CONFIG.format(metrics=29101, stats=28404, host=host)


def test_the_ingress_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SHOPRANK_INGRESS", "proxy")
    assert chosen_ingress() == "proxy" and ingress_env(loopback=True, free_port=free_port) == {}

    monkeypatch.setenv("SHOPRANK_INGRESS", "nginx")
    with pytest.raises(ConfigError, match="SHOPRANK_INGRESS='nginx'.*auto, proxy, haproxy"):
        chosen_ingress()

    monkeypatch.setenv("SHOPRANK_INGRESS", "haproxy")
    monkeypatch.setenv("SHOPRANK_HAPROXY", "/bin/echo")  # wherever Debian's haproxy is (or is not) installed
    env = ingress_env(loopback=True, free_port=free_port)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["SHOPRANK_HAPROXY_LOOPBACK"] == "1"
    assert env["RAY_SERVE_HAPROXY_BINARY_PATH"] == str(LOOPBACK_WRAPPER) and os.access(LOOPBACK_WRAPPER, os.X_OK)
    folder = Path(env["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700  # the admin socket's folder
    # Ray adds a folder named by a 56-character hash; haproxy takes a socket path of at most 97 bytes
    assert len(str(folder / ("h" * 56) / "admin.sock")) <= 97
    assert {Path(env[name]).parent for name in ("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC",
                                                "RAY_SERVE_HAPROXY_SERVER_STATE_FILE")} == {folder}
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] != env["RAY_SERVE_HAPROXY_METRICS_PORT"]
    multi_node = ingress_env(loopback=False, free_port=free_port)
    assert multi_node["SHOPRANK_HAPROXY_LOOPBACK"] == "0"
    for made in (env, multi_node):
        shutil.rmtree(Path(made["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent)

    monkeypatch.delenv("SHOPRANK_INGRESS")  # auto: HAProxy where there is one, on a one-machine cluster
    assert chosen_ingress() == "haproxy" and chosen_ingress(loopback=False) == "proxy"

    monkeypatch.setenv("SHOPRANK_HAPROXY", "")
    monkeypatch.setenv("PATH", str(tmp_path))  # no haproxy anywhere
    monkeypatch.setattr("shoprank.haproxy.DEBIAN_HAPROXY", str(tmp_path / "haproxy"))
    assert chosen_ingress() == "proxy" and ingress_env(loopback=True, free_port=free_port) == {}  # auto falls back
    monkeypatch.setenv("SHOPRANK_INGRESS", "haproxy")  # asked for by name: an error that says how to install it
    with pytest.raises(ConfigError, match="make haproxy"):
        ingress_env(loopback=True, free_port=free_port)
