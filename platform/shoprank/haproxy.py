"""Serve's ingress through HAProxy instead of Ray's Python proxy (``SHOPRANK_INGRESS``), every listener kept on
loopback on a one-machine cluster.

Ray Serve 2.60 can put Debian's ``haproxy`` in front of the ingress replicas, which then answer HTTP themselves
("direct ingress"): the proxy's hop goes, and with it about a third of the CPU a search costs the app on two cores
(``benchmarks/serve_levers.py``, figures in benchmarks/README.md). Ray reads the switch from the environment of the
cluster's processes, so it is set where a cluster starts: :func:`shoprank.entrypoint.local_ray_options` and
``shoprank cluster up`` add :func:`ingress_env`. ``SHOPRANK_INGRESS`` is ``auto`` (the default: HAProxy on a
one-machine cluster where it is installed, which the Makefile does; else Ray's proxy, said in the log), ``haproxy``
(an error where it is missing) or ``proxy`` (Ray's Python proxy, adding nothing). ``auto`` keeps Ray's proxy on a
cluster that other nodes join (``LocalCluster.loopback_only`` false): each node would need haproxy and this environment,
which nothing here installs on them or has tested. What the environment changes beside the switch, and why:

* ``RAY_SERVE_HAPROXY_BINARY_PATH`` is ``serving/haproxy-loopback``, which moves the statistics page and the
  Prometheus exporter that Ray's config binds on every interface to 127.0.0.1 (on a one-machine cluster), then
  becomes Debian's haproxy;
* the admin socket (mode 666 in Ray's template), the config and the server state live in a new mode-0700 folder of
  their own instead of Ray's shared ``/tmp/haproxy-serve``, and the statistics and exporter ports are free ones, so
  two clusters of a machine never meet;
* an ingress replica being replaced drains for 1 s instead of 30 (Ray's default is sized for a cloud load
  balancer's deregistration; HAProxy here health-checks every replica each second);
* ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` too: gRPC between deployments, user code and the router on each replica's own
  event loop, request logs buffered. Through Ray's proxy it changed nothing measurable; behind HAProxy it took the
  CPU a search costs from 21.1 to 16.8 ms (benchmarks/README.md). ``RAY_SERVE_THROUGHPUT_OPTIMIZED=0`` in the
  environment keeps it off.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from shoprank.errors import ConfigError

INGRESS_VARIABLE = "SHOPRANK_INGRESS"
INGRESSES = ("auto", "proxy", "haproxy")
LOOPBACK_WRAPPER = Path(__file__).resolve().parent / "serving" / "haproxy-loopback"
DEBIAN_HAPROXY = "/usr/sbin/haproxy"

log = logging.getLogger(__name__)


def chosen_ingress(*, loopback: bool = True) -> str:
    """The ingress a new cluster gets, ``proxy`` or ``haproxy``: ``SHOPRANK_INGRESS`` (``auto`` when unset: HAProxy
    on a one-machine cluster, ``loopback``, where it is installed), or a :class:`ConfigError` naming the values it
    takes."""
    ingress = os.environ.get(INGRESS_VARIABLE, "auto") or "auto"
    if ingress not in INGRESSES:
        raise ConfigError(f"{INGRESS_VARIABLE}={ingress!r}: the Serve ingress is one of {', '.join(INGRESSES)}")
    if ingress == "auto":
        if not loopback:
            log.info("Serve's ingress: Ray's Python proxy (a cluster other nodes join; %s=haproxy puts HAProxy "
                     "there)", INGRESS_VARIABLE)
            return "proxy"
        if find_haproxy() is None:
            log.info("Serve's ingress: Ray's Python proxy (no haproxy installed: `make haproxy` installs it)")
            return "proxy"
        return "haproxy"
    return ingress


def find_haproxy() -> str | None:
    """``SHOPRANK_HAPROXY``, else Debian's haproxy, else one on the ``PATH``; None where there is none."""
    return os.environ.get("SHOPRANK_HAPROXY") or (DEBIAN_HAPROXY if os.access(DEBIAN_HAPROXY, os.X_OK)
                                                  else shutil.which("haproxy"))


def haproxy_binary() -> str:
    """The haproxy to run (:func:`find_haproxy`), or a :class:`ConfigError` saying how to install it."""
    found = find_haproxy()
    if not found:
        raise ConfigError(f"{INGRESS_VARIABLE}=haproxy needs HAProxy: `make haproxy` (or apt-get install haproxy)")
    return found


def ingress_env(*, loopback: bool, free_port: Callable[[], int]) -> dict[str, str]:
    """The variables a new cluster's processes need for the chosen ingress (none for Ray's proxy); ``loopback``: a
    one-machine cluster, whose HAProxy listens on 127.0.0.1 only; ``free_port``: a port nothing listens on."""
    if chosen_ingress(loopback=loopback) == "proxy":
        return {}
    # mode 0700: the admin socket is mode 666 inside. Short, under /tmp: Ray puts the socket in a folder named by a
    # 56-character hash below this one, and haproxy takes a socket path of at most 97 bytes.
    folder = Path(tempfile.mkdtemp(prefix="srhp-", dir="/tmp"))
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1"),  # 0 keeps it off
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(LOOPBACK_WRAPPER),
        "SHOPRANK_HAPROXY": haproxy_binary(),
        "SHOPRANK_HAPROXY_LOOPBACK": "1" if loopback else "0",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
    }
