"""Ray Serve's levers, one at a time and combined, on the same run in one session: ``serve_load`` once per
lever (each on a fresh local cluster that starts with the lever's environment), then one table.

Each row is a whole ``benchmarks/serve_load.py`` run (``/search`` and ``/recommend`` at c=1 and c=32, durable
``/events``, and the same pipeline in process, measured in that run, so each row's ratios compare figures taken
minutes apart on the same machine). The levers (Ray 2.60, ``ray/serve/_private/constants.py``):

* ``ray proxy``: Serve's defaults, its Python HTTP proxy on every node, then the ingress replica, then the variant's
  (``SHOPRANK_INGRESS=proxy``; this and the next three levers set it, since shoprank's default puts HAProxy in front
  wherever it is installed);
* ``throughput-optimized``: ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` with its direct ingress off (gRPC between
  deployments, user code and the router on the replica's own event loop, request logs buffered), through the proxy;
* ``direct ingress``: ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``, the load sent to the ingress replica's own HTTP port (what
  a load balancer reading Serve's target groups does): no proxy hop;
* ``throughput-optimized + direct``: both;
* ``haproxy``: Ray's ``RAY_SERVE_ENABLE_HA_PROXY=1`` alone (Debian's ``haproxy`` in front of the ingress replicas,
  which then answer HTTP themselves), held on loopback as below, the load sent to ``serve.port`` as with the proxy;
* ``shoprank haproxy``: ``SHOPRANK_INGRESS=haproxy`` (``shoprank.haproxy``): HAProxy with throughput-optimized, every
  listener on loopback.

    python benchmarks/serve_levers.py --config demo --set run.root=$PWD/runs
    python benchmarks/serve_levers.py --config demo --levers "ray proxy" haproxy --duration 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
PROXY = ["SHOPRANK_INGRESS=proxy"]
"""Ray's own front, whatever shoprank's default."""
THROUGHPUT = [*PROXY, "RAY_SERVE_THROUGHPUT_OPTIMIZED=1"]
HA = ["SHOPRANK_INGRESS=haproxy"]
"""shoprank's HAProxy ingress, which turns on RAY_SERVE_THROUGHPUT_OPTIMIZED too (shoprank.haproxy)."""
LEVERS: dict[str, tuple[list[str], bool]] = {
    "ray proxy": (PROXY, False),
    "throughput-optimized": ([*THROUGHPUT, "RAY_SERVE_ENABLE_DIRECT_INGRESS=0"], False),
    "direct ingress": ([*PROXY, "RAY_SERVE_ENABLE_DIRECT_INGRESS=1"], True),
    "throughput-optimized + direct": (THROUGHPUT, True),
    "haproxy": ([*HA, "RAY_SERVE_THROUGHPUT_OPTIMIZED=0"], False),
    "shoprank haproxy": (HA, False),
}
"""Lever -> (the environment the cluster starts with, whether the load goes to the ingress replica's own port)."""


def run_lever(name: str, passed: list[str], log_dir: Path) -> dict[str, Any] | None:
    """One ``serve_load`` run with ``name``'s environment; its JSON figures, or None (the log says why)."""
    environment, direct = LEVERS[name]
    if any(setting.startswith("SHOPRANK_INGRESS=haproxy") for setting in environment) and not os.access(HAPROXY, os.X_OK):
        print(f"{name}: skipped, no haproxy at {HAPROXY} (`make haproxy` installs Debian's)", flush=True)
        return None
    command = [sys.executable, str(HERE / "serve_load.py"), *passed,
               *(f"--serve-env={setting}" for setting in environment), *(["--direct-ingress"] if direct else [])]
    log = log_dir / f"serve_load-{name.replace(' ', '').replace('+', '_')}.log"
    started = time.perf_counter()
    with log.open("w") as out:
        finished = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    print(f"{name}: {'done' if finished.returncode == 0 else f'failed (exit {finished.returncode})'} in "
          f"{time.perf_counter() - started:.0f} s, log {log}", flush=True)
    for line in reversed(log.read_text().splitlines()):
        if line.startswith('{"benchmark": "serve_load"'):
            return json.loads(line)
    return None


def row(name: str, figures: dict[str, Any]) -> str:
    served, local, ratios = figures["served"], figures["in_process"], figures["ratio_serve_over_in_process"]
    top = max(int(key.split("c=")[1]) for key in served if key.startswith("/search c="))
    cells = [f"{name:<32}"]
    for kind in ("search", "recommend"):
        at = served[f"/{kind} c={top}"]
        cells.append(f"{at['rps']:7.1f} {ratios[kind][f'c{top}_over_batched']:5.2f} "
                     f"{ratios[kind][f'c{top}_p99_over_p50'] or float('nan'):5.2f}")
    one = served.get("/search c=1", {})
    cells.append(f"{one.get('p50_ms', float('nan')):6.1f} {local['search/batch1']['p50_ms']:6.1f}")
    cpu = served[f"/search c={top}"]["cpu_ms_per_request"]
    cells.append(" ".join(f"{cpu[role]:5.1f}" for role in cpu) + f" {sum(cpu.values()):6.1f}")
    cells.append(f"{served['/events c=8']['events_per_s']:7.0f}")
    outside = [phase.get("outside_cpu_percent_mean") for phase in figures["machine"]["phases"].values()]
    outside = [value for value in outside if value is not None]
    cells.append(f"{max(outside) if outside else float('nan'):5.0f}")
    return " | ".join(cells)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    parser.add_argument("--log-dir", default=None, help="where each run's log goes (default: a new temporary folder)")
    args, passed = parser.parse_known_args()  # the rest goes to serve_load (--config, --set, --duration, --levels)
    log_dir = Path(args.log_dir) if args.log_dir else Path(subprocess.check_output(["mktemp", "-d"], text=True).strip())
    log_dir.mkdir(parents=True, exist_ok=True)
    results = {name: run_lever(name, passed, log_dir) for name in args.levers}
    print()
    print("Serve's levers (each row one serve_load run on a fresh local cluster; ratios over the same run's "
          "in-process pipeline, batched)")
    print(f"{'lever':<32} | search c=32 req/s, /batched, p99/p50 | recommend c=32 (same) | search c=1 p50 ms, "
          "in-process batch-1 p50 | CPU ms per search at c=32: proxy ingress variant store driver rest total | "
          "/events events/s | max outside CPU %")
    for name, figures in results.items():
        print(row(name, figures) if figures else f"{name:<32} | no figures (see its log)")
    print(json.dumps({"benchmark": "serve_levers", "levers": {name: figures for name, figures in results.items()}}))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
