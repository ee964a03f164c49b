"""Serve under load: ``/search`` and ``/recommend`` over HTTP at concurrency 1, 8, 32 and 64, against
the same pipeline called in process; and durable ``/events`` throughput.

The app is deployed on a fresh local cluster on the run's registry variants (``A`` and
``B``; registered from the run when missing), with its event store in a temporary
folder. A separate process (the load driver, asyncio + httpx) keeps ``c`` requests
in flight for ``--duration`` seconds per level and records each latency; requests
name variant B (forced), the fine-tuned encoder with the XGBoost ranker, so every
level measures the same path.

In process, without Serve: :class:`shoprank.recsys.answer.VariantPipeline` of
variant B, one request at a time (batch size 1), and batched (``--batch`` requests through
``answer_many``, as a variant replica answers a batch: queries encoded together, candidates
scored in one ``predict``). The ratios: Serve's requests/s at c=32 over the in-process batched requests/s
(the strongest baseline: the same code without HTTP and Serve), and its p99 over its p50 there.

``/events``: concurrency 8, ``--events-per-request`` (50) events per request, each on disk (SQLite,
``synchronous=FULL``) before its 200; events/s.

Where the time goes: beside each level, the CPU milliseconds per answered request of each kind of
process (Serve's HTTP proxy or HAProxy, the ingress replicas, the variant replicas, the event store's
writer, the load driver, and Ray's own processes with everything else of this benchmark), from the
processes' own CPU counters before and after the level; and the in-process pipeline's CPU per request.
On two cores a level's throughput is at most 2,000 ms over the total. ``--serve-env KEY=VALUE`` sets a
variable in the environment the local cluster starts with (Serve's levers:
``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``, ``RAY_SERVE_ENABLE_HA_PROXY=1``, ...), so one lever's run differs
from another's by that alone. A contention watcher reports what else used the CPUs per phase.

    python benchmarks/serve_load.py --config demo
    python benchmarks/serve_load.py --config demo --duration 10 --levels 1 8 --events-per-request 1
    python benchmarks/serve_load.py --config demo --serve-env RAY_SERVE_THROUGHPUT_OPTIMIZED=1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import tempfile
import time
import uuid
from collections import Counter
from typing import Any

import numpy as np
import psutil

os.environ.setdefault("RAY_AUTH_MODE", "token")

import common  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402

from shoprank.config import load_config  # noqa: E402
from shoprank.data.io import read_table  # noqa: E402
from shoprank.recsys.context import load_context  # noqa: E402
from shoprank.recsys.booster import load_ranker  # noqa: E402
from shoprank.serving.app import AppArgs, deploy  # noqa: E402
from shoprank.serving.keys import client_keys, create_keys  # noqa: E402
from shoprank.recsys.messages import Asked  # noqa: E402
from shoprank.recsys.answer import VariantPipeline  # noqa: E402
from shoprank.serving.variants import register_variants, resolve_variants  # noqa: E402
from shoprank.store.registry import Registry  # noqa: E402
from shoprank.store.location import Location  # noqa: E402
from shoprank.store.run import Run  # noqa: E402


PROCESS_ROLES = (
    ("proxy", ("ProxyActor", "haproxy")),
    ("ingress", ("ServeReplica:shoprank:Ingress",)),
    ("variant", ("ServeReplica:shoprank:Variant_", "ServeReplica:shoprank:QueryEncoder_")),
    ("event store", ("ServeReplica:shoprank:EventStoreWriter",)),
)
"""Kinds of process by what their command line (Ray's process title) names; the load driver by its pid; the rest
(raylet, GCS, Serve's controller, this process) is ``ray and the rest``."""
ROLE_NAMES = [name for name, _ in PROCESS_ROLES] + ["driver", "ray and the rest"]


def cpu_seconds_by_role(driver_pid: int) -> Counter[str]:
    """CPU seconds (user + system) so far of this benchmark's processes, by kind (:data:`PROCESS_ROLES`)."""
    me = psutil.Process()
    seconds: Counter[str] = Counter()
    for proc in [me, *me.children(recursive=True)]:
        try:
            line = " ".join(proc.cmdline())
            times = proc.cpu_times()
        except psutil.Error:
            continue
        role = "driver" if proc.pid == driver_pid else next(
            (name for name, keys in PROCESS_ROLES if any(key in line for key in keys)), "ray and the rest")
        seconds[role] += times.user + times.system
    return seconds


def direct_ingress_url() -> str:
    """The first ingress replica's own HTTP address, from Serve's target groups (what a load balancer in front
    of direct ingress reads)."""
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    for group in ray.get(controller.get_target_groups.remote("shoprank")):
        if str(group.protocol).endswith("HTTP") and group.targets:
            return f"http://{group.targets[0].ip}:{group.targets[0].port}"
    raise SystemExit("no direct-ingress HTTP target: is RAY_SERVE_ENABLE_DIRECT_INGRESS (or THROUGHPUT_OPTIMIZED) set?")


def percentiles(latencies_s: list[float]) -> dict[str, float]:
    ms = np.asarray(latencies_s) * 1000.0
    return {f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)} if len(ms) else {}


async def _drive(url: str, key: str, path: str, bodies: list[Any], concurrency: int,
                 duration_s: float) -> dict[str, Any]:
    import httpx

    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits,
                                 headers={"Authorization": f"Bearer {key}"}) as client:
        async def worker(offset: int) -> None:
            nonlocal errors
            i = offset
            while time.perf_counter() < deadline:
                body = bodies[i % len(bodies)]
                body = [{**event, "event_id": uuid.uuid4().hex} for event in body] if isinstance(body, list) else body
                start = time.perf_counter()
                answer = await client.post(path, json=body)
                if answer.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1
                i += concurrency
        started = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"requests": len(latencies), "errors": errors, "rps": len(latencies) / elapsed, **percentiles(latencies)}


