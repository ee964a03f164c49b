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

    python benchmarks/serve_load.py --config demo
    python benchmarks/serve_load.py --config demo --duration 10 --levels 1 8 --events-per-request 1
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
from typing import Any

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "token")

import common  # noqa: E402
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
        start = time.perf_counter()
        for first in range(0, n, batch):
            chunk = range(first, min(first + batch, n))
            pipeline.answer_many([  # what a variant replica runs on a batch of concurrent requests
                Asked(None, [], queries[i % len(queries)], 10, now_s) if kind == "search"
                else Asked(users[i % len(users)], [], None, 10, now_s) for i in chunk
            ])
        out[f"{kind}/batched"] = {"rps": n / (time.perf_counter() - start)}
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
    args = parser.parse_args()
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
        bodies = {"/search": [{"query": q, "k": 10, "variant": "B"} for q in queries],
                  "/recommend": [{"user_id": u, "k": 10, "variant": "B"} for u in users]}
        products = read_table(run, "data", "products", columns=["product_id"]).column("product_id").to_pylist()[:200]
        events = [[{"user_id": users[(i + j) % len(users)], "product_id": products[(i + j) % len(products)],
                    "event_type": "click"} for j in range(args.events_per_request)] for i in range(len(products))]
        served: dict[str, dict[str, Any]] = {}
        with multiprocessing.get_context("spawn").Pool(1) as driver:
            driver.apply(drive, (url, key, "/search", bodies["/search"], 1, 3.0))  # warm-up
            for path in ("/search", "/recommend"):
                for level in args.levels:
                    watcher.set_phase(f"serve {path} c={level}")
                    served[f"{path} c={level}"] = driver.apply(drive, (url, key, path, bodies[path], level,
                                                                       args.duration))
            watcher.set_phase("serve /events c=8")
            served["/events c=8"] = driver.apply(drive, (url, key, "/events", events, 8, args.duration))
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
    ratios = {}
    top = 32 if 32 in args.levels else max(args.levels)
    for kind in ("search", "recommend"):
        at = served[f"/{kind} c={top}"]
        ratios[kind] = {f"c{top}_over_batched": at["rps"] / local[f"{kind}/batched"]["rps"],
                        f"c{top}_p99_over_p50": at.get("p99_ms", 0.0) / at["p50_ms"] if at.get("p50_ms") else None}
        rows.append(f"in process {kind:<9} batch 1 {local[f'{kind}/batch1']['rps']:8.1f} req/s  "
                    f"p50 {local[f'{kind}/batch1']['p50_ms']:7.1f} ms; batched ({args.batch}) "
                    f"{local[f'{kind}/batched']['rps']:8.1f} req/s; Serve c={top} / in-process batched: "
                    f"{ratios[kind][f'c{top}_over_batched']:.2f}, its p99 / p50: "
                    f"{ratios[kind][f'c{top}_p99_over_p50'] or float('nan'):.2f}")
    common.print_title("Serve load: HTTP through Ray Serve against the pipeline in process", machine,
                       [f"run {run.uri()}, variant B forced, {args.duration:.0f} s per level, load from a separate process"],
                       100)
    print("\n".join(rows))
    print(json.dumps(common.round_floats({"benchmark": "serve_load", "served": served, "in_process": local,
                                         "ratio_serve_over_in_process": ratios, "machine": machine})))


if __name__ == "__main__":
    main()
