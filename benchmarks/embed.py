"""Benchmark: catalogue embedding with Ray Data against a plain batched loop in one process, and the index's recall.

Usage (from the repository root; it needs a run with a trained encoder)::

    .venv/bin/python jobs/train_encoder.py --config demo      # once: writes runs/demo/encoder/model
    .venv/bin/python benchmarks/embed.py                      # demo run, 1 actor; plain loop at 1 and 2 threads
    .venv/bin/python benchmarks/embed.py --plain-threads 1 --search-repeats 1     # quickest
    .venv/bin/python benchmarks/embed.py --config demo --run-root /data/runs --json embed.json

What it does (one local Ray cluster, ``num_cpus=2``), on the run that ``--config`` names
(``run.root``/``run.name``; ``--run-root`` replaces the root): the run's fine-tuned encoder
(``encoder/model/merged``) embeds the run's catalogue (``data/products``), ``embed.batch_size``
products a batch. Pass the config (and ``--set``) the run was trained with.

1. **Embedding throughput**, two ways:

   a. **Ray Data**: the library's ``embed_catalogue``, the job ``embed_and_index`` runs: ``read_parquet`` ->
      ``map_batches(EmbedProducts, compute=ActorPoolStrategy(size=--actors))`` (1 CPU per actor) ->
      ``write_parquet`` into a scratch folder of the run, removed afterwards (the run's own embeddings
      are not touched). A thin subclass of the library's
      ``EmbedProducts`` only pins torch to 1 thread per actor (as a 1-CPU Ray worker runs) and
      records each batch's call time.
   b. **Plain, one process**: ``load_embedder`` + ``read_table`` + ``product_texts`` + ``embed`` in
      the driver, at each thread count of ``--plain-threads``, in the runtime the actors use
      (``batch_runtime``: the export stage's fp32 ONNX graph on a CPU, else PyTorch). The ratio compares the Ray job with
      the plain loop at as many threads as the job has actors (the same number of cores).

   Both are timed end to end (model load / actor start-up, read, embed, and for Ray the write) and
   compute only (the embedding calls). The two sets of vectors are compared product by product.
2. **Index quality**: ``build_index`` with ``flat``, ``hnsw`` and ``ivf`` (the config's ``embed``
   settings) over the Ray job's vectors in product-id order, as ``embed_and_index`` builds it;
   queries are the run's **validation queries** (``build_eval_data``, encoded with
   ``QUERY_MAX_LENGTH``) and, as a second set, the first 500 products. Recall@10 of HNSW and IVF
   against the exact (flat) top 10, build time and queries/s (one batched ``search`` call, median of
   ``--search-repeats``, FAISS pinned to 1 thread).
3. **Report**: a table, then one JSON line with every figure. Nothing is asserted. A watcher notes,
   per phase, whether ``jobs/train_encoder.py`` ran meanwhile and how much CPU processes outside
   this benchmark used (200% = both cores of a 2-CPU machine).

Times are wall-clock times on a possibly shared 2-CPU machine: read them as indications, not limits.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from common import RAY_NUM_CPUS, machine, print_contention, print_title, round_floats, \
    run_benchmark, setup_logging, versions, watched_ray

RECALL_K = 10
PRODUCT_QUERIES = 500

# --------------------------------------------------------------------------- embedding


def _embed_actor_class() -> type:
    from shoprank.encoder.stages import EmbedProducts

    class TimedEmbedProducts(EmbedProducts):
        """The library's ``EmbedProducts``, pinned to 1 torch thread, recording each batch's call time."""

        def __init__(self, *args: Any) -> None:
            import torch

            torch.set_num_threads(1)
            super().__init__(*args)

        def __call__(self, batch: pa.Table) -> pa.Table:
            started = time.perf_counter()
            out = super().__call__(batch)
            share = (time.perf_counter() - started) / max(1, out.num_rows)  # rows of a batch sum to its time
            return out.append_column("bench_call_s", pa.array([share] * out.num_rows, pa.float64()))

    return TimedEmbedProducts


def ray_embed_benchmark(config: Any, run: Any, actors: int) -> tuple[dict[str, Any], pa.Table]:
    """The library's Ray Data job (``embed_catalogue``, as ``embed_and_index`` runs it for what the encoder's
    evaluation did not embed) into a scratch folder of the run (removed afterwards); (figures, output by product
    id)."""
    from shoprank.data.io import read_table
    from shoprank.encoder.stages import embed_catalogue
    from shoprank.encoder.train import FINE_TUNED

    embed = config.embed
    scratch = ("bench", "embeddings")
    started = time.perf_counter()
    try:
        embed_catalogue(config, run, {FINE_TUNED: scratch}, embedder=_embed_actor_class())
        wall_s = time.perf_counter() - started
        table = read_table(run, *scratch).sort_by("product_id")
    finally:
        run.remove("bench")
    compute_s = float(table.column("bench_call_s").to_numpy().sum())
    n = table.num_rows
    result = {"products": n, "wall_seconds": wall_s, "products_per_s": n / wall_s,
              "compute_seconds": compute_s, "compute_products_per_s": n / compute_s,
              "actors": actors, "threads": actors, "batch_size": embed.batch_size}
    return result, table.drop_columns(["bench_call_s"])


def plain_embed_benchmark(config: Any, run: Any, threads: int) -> tuple[dict[str, Any], np.ndarray, list[str]]:
    """Load, read and embed the catalogue in this process, in the runtime the Ray job's actors use
    (``batch_runtime``: the export's fp32 ONNX graph on a CPU); (figures, vectors, product ids in table order)."""
    import torch

    from shoprank.data.io import read_table
    from shoprank.encoder.runtime import load_embedder
    from shoprank.encoder.stages import batch_runtime
    from shoprank.encoder.text import product_texts
    from shoprank.encoder.train import FINE_TUNED

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # ONNX Runtime's threads, as Ray sets them for a 1-CPU actor
    runtime = batch_runtime(run, FINE_TUNED, "cpu")
    started = time.perf_counter()
    embedder = load_embedder(config, run, zero_shot=False, runtime=runtime)
    products = read_table(run, "data", "products")
    load_s = time.perf_counter() - started
    compute_started = time.perf_counter()
    texts = product_texts(products, config.encoder)
    vectors = embedder.embed(texts, config.encoder.max_length, batch_size=config.embed.batch_size)
    compute_s = time.perf_counter() - compute_started
    wall_s = time.perf_counter() - started
    n = len(texts)
    return ({"products": n, "wall_seconds": wall_s, "products_per_s": n / wall_s, "load_seconds": load_s,
             "compute_seconds": compute_s, "compute_products_per_s": n / compute_s, "threads": threads,
             "runtime": runtime, "batch_size": config.embed.batch_size},
            vectors, products.column("product_id").to_pylist())


# --------------------------------------------------------------------------- index


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean share of each exact top ``k`` that the approximate top ``k`` finds (rows of -1 never count)."""
    hits = [len(set(a[:k]) & set(e[:k]) - {-1}) / k for a, e in zip(approx, exact)]
    return float(np.mean(hits)) if hits else 0.0


def index_benchmark(config: Any, vectors: np.ndarray, query_sets: dict[str, np.ndarray], k: int,
                    repeats: int) -> dict[str, Any]:
    """Build time, queries/s and recall@k against ``flat`` of each index kind, for each query set."""
    import faiss

    from shoprank.encoder.index import build_index, search

    faiss.omp_set_num_threads(1)
    out: dict[str, Any] = {"k": k, "faiss_threads": 1, "vectors": int(len(vectors)),
                           "queries": {name: int(len(q)) for name, q in query_sets.items()}}
    exact: dict[str, np.ndarray] = {}
    for kind in ("flat", "hnsw", "ivf"):
        embed = config.embed.model_copy(update={"index": kind})
        started = time.perf_counter()
        index = build_index(vectors, embed)
        build_s = time.perf_counter() - started
        entry: dict[str, Any] = {"build_seconds": build_s}
        if kind == "hnsw":
            entry.update(m=embed.hnsw_m, ef_search=int(index.hnsw.efSearch), ef_construction=int(index.hnsw.efConstruction))
        if kind == "ivf":
            entry.update(nlist=int(index.nlist), nprobe=int(index.nprobe))
        for name, queries in query_sets.items():
            search(index, queries, k)  # warm-up
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                _, rows = search(index, queries, k)
                times.append(time.perf_counter() - started)
            seconds = statistics.median(times)
            if kind == "flat":
                exact[name] = rows
            entry[name] = {"search_seconds": seconds, "queries_per_s": len(queries) / seconds if seconds else None,
                           "recall_at_k": recall_at_k(rows, exact[name], k)}
        out[kind] = entry
    return out


# --------------------------------------------------------------------------- main


def _thread_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected thread counts such as 1,2, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {text!r}")
    return list(dict.fromkeys(counts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="demo",
                        help="preset name or YAML path the run was trained with (default: demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, repeatable (e.g. embed.batch_size=64, run.name=other)")
    parser.add_argument("--run-root", default=None, help="directory holding the runs (default: the config's run.root)")
    parser.add_argument("--actors", type=int, default=None,
                        help=f"embedding actors of the Ray job, 1 CPU and 1 torch thread each, at most "
                             f"{RAY_NUM_CPUS} (default: the config's embed.actors)")
    parser.add_argument("--plain-threads", type=_thread_counts, default=[1, 2], metavar="N[,N...]",
                        help="torch thread counts of the plain loop (default: 1,2); the count equal to the "
                             "number of actors is always run, for the ratio")
    parser.add_argument("--search-repeats", type=int, default=5, help="timed repeats of each index search (default: 5)")
    parser.add_argument("--json", default=None, help="also write the JSON figures to this file")
    args = parser.parse_args(argv)
    if args.search_repeats < 1:
        parser.error("--search-repeats must be >= 1")

    from shoprank.config import load_config
    from shoprank.errors import ShopRankError
    from shoprank.store.run import Run

    overrides = list(args.overrides)
    if args.run_root is not None:
        overrides.append(f"run.root={args.run_root}")
    if args.actors is not None:
        overrides.append(f"embed.actors={args.actors}")
    try:
        config = load_config(args.config, overrides)
        run = Run.for_config(config)
        model_dir = run.local_path("encoder", "model")
    except ShopRankError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not 1 <= config.embed.actors <= RAY_NUM_CPUS:
        parser.error(f"--actors must be between 1 and {RAY_NUM_CPUS} (the CPUs of the local Ray cluster)")
    if not (model_dir / "merged").is_dir():
        train = ["python", "jobs/train_encoder.py", "--config", args.config,
                 *[word for item in args.overrides for word in ("--set", item)]]
        if args.run_root is not None:
            train += ["--set", f"run.root={args.run_root}"]
        print(f"error: no trained encoder in {model_dir} ({model_dir / 'merged'} is missing): this benchmark "
              f"embeds with the run's fine-tuned encoder.\nTrain it first:  {shlex.join(train)}", file=sys.stderr)
        return 2

    setup_logging()
    return run_benchmark(lambda _scratch: _benchmark(args, config, run, model_dir), None,
                         "shoprank-bench-embed-", args.json)


def _benchmark(args: argparse.Namespace, config: Any, run: Any, model_dir: Path) -> dict[str, Any]:
    import torch

    from shoprank.encoder.model import encode, load_encoder
    from shoprank.encoder.text import QUERY_MAX_LENGTH
    from shoprank.encoder.train import build_eval_data

    log = logging.getLogger("bench")
    actors = config.embed.actors
    thread_counts = list(dict.fromkeys([actors, *args.plain_threads]))
    figures: dict[str, Any] = {
        "config": {"config": args.config, "overrides": args.overrides, "run": run.uri(), "model_dir": str(model_dir),
                   "max_length": config.encoder.max_length, "description_chars": config.encoder.description_chars,
                   "embed_batch_size": config.embed.batch_size, "actors": actors, "plain_threads": thread_counts},
        "machine": machine(),
        "versions": versions(),
    }
    with watched_ray(figures["machine"]) as watcher:
        # 1a. the Ray Data job
        log.info("Ray Data embedding, %d actor(s) ...", actors)
        watcher.set_phase("embed_ray")
        ray_embed, ray_table = ray_embed_benchmark(config, run, actors)
        figures["embed_ray"] = ray_embed

        # 1b. the plain loop
        figures["embed_plain"] = {}
        plain_vectors: np.ndarray | None = None
        plain_ids: list[str] = []
        for threads in thread_counts:
            log.info("plain embedding loop, %d thread(s) ...", threads)
            watcher.set_phase(f"embed_plain_{threads}_thread")
            result, vectors, ids = plain_embed_benchmark(config, run, threads)
            figures["embed_plain"][f"threads_{threads}"] = result
            if plain_vectors is None:
                plain_vectors, plain_ids = vectors, ids
        assert plain_vectors is not None
        ray_vectors = np.stack(ray_table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
        ray_ids = ray_table.column("product_id").to_pylist()
        order = np.argsort(np.array(plain_ids))
        same_ids = [plain_ids[i] for i in order] == ray_ids
        figures["embed_check"] = {
            "same_product_ids": same_ids,
            "max_abs_diff": float(np.abs(plain_vectors[order] - ray_vectors).max()) if same_ids else None,
        }
        same = figures["embed_plain"][f"threads_{actors}"]
        figures["embed_threads_compared"] = actors
        figures["embed_ratio_ray_over_plain"] = ray_embed["products_per_s"] / same["products_per_s"]
        figures["embed_compute_ratio_ray_over_plain"] = (
            ray_embed["compute_products_per_s"] / same["compute_products_per_s"])

        # 2. index quality (catalogue = the Ray job's vectors in product-id order, as embed_and_index)
        log.info("index quality ...")
        watcher.set_phase("index")
        torch.set_num_threads(1)
        query_encoder, query_tokenizer = load_encoder(model_dir, "merged")
        queries = list(build_eval_data(run, config.encoder, "validation").queries.values())
        query_sets = {"validation_queries": encode(query_encoder, query_tokenizer, queries, QUERY_MAX_LENGTH,
                                                   batch_size=config.embed.batch_size),
                      "first_products": ray_vectors[:PRODUCT_QUERIES]}
        figures["index"] = index_benchmark(config, ray_vectors, query_sets, k=RECALL_K, repeats=args.search_repeats)
        for kind in ("hnsw", "ivf"):
            figures[f"{kind}_recall_at_{RECALL_K}"] = figures["index"][kind]["validation_queries"]["recall_at_k"]
    figures = round_floats(figures)
    _report(figures)
    return figures


def _report(f: dict[str, Any]) -> None:
    c, er = f["config"], f["embed_ray"]
    tc = f["embed_threads_compared"]
    print_title("embedding benchmark", f["machine"], [
        f"run {c['run']} (config {c['config']}), encoder {c['model_dir']}, max_length {c['max_length']}, "
        f"description_chars {c['description_chars']}, batch {c['embed_batch_size']}",
    ], width=104, versions_figures=f["versions"])
    print(f"EMBEDDING ({er['products']:,} products, the run's fine-tuned encoder, batch {er['batch_size']})")
    header = f"{'job':<40} {'threads':>7} {'wall s':>8} {'products/s':>11} {'compute s':>10} {'compute/s':>10}"
    print(header)
    print("-" * len(header))
    rows = [(f"Ray Data map_batches ({er['actors']} actor{'s' if er['actors'] > 1 else ''})", er)]
    for r in f["embed_plain"].values():
        threads = int(r["threads"])
        rows.append(("plain encode(), one process" if threads == tc else
                     f"plain encode() (extra: {threads} thread{'s' if threads > 1 else ''})", r))
    for name, r in rows:
        print(f"{name:<40} {int(r['threads']):>7} {r['wall_seconds']:>8.2f} {r['products_per_s']:>11.1f} "
              f"{r['compute_seconds']:>10.2f} {r['compute_products_per_s']:>10.1f}")
    ch = f["embed_check"]
    print(f"ratio Ray/plain ({tc} thread{'s' if tc > 1 else ''} each): products/s {f['embed_ratio_ray_over_plain']:.3f}, "
          f"compute-only {f['embed_compute_ratio_ray_over_plain']:.3f}; same ids: {ch['same_product_ids']}, "
          f"max |Ray - plain| {ch['max_abs_diff']}")
    print("(Ray wall = read_parquet -> actor start + model load -> embed -> write_parquet; "
          "plain wall = load_encoder + read + texts + encode)")
    print()
    ix = f["index"]
    q = ix["queries"]
    print(f"INDEX ({ix['vectors']:,} vectors; recall@{ix['k']} against flat; FAISS {ix['faiss_threads']} thread; "
          f"{q['validation_queries']} validation queries, {q['first_products']} products as queries)")
    header = (f"{'index':<6} {'params':<28} {'build s':>8} {'val recall':>10} {'val q/s':>10} "
              f"{'prod recall':>11} {'prod q/s':>10}")
    print(header)
    print("-" * len(header))
    for kind in ("flat", "hnsw", "ivf"):
        e = ix[kind]
        params = {"flat": "exact", "hnsw": f"M={e.get('m')} efS={e.get('ef_search')} efC={e.get('ef_construction')}",
                  "ivf": f"nlist={e.get('nlist')} nprobe={e.get('nprobe')}"}[kind]
        v, pr = e["validation_queries"], e["first_products"]
        print(f"{kind:<6} {params:<28} {e['build_seconds']:>8.3f} {v['recall_at_k']:>10.3f} {v['queries_per_s']:>10.0f} "
              f"{pr['recall_at_k']:>11.3f} {pr['queries_per_s']:>10.0f}")
    print()
    print_contention(f["machine"])


if __name__ == "__main__":
    sys.exit(main())