def drive(url: str, key: str, path: str, bodies: list[Any], concurrency: int, duration_s: float) -> dict[str, Any]:
    """Runs in the load-driver process, with the client ``key``."""
    return asyncio.run(_drive(url, key, path, bodies, concurrency, duration_s))


def in_process(pipeline: VariantPipeline, queries: list[str], users: list[str], n: int, batch: int,
               now_s: float) -> dict[str, dict[str, float]]:
    """Requests/s and latency of the pipeline without Serve: one at a time, then batched."""
    out: dict[str, dict[str, float]] = {}
    for kind in ("search", "recommend"):
        latencies = []
        for i in range(n):
            start = time.perf_counter()
            if kind == "search":
                pipeline.search(queries[i % len(queries)], None, 10, now_s)
            else:
                pipeline.recommend(users[i % len(users)], 10, now_s)
            latencies.append(time.perf_counter() - start)
        out[f"{kind}/batch1"] = {"rps": n / sum(latencies), **percentiles(latencies)}
        start, cpu_start = time.perf_counter(), time.process_time()
        for first in range(0, n, batch):
            chunk = range(first, min(first + batch, n))
            pipeline.answer_many([  # what a variant replica runs on a batch of concurrent requests
                Asked(None, [], queries[i % len(queries)], 10, now_s) if kind == "search"
                else Asked(users[i % len(users)], [], None, 10, now_s) for i in chunk
            ])
        out[f"{kind}/batched"] = {"rps": n / (time.perf_counter() - start),
                                  "cpu_ms_per_request": (time.process_time() - cpu_start) * 1000 / n}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per endpoint and concurrency")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--events-per-request", type=int, default=50)
    parser.add_argument("--in-process-requests", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--direct-ingress", action="store_true",
                        help="send the load to the ingress replica's own HTTP port (Serve's direct ingress, which "
                        "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 turns on) instead of the proxy's")
    parser.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                        help="set in the environment the local cluster starts with (a Serve lever)")
    args = parser.parse_args()
    for setting in args.serve_env:
        key, _, value = setting.partition("=")
        os.environ[key] = value  # before Ray starts: its processes inherit it
    common.setup_logging()
    config = load_config(args.config, args.set)
    run = Run.for_config(config)
    if not {"A", "B"} <= Registry(config.run.root).aliases().keys():
        register_variants(config, run)
    queries = sorted(set(read_table(run, "data", "query_pairs", columns=["query"]).column("query").to_pylist()))[:500]
    users = sorted(set(read_table(run, "data", "events", columns=["user_id"]).column("user_id").to_pylist()))[:500]
    machine = common.machine()
    with tempfile.TemporaryDirectory() as scratch, common.watched_ray(machine) as watcher:
        port = 8123
        overrides = [*args.set, f"run.root={Location(config.run.root).uri()}", f"serve.port={port}",
                     f"serve.event_db={scratch}/events.sqlite"]
        create_keys(config)
        key = client_keys(config)["client"]
        url = deploy(AppArgs(config=args.config, overrides=overrides))
        if args.direct_ingress:
            url = direct_ingress_url()
        bodies = {"/search": [{"query": q, "k": 10, "variant": "B"} for q in queries],
                  "/recommend": [{"user_id": u, "k": 10, "variant": "B"} for u in users]}
        products = read_table(run, "data", "products", columns=["product_id"]).column("product_id").to_pylist()[:200]
        events = [[{"user_id": users[(i + j) % len(users)], "product_id": products[(i + j) % len(products)],
                    "event_type": "click"} for j in range(args.events_per_request)] for i in range(len(products))]
        served: dict[str, dict[str, Any]] = {}
        with multiprocessing.get_context("spawn").Pool(1) as driver:
            driver_pid = driver.apply(os.getpid)

            def level_with_cpu(name: str, path: str, level_bodies: list[Any], level: int) -> None:
                watcher.set_phase(f"serve {name}")
                before = cpu_seconds_by_role(driver_pid)
                served[name] = driver.apply(drive, (url, key, path, level_bodies, level, args.duration))
                used = cpu_seconds_by_role(driver_pid) - before
                answered = max(served[name]["requests"], 1)
                served[name]["cpu_ms_per_request"] = {role: used[role] * 1000 / answered for role in ROLE_NAMES}

            driver.apply(drive, (url, key, "/search", bodies["/search"], 1, 3.0))  # warm-up
            for path in ("/search", "/recommend"):
                for level in args.levels:
                    level_with_cpu(f"{path} c={level}", path, bodies[path], level)
            level_with_cpu("/events c=8", "/events", events, 8)
            served["/events c=8"]["events_per_s"] = served["/events c=8"]["rps"] * args.events_per_request
        serve.shutdown()
        watcher.set_phase("in process")
        spec = resolve_variants(config)["B"]
        context = load_context(config, Run.from_uri(spec.run), runtime=spec.runtime)  # Serve's runtime
        booster = load_ranker(Run.from_uri(spec.ranker_run).local_path("ranker", "model"))
        pipeline = VariantPipeline(context, "ranker", booster)
        now_s = float(context.catalogue.stats.cutoff_s) + 30 * 86_400
        local = in_process(pipeline, queries, users, args.in_process_requests, args.batch, now_s)
    rows = []
    for name, figures in served.items():
        rows.append(f"{name:<18} {figures['rps']:>8.1f} req/s  p50 {figures.get('p50_ms', 0):7.1f} ms  "
                    f"p95 {figures.get('p95_ms', 0):7.1f} ms  p99 {figures.get('p99_ms', 0):7.1f} ms  "
                    f"errors {figures['errors']}")
    rows.append(f"/events: {served['/events c=8']['events_per_s']:.0f} events/s durable "
                f"({args.events_per_request} per request)")
    rows.append("")
    rows.append("CPU ms per answered request, by process: " + " | ".join(ROLE_NAMES) + " | total")
    for name, figures in served.items():
        cpu = figures["cpu_ms_per_request"]
        rows.append(f"{name:<18} " + " ".join(f"{cpu[role]:7.2f}" for role in ROLE_NAMES)
                    + f" {sum(cpu.values()):8.2f}")
    rows.append("")
    ratios = {}
    top = 32 if 32 in args.levels else max(args.levels)
    for kind in ("search", "recommend"):
        at = served[f"/{kind} c={top}"]
        ratios[kind] = {f"c{top}_over_batched": at["rps"] / local[f"{kind}/batched"]["rps"],
                        f"c{top}_p99_over_p50": at.get("p99_ms", 0.0) / at["p50_ms"] if at.get("p50_ms") else None}
        rows.append(f"in process {kind:<9} batch 1 {local[f'{kind}/batch1']['rps']:8.1f} req/s  "
                    f"p50 {local[f'{kind}/batch1']['p50_ms']:7.1f} ms; batched ({args.batch}) "
                    f"{local[f'{kind}/batched']['rps']:8.1f} req/s "
                    f"({local[f'{kind}/batched']['cpu_ms_per_request']:.2f} CPU ms each); Serve c={top} / in-process batched: "
                    f"{ratios[kind][f'c{top}_over_batched']:.2f}, its p99 / p50: "
                    f"{ratios[kind][f'c{top}_p99_over_p50'] or float('nan'):.2f}")
    common.print_title("Serve load: HTTP through Ray Serve against the pipeline in process", machine,
                       [f"run {run.uri()}, variant B forced, {args.duration:.0f} s per level, load from a separate process",
                        "environment: " + (" ".join(args.serve_env) or "Serve's defaults")], 100)
    print("\n".join(rows))
    common.print_contention(machine)
    print(json.dumps(common.round_floats({"benchmark": "serve_load", "served": served, "in_process": local,
                                         "ratio_serve_over_in_process": ratios, "serve_env": args.serve_env,
                                         "machine": machine})))


if __name__ == "__main__":
    main()
