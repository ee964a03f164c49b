"""Benchmark: encoder fine-tuning on Ray Train and catalogue embedding on Ray Data, against plain PyTorch loops.

Usage (from the repository root)::

    .venv/bin/python benchmarks/train_encoder.py                          # demo preset, 30 steps, batch 32
    .venv/bin/python benchmarks/train_encoder.py --steps 3 --batch-size 8 \\
        --set source.synthetic.num_products=300 --set source.synthetic.num_sessions=500
    .venv/bin/python benchmarks/train_encoder.py --model /path/to/local/model --root /tmp/bench --json out.json

What it does (one local Ray cluster, ``num_cpus=2``):

1. **Data**: the ``demo`` preset (or ``--preset``) with ``run.root`` in a temporary directory (or
   ``--root``), generated and preprocessed by ``prepare_data``; the training tables come from the
   library's ``build_training_tables`` (query-product rows with hard negatives, co-engagement pairs).
2. **Training throughput**, same model (``encoder.model``, the packaged MiniLM by default), same
   tokenized rows, same batch size, same number of optimisation steps, same model construction
   (the library's ``build_model``: LoRA-wrapped backbone + category head, ``DualEncoderModel``'s
   losses weighted as in ``train_loop_per_worker``), same optimiser (AdamW, the config's lr and
   weight decay, gradient clipping at 1.0, no schedule), same seed:

   a. **Ray Train**: a ``TorchTrainer`` with ``encoder.train.num_workers`` (1) worker of
      ``cpus_per_worker`` CPUs (as the preset says). The rows are tokenized by Ray Data with the library's
      ``Tokenize`` exactly as ``train_encoder`` does (materialised before ``fit``). The worker does
      ``--steps`` steps over ``get_dataset_shard("train").iter_torch_batches`` (and the ``pairs``
      shard); only the step loop is timed (each step: fetch the batches, forward, backward, clip,
      optimiser step); it reports samples/s with ``ray.train.report``. ``trainer.fit()`` is also
      timed end to end (controller and worker start-up, model load, steps, report, shutdown).
   b. **Plain PyTorch, one process**: the same table tokenized by calling ``Tokenize`` directly, batches
      sliced from the arrays in order, the same step loop in the driver process.

   Threads: the Ray worker gets ``cpus_per_worker`` CPUs and, as ``train_loop_per_worker`` does, as
   many torch threads; the plain loop runs at that same thread count for the ratio, and also at
   the other count of {1, 2} (extra information, not part of the ratio). ``--set
   encoder.train.cpus_per_worker=1`` benchmarks a 1-CPU worker. Batches are full
   (``drop_last``) so every step sees exactly ``--batch-size`` query-product rows; an exhausted
   dataset starts over. A "samples" figure counts query-product rows; each row also encodes its
   positive and ``hard_negatives`` negatives, and each step a batch of co-engagement pairs.
3. **Embedding throughput** of the pretrained (not fine-tuned) encoder, saved as a plain model in
   ``<tmp>/merged`` so the library's ``load_encoder`` reads it: the Ray Data job of
   ``embed_and_index`` (``read_parquet`` -> ``map_batches(EmbedProducts, concurrency=1)`` ->
   ``write_parquet``; a thin subclass only pins torch to 1 thread and records each batch's call
   time) against a plain batched loop (``product_texts`` + ``encode``, same batch size) at 1 and 2
   threads. Both end to end (including model load / actor start-up) and compute only.
4. **Index quality**: ``build_index`` with ``flat``, ``hnsw`` and ``ivf`` over the catalogue
   embeddings (the Ray job's output in product-id order, as ``embed_and_index``); queries are the
   **validation queries** (``build_eval_data``, encoded with ``QUERY_MAX_LENGTH``); recall@10 of
   HNSW and IVF against the exact (flat) top 10, build time and queries/s (one batched
   ``search`` call, median of repeats, FAISS pinned to 1 thread). The first 500 products used as
   queries give a second recall figure.
5. **Report**: a table, then one JSON line with every figure. Nothing is asserted. A watcher notes,
   per phase, whether ``jobs/train_encoder.py`` ran meanwhile and how much CPU processes outside
   this benchmark used (200% = both cores of a 2-CPU machine).

Times are wall-clock times on a possibly shared 2-CPU machine: read them as indications, not limits.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa

LOSS_WEIGHT_KEYS = ("query_product", "coengagement", "category")


# --------------------------------------------------------------------------- shared step loop


def _loss_weights(train: Any) -> dict[str, float]:
    """The loss weights of ``train_loop_per_worker``."""
    return {"query_product": train.query_product_weight, "coengagement": train.coengagement_weight,
            "category": train.category_weight}


def run_steps(model: Any, optimizer: Any, trainable: list[Any], next_qp: Any, next_pairs: Any, steps: int,
              weights: dict[str, float]) -> dict[str, Any]:
    """``steps`` optimisation steps; the same code times the Ray worker and the plain loop.

    ``next_qp()`` / ``next_pairs()`` return the next batch (``next_pairs`` may return None).
    Returns total loop seconds, compute-only seconds (forward to optimiser step), per-step
    seconds, rows seen and the first / last loss.
    """
    import torch

    model.train()
    step_s: list[float] = []
    step_rows: list[int] = []
    compute_s = 0.0
    losses: list[float] = []
    started = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        qp = next_qp()
        pairs = next_pairs()
        t1 = time.perf_counter()
        parts = model(qp, pairs)
        loss = sum(weights[name] * value for name, value in parts.items())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        t2 = time.perf_counter()
        compute_s += t2 - t1
        step_s.append(t2 - t0)
        step_rows.append(int(qp["q_ids"].shape[0]))
    total_s = time.perf_counter() - started
    rows = sum(step_rows)
    skip = 1 if steps > 1 else 0  # steady state: without the first step
    return {
        "steps": steps, "rows": rows, "seconds": total_s, "compute_seconds": compute_s,
        "data_seconds": total_s - compute_s,
        "samples_per_s": rows / total_s, "compute_samples_per_s": rows / compute_s,
        "steady_samples_per_s": sum(step_rows[skip:]) / sum(step_s[skip:]),
        "first_step_s": step_s[0], "median_step_s": statistics.median(step_s),
        "first_loss": losses[0], "last_loss": losses[-1], "mean_loss": sum(losses) / len(losses),
    }


def make_model(model_name: str, encoder: dict[str, Any], num_categories: int, steps: int) -> tuple[Any, Any, list[Any]]:
    """The library's model (``build_model``) and AdamW as ``train_loop_per_worker`` builds them, seeded."""
    import torch

    from shoprank.config import EncoderConfig
    from shoprank.encoder.model import load_backbone

    try:  # newer layout: the model and losses live in shoprank.encoder.objectives
        from shoprank.encoder.objectives import build_model
    except ImportError:
        from shoprank.encoder.train import build_model

    config = EncoderConfig.model_validate(encoder)
    torch.manual_seed(config.train.seed)
    backbone, _ = load_backbone(model_name)
    model = build_model(backbone, config, num_categories, total_steps=steps)
    torch.manual_seed(config.train.seed + 1)  # the same dropout stream in both loops
    return model, config, [p for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- (a) Ray Train worker


def bench_train_loop(loop: dict[str, Any]) -> None:
    """Ray Train worker: build the model, then time ``loop['steps']`` steps over the dataset shards."""
    import ray.train
    import ray.train.torch
    import torch

    torch.set_num_threads(loop["threads"])
    setup_started = time.perf_counter()
    model, config, trainable = make_model(loop["model"], loop["encoder"], loop["num_categories"], loop["steps"])
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    optimizer = torch.optim.AdamW(trainable, lr=config.train.learning_rate, weight_decay=config.train.weight_decay)
    batch_size = loop["batch_size"]

    def cycling(name: str) -> Any:
        shard = ray.train.get_dataset_shard(name)
        state = {"it": None, "epochs": 0}

        def next_batch() -> Any:
            while True:
                if state["it"] is None:
                    state["it"] = iter(shard.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device))
                    state["epochs"] += 1
                try:
                    return next(state["it"])
                except StopIteration:
                    state["it"] = None

        return next_batch, state

    next_qp, qp_state = cycling("train")
    if loop["has_pairs"]:
        next_pairs, pair_state = cycling("pairs")
    else:
        next_pairs, pair_state = (lambda: None), {"epochs": 0}
    setup_s = time.perf_counter() - setup_started
    result = run_steps(model, optimizer, trainable, next_qp, next_pairs, loop["steps"], loop["weights"])
    result.update(setup_seconds=setup_s, torch_threads=torch.get_num_threads(), qp_epochs=qp_state["epochs"],
                  pair_epochs=pair_state["epochs"], omp_num_threads=os.environ.get("OMP_NUM_THREADS", ""))
    metrics = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in result.items()}
    # Ray Train V2 keeps only metrics reported with a checkpoint in ``Result.metrics``: attach a tiny one.
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def ray_train_benchmark(config: Any, qp: pa.Table, co: pa.Table, num_categories: int, args: argparse.Namespace,
                        storage: Path) -> dict[str, Any]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from shoprank.encoder.train import Tokenize

    encoder = config.encoder
    train = encoder.train

    def tokenized(table: pa.Table) -> Any:
        # exactly as shoprank.encoder.train.train_encoder tokenizes (materialised before fit)
        return ray.data.from_arrow(table).map_batches(
            Tokenize, fn_constructor_args=(encoder.model, encoder.max_length), concurrency=1,
            num_cpus=0.5, batch_format="numpy",
        ).materialize()

    started = time.perf_counter()
    datasets = {"train": tokenized(qp)}
    if co.num_rows and train.coengagement_weight > 0:
        datasets["pairs"] = tokenized(co)
    tokenize_s = time.perf_counter() - started
    loop = {"model": encoder.model, "encoder": encoder.model_dump(mode="json"), "num_categories": num_categories,
            "steps": args.steps, "batch_size": args.batch_size, "threads": train.cpus_per_worker, "has_pairs": "pairs" in datasets,
            "weights": _loss_weights(train)}
    trainer = TorchTrainer(
        bench_train_loop,
        train_loop_config=loop,
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=False,
                                     resources_per_worker={"CPU": train.cpus_per_worker}),
        run_config=RunConfig(name="bench-encoder", storage_path=str(storage)),
        datasets=datasets,
    )
    started = time.perf_counter()
    result = trainer.fit()
    fit_s = time.perf_counter() - started
    if result.error is not None:
        raise result.error
    if result.metrics:
        metrics = dict(result.metrics)
    elif result.checkpoint is not None:
        with result.checkpoint.as_directory() as directory:
            metrics = json.loads((Path(directory) / "metrics.json").read_text())
    else:
        raise RuntimeError("the Ray Train worker reported no metrics")
    metrics.update(fit_wall_seconds=fit_s, tokenize_seconds=tokenize_s, num_workers=train.num_workers,
                   cpus_per_worker=train.cpus_per_worker)
    return metrics


# --------------------------------------------------------------------------- (b) plain PyTorch loop


def tokenize_directly(model: str, max_length: int, table: pa.Table) -> dict[str, np.ndarray]:
    """The library's ``Tokenize`` called on the whole table, as Ray Data's numpy batch would look."""
    from shoprank.encoder.train import Tokenize

    batch: dict[str, np.ndarray] = {}
    for name in table.column_names:
        values = table.column(name).to_pylist()
        if name == "category":
            batch[name] = np.asarray(values, dtype=np.int64)
        else:
            array = np.empty(len(values), dtype=object)
            array[:] = [list(v) if isinstance(v, list) else v for v in values]
            batch[name] = array
    return Tokenize(model, max_length)(batch)


def plain_benchmark(config: Any, qp_tokens: dict[str, np.ndarray], co_tokens: dict[str, np.ndarray] | None,
                    num_categories: int, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    train = config.encoder.train
    setup_started = time.perf_counter()
    model, encoder, trainable = make_model(config.encoder.model, config.encoder.model_dump(mode="json"),
                                           num_categories, args.steps)
    optimizer = torch.optim.AdamW(trainable, lr=encoder.train.learning_rate, weight_decay=encoder.train.weight_decay)
    batch_size = args.batch_size

    def cycling(arrays: dict[str, np.ndarray]) -> tuple[Any, dict[str, int]]:
        rows = len(next(iter(arrays.values())))
        full = rows // batch_size
        state = {"i": 0, "epochs": 1}

        def next_batch() -> dict[str, torch.Tensor]:
            if state["i"] >= full:
                state["i"] = 0
                state["epochs"] += 1
            start = state["i"] * batch_size
            state["i"] += 1
            return {k: torch.from_numpy(np.ascontiguousarray(v[start:start + batch_size])) for k, v in arrays.items()}

        return next_batch, state

    next_qp, qp_state = cycling(qp_tokens)
    if co_tokens is not None:
        next_pairs, pair_state = cycling(co_tokens)
    else:
        next_pairs, pair_state = (lambda: None), {"epochs": 0}
    setup_s = time.perf_counter() - setup_started
    result = run_steps(model, optimizer, trainable, next_qp, next_pairs, args.steps, _loss_weights(train))
    result.update(setup_seconds=setup_s, torch_threads=torch.get_num_threads(), qp_epochs=qp_state["epochs"],
                  pair_epochs=pair_state["epochs"])
    return result


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


def ray_embed_benchmark(config: Any, run: Any, model_dir: Path, out_dir: Path) -> tuple[dict[str, Any], pa.Table]:
    import pyarrow.dataset as pads
    import ray
    from ray.data import SaveMode

    from shoprank.data.io import PartFilenames

    embed = config.embed
    started = time.perf_counter()
    products = ray.data.read_parquet(run.uri("data", "products"), filesystem=run.filesystem_for_ray)
    products.map_batches(
        _embed_actor_class(),
        fn_constructor_args=(str(model_dir), config.encoder.model_dump(mode="json"), embed.batch_size, False),
        batch_size=embed.batch_size, concurrency=embed.actors, num_gpus=0, batch_format="pyarrow",
    ).write_parquet(str(out_dir), filename_provider=PartFilenames(), mode=SaveMode.OVERWRITE)
    wall_s = time.perf_counter() - started
    table = pads.dataset(str(out_dir), format="parquet").to_table().sort_by("product_id")
    compute_s = float(table.column("bench_call_s").to_numpy().sum())
    n = table.num_rows
    result = {"products": n, "wall_seconds": wall_s, "products_per_s": n / wall_s,
              "compute_seconds": compute_s, "compute_products_per_s": n / compute_s,
              "actors": embed.actors, "batch_size": embed.batch_size}
    return result, table.drop_columns(["bench_call_s"])


def plain_embed_benchmark(config: Any, run: Any, model_dir: Path, threads: int) -> tuple[dict[str, Any], np.ndarray, list[str]]:
    import torch

    from shoprank.data.io import read_table
    from shoprank.encoder.model import encode, load_encoder, product_texts

    torch.set_num_threads(threads)
    started = time.perf_counter()
    encoder, tokenizer = load_encoder(model_dir, "merged")
    products = read_table(run, "data", "products")
    load_s = time.perf_counter() - started
    compute_started = time.perf_counter()
    texts = product_texts(products, config.encoder)
    vectors = encode(encoder, tokenizer, texts, config.encoder.max_length, batch_size=config.embed.batch_size)
    compute_s = time.perf_counter() - compute_started
    wall_s = time.perf_counter() - started
    n = len(texts)
    return ({"products": n, "wall_seconds": wall_s, "products_per_s": n / wall_s, "load_seconds": load_s,
             "compute_seconds": compute_s, "compute_products_per_s": n / compute_s, "torch_threads": threads,
             "batch_size": config.embed.batch_size},
            vectors, products.column("product_id").to_pylist())


# --------------------------------------------------------------------------- index


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    hits = [len(set(a[:k]) & set(e[:k]) - {-1}) / k for a, e in zip(approx, exact)]
    return float(np.mean(hits)) if hits else 0.0


def index_benchmark(config: Any, vectors: np.ndarray, query_sets: dict[str, np.ndarray], k: int,
                    repeats: int) -> dict[str, Any]:
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


def _round(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _round(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v, digits) for v in value]
    return value


def _other_jobs() -> list[str]:
    try:
        out = subprocess.run(["pgrep", "-af", "jobs/train_encoder.py"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line for line in out.stdout.splitlines() if line.strip()]


class ContentionWatcher:
    """Every ``interval`` s, notes per benchmark phase whether another ``jobs/train_encoder.py`` runs,
    and the highest 1-minute load average: figures of a phase that shared the CPUs are suspect."""

    def __init__(self, interval: float = 5.0) -> None:
        import threading

        self.interval = interval
        self.phase = "startup"
        self.phases: dict[str, dict[str, Any]] = {}
        self._procs: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="contention-watcher", daemon=True)

    def start(self) -> "ContentionWatcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()

    def set_phase(self, phase: str) -> None:
        self.sample()
        self.phase = phase

    def _outside_cpu_percent(self) -> float | None:
        """CPU % of processes outside this benchmark's process tree since the previous sample."""
        me = psutil.Process()
        mine = {me.pid, *(c.pid for c in me.children(recursive=True))}
        total, first = 0.0, not self._procs
        seen = set()
        for proc in psutil.process_iter():
            if proc.pid in mine:
                continue
            seen.add(proc.pid)
            cached = self._procs.setdefault(proc.pid, proc)
            try:
                total += cached.cpu_percent(None)  # 0.0 on the first call for a process
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        self._procs = {pid: p for pid, p in self._procs.items() if pid in seen}
        return None if first else total

    def sample(self) -> None:
        entry = self.phases.setdefault(self.phase, {"other_jobs_seen": 0, "max_loadavg_1m": 0.0,
                                                    "outside_cpu_percent_samples": []})
        entry["other_jobs_seen"] = max(entry["other_jobs_seen"], len(_other_jobs()))
        entry["max_loadavg_1m"] = max(entry["max_loadavg_1m"], round(os.getloadavg()[0], 2))
        outside = self._outside_cpu_percent()
        if outside is not None:
            entry["outside_cpu_percent_samples"].append(outside)

    def summary(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, entry in self.phases.items():
            samples = entry["outside_cpu_percent_samples"]
            out[name] = {"other_jobs_seen": entry["other_jobs_seen"], "max_loadavg_1m": entry["max_loadavg_1m"],
                         "outside_cpu_percent_mean": round(sum(samples) / len(samples), 1) if samples else None,
                         "outside_cpu_percent_max": round(max(samples), 1) if samples else None}
        return out

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def shared(self) -> list[str]:
        return [name for name, entry in self.phases.items() if entry["other_jobs_seen"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo", help="config preset or YAML file (default: demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override passed to load_config, repeatable (e.g. source.synthetic.num_products=300)")
    parser.add_argument("--model", default=None, help="encoder.model (default: the preset's, the packaged MiniLM)")
    parser.add_argument("--steps", type=int, default=30, help="optimisation steps of each training loop")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size (query-product rows)")
    parser.add_argument("--search-repeats", type=int, default=5, help="timed repeats of each index search")
    parser.add_argument("--root", default=None, help="run root (kept); default: a temporary directory, removed")
    parser.add_argument("--json", default=None, help="also write the JSON figures to this file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 2:
        parser.error("--steps must be >= 1 and --batch-size >= 2")

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in ("shoprank", "bench"):
        logging.getLogger(name).setLevel(logging.INFO)

    keep_root = args.root is not None
    root = Path(args.root).resolve() if keep_root else Path(tempfile.mkdtemp(prefix="shoprank-bench-encoder-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        line = _benchmark(args, root)
    finally:
        if not keep_root:
            shutil.rmtree(root, ignore_errors=True)
    sys.stdout.flush()
    print(line, flush=True)
    return 0


def _benchmark(args: argparse.Namespace, root: Path) -> str:
    import ray
    import torch
    from ray.data.context import DataContext

    from shoprank.config import load_config
    from shoprank.data.stages import prepare_data
    from shoprank.encoder.model import QUERY_MAX_LENGTH, encode, load_backbone
    from shoprank.encoder.train import build_eval_data, build_training_tables

    log = logging.getLogger("bench")
    overrides = [f"run.root={root}", "run.name=bench-train-encoder", "ray.num_cpus=2", *args.overrides]
    if args.model:
        overrides.append(f"encoder.model={args.model}")
    config = load_config(args.preset, overrides)
    encoder = config.encoder
    figures: dict[str, Any] = {
        "config": {"preset": args.preset, "overrides": overrides[3:], "model": encoder.model,
                   "finetune": encoder.finetune, "max_length": encoder.max_length, "steps": args.steps,
                   "batch_size": args.batch_size, "learning_rate": encoder.train.learning_rate,
                   "hard_negatives": encoder.train.hard_negatives, "embed_batch_size": config.embed.batch_size,
                   "description_chars": encoder.description_chars,
                   "num_workers": encoder.train.num_workers, "cpus_per_worker": encoder.train.cpus_per_worker},
        "machine": {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
                    "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                    "other_train_encoder_jobs_at_start": len(_other_jobs())},
        "versions": {"torch": torch.__version__, "ray": ray.__version__},
    }
    watcher = ContentionWatcher().start()
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        DataContext.get_current().enable_progress_bars = False

        # 1. data
        watcher.set_phase("prepare_data")
        started = time.perf_counter()
        run = prepare_data(config)
        figures["prepare_data_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        qp, co, num_categories = build_training_tables(run, encoder)
        figures["training_tables"] = {"qp_rows": qp.num_rows, "coengagement_rows": co.num_rows,
                                      "categories": num_categories,
                                      "seconds": time.perf_counter() - started}
        log.info("data ready: %d query-product rows, %d co-engagement pairs, %d categories",
                 qp.num_rows, co.num_rows, num_categories)
        use_pairs = co.num_rows > 0 and encoder.train.coengagement_weight > 0

        # 2a. Ray Train
        log.info("Ray Train: %d steps of batch %d ...", args.steps, args.batch_size)
        watcher.set_phase("train_ray")
        figures["ray_train"] = ray_train_benchmark(config, qp, co, num_categories, args, root / "ray-train")

        # 2b. plain loop (same table, Tokenize called directly)
        watcher.set_phase("train_plain_tokenize")
        started = time.perf_counter()
        qp_tokens = tokenize_directly(encoder.model, encoder.max_length, qp)
        co_tokens = tokenize_directly(encoder.model, encoder.max_length, co) if use_pairs else None
        tokenize_s = time.perf_counter() - started
        figures["plain"] = {}
        worker_threads = int(figures["ray_train"]["torch_threads"])
        for threads in (worker_threads, *[t for t in (1, 2) if t != worker_threads]):
            log.info("plain PyTorch loop, %d thread(s): %d steps ...", threads, args.steps)
            watcher.set_phase(f"train_plain_{threads}_thread")
            figures["plain"][f"threads_{threads}"] = plain_benchmark(config, qp_tokens, co_tokens, num_categories,
                                                                     args, threads)
        figures["plain"]["tokenize_seconds"] = tokenize_s
        del qp_tokens, co_tokens
        same = figures["plain"][f"threads_{worker_threads}"]
        figures["train_threads_compared"] = worker_threads
        figures["train_ratio_ray_over_plain_same_threads"] = figures["ray_train"]["samples_per_s"] / same["samples_per_s"]
        figures["train_compute_ratio_ray_over_plain_same_threads"] = (
            figures["ray_train"]["compute_samples_per_s"] / same["compute_samples_per_s"])

        # 3. embedding
        watcher.set_phase("embed_save_model")
        model_dir = root / "pretrained-encoder"
        backbone, tokenizer = load_backbone(encoder.model)
        backbone.save_pretrained(model_dir / "merged")
        tokenizer.save_pretrained(model_dir / "merged")
        del backbone
        log.info("Ray Data embedding ...")
        watcher.set_phase("embed_ray")
        ray_embed, ray_table = ray_embed_benchmark(config, run, model_dir, root / "bench-embeddings")
        figures["embed_ray"] = ray_embed
        figures["embed_plain"] = {}
        plain_vectors: np.ndarray | None = None
        plain_ids: list[str] = []
        for threads in (1, 2):
            log.info("plain embedding loop, %d thread(s) ...", threads)
            watcher.set_phase(f"embed_plain_{threads}_thread")
            result, vectors, ids = plain_embed_benchmark(config, run, model_dir, threads)
            figures["embed_plain"][f"threads_{threads}"] = result
            if plain_vectors is None:
                plain_vectors, plain_ids = vectors, ids
        ray_vectors = np.stack(ray_table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
        ray_ids = ray_table.column("product_id").to_pylist()
        order = np.argsort(np.array(plain_ids))
        assert plain_vectors is not None
        same_ids = [plain_ids[i] for i in order] == ray_ids
        figures["embed_check"] = {
            "same_product_ids": same_ids,
            "max_abs_diff": float(np.abs(plain_vectors[order] - ray_vectors).max()) if same_ids else None,
        }
        figures["embed_ratio_ray_over_plain_1_thread"] = (
            ray_embed["products_per_s"] / figures["embed_plain"]["threads_1"]["products_per_s"])
        figures["embed_compute_ratio_ray_over_plain_1_thread"] = (
            ray_embed["compute_products_per_s"] / figures["embed_plain"]["threads_1"]["compute_products_per_s"])

        # 4. index quality (catalogue = the Ray job's embeddings in product-id order, as embed_and_index)
        watcher.set_phase("index")
        torch.set_num_threads(1)
        from shoprank.encoder.model import load_encoder

        query_encoder, query_tokenizer = load_encoder(model_dir, "merged")
        eval_data = build_eval_data(run, encoder, "validation")
        query_texts = list(eval_data.queries.values())
        query_sets = {"validation_queries": encode(query_encoder, query_tokenizer, query_texts, QUERY_MAX_LENGTH,
                                                   batch_size=config.embed.batch_size),
                      "first_500_products": ray_vectors[:500]}
        figures["index"] = index_benchmark(config, ray_vectors, query_sets, k=10, repeats=args.search_repeats)
    finally:
        watcher.set_phase("shutdown")
        ray.shutdown()
        watcher.stop()
    figures["machine"]["phases"] = watcher.summary()
    figures["machine"]["phases_sharing_cpus_with_jobs_train_encoder"] = watcher.shared()
    figures["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    figures["machine"]["other_train_encoder_jobs_at_end"] = len(_other_jobs())
    figures = _round(figures)
    _report(figures)
    line = json.dumps(figures, sort_keys=True, default=str)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return line


def _report(f: dict[str, Any]) -> None:
    c, rt = f["config"], f["ray_train"]
    tc = f["train_threads_compared"]
    same = f["plain"][f"threads_{tc}"]
    extra = [(t, f["plain"][f"threads_{t}"]) for t in (1, 2) if t != tc]
    width = 104
    print()
    print("=" * width)
    print(f"shoprank encoder benchmark  ({f['machine']['cpus']} CPUs, {f['machine']['memory_gib']} GiB; "
          f"Ray local cluster num_cpus=2; torch {f['versions']['torch']}, ray {f['versions']['ray']})")
    print(f"model {c['model']} ({c['finetune']}), preset {c['preset']}, max_length {c['max_length']}, "
          f"description_chars {c['description_chars']}, "
          f"{c['steps']} steps of batch {c['batch_size']}, lr {c['learning_rate']}, "
          f"hard negatives {c['hard_negatives']}")
    tt = f["training_tables"]
    print(f"data: prepare_data {f['prepare_data_seconds']:.1f} s; {tt['qp_rows']:,} query-product rows, "
          f"{tt['coengagement_rows']:,} co-engagement pairs, {tt['categories']} categories; "
          f"load avg at start {f['machine']['loadavg_start']}, other train_encoder jobs at start: "
          f"{f['machine']['other_train_encoder_jobs_at_start']}")
    print("=" * width)
    print("TRAINING (samples = query-product rows; steps loop = fetch batches + forward/backward/step)")
    header = (f"{'loop':<34} {'threads':>7} {'steps s':>8} {'samples/s':>10} {'compute s':>10} "
              f"{'compute/s':>10} {'steady/s':>9} {'1st loss':>9}")
    print(header)
    print("-" * len(header))
    rows = [(f"Ray Train ({c['num_workers']} worker, {c['cpus_per_worker']} CPU)", rt),
            ("plain PyTorch, one process", same)]
    rows += [(f"plain PyTorch (extra: {t} thread{'s' if t > 1 else ''})", r) for t, r in extra]
    for name, r in rows:
        print(f"{name:<34} {int(r['torch_threads']):>7} {r['seconds']:>8.2f} {r['samples_per_s']:>10.1f} "
              f"{r['compute_seconds']:>10.2f} {r['compute_samples_per_s']:>10.1f} {r['steady_samples_per_s']:>9.1f} "
              f"{r['first_loss']:>9.4f}")
    print(f"ratio Ray/plain ({tc} thread{'s' if tc > 1 else ''} each): samples/s "
          f"{f['train_ratio_ray_over_plain_same_threads']:.3f}, "
          f"compute-only {f['train_compute_ratio_ray_over_plain_same_threads']:.3f}; "
          f"batch fetch time in the loop: Ray {rt['data_seconds']:.3f} s, plain {same['data_seconds']:.3f} s; "
          f"same first/last loss: {rt['first_loss'] == same['first_loss'] and rt['last_loss'] == same['last_loss']}")
    print(f"Ray trainer.fit() wall time {rt['fit_wall_seconds']:.1f} s end to end (in-worker model setup "
          f"{rt['setup_seconds']:.1f} s, steps {rt['seconds']:.1f} s); Ray Data tokenize+materialize before fit "
          f"{rt['tokenize_seconds']:.1f} s vs Tokenize called directly {f['plain']['tokenize_seconds']:.1f} s")
    print()
    er, e1, e2 = f["embed_ray"], f["embed_plain"]["threads_1"], f["embed_plain"]["threads_2"]
    print(f"EMBEDDING ({er['products']:,} products, pretrained encoder, batch {er['batch_size']})")
    header = f"{'job':<40} {'threads':>7} {'wall s':>8} {'products/s':>11} {'compute s':>10} {'compute/s':>10}"
    print(header)
    print("-" * len(header))
    for name, r, threads in ((f"Ray Data map_batches ({er['actors']} actor)", er, 1),
                             ("plain encode(), one process", e1, 1), ("plain encode() (extra: 2 threads)", e2, 2)):
        print(f"{name:<40} {threads:>7} {r['wall_seconds']:>8.2f} {r['products_per_s']:>11.1f} "
              f"{r['compute_seconds']:>10.2f} {r['compute_products_per_s']:>10.1f}")
    ch = f["embed_check"]
    print(f"ratio Ray/plain (1 thread each): products/s {f['embed_ratio_ray_over_plain_1_thread']:.3f}, "
          f"compute-only {f['embed_compute_ratio_ray_over_plain_1_thread']:.3f}; same ids: {ch['same_product_ids']}, "
          f"max |Ray - plain| {ch['max_abs_diff']}")
    print("(Ray wall = read_parquet -> actor start + model load -> embed -> write_parquet; "
          "plain wall = load_encoder + read + texts + encode)")
    print()
    ix = f["index"]
    q = ix["queries"]
    print(f"INDEX ({ix['vectors']:,} vectors; recall@{ix['k']} against flat; FAISS {ix['faiss_threads']} thread; "
          f"{q['validation_queries']} validation queries, {q['first_500_products']} products as queries)")
    header = (f"{'index':<6} {'params':<28} {'build s':>8} {'val recall':>10} {'val q/s':>10} "
              f"{'prod recall':>11} {'prod q/s':>10}")
    print(header)
    print("-" * len(header))
    for kind in ("flat", "hnsw", "ivf"):
        e = ix[kind]
        params = {"flat": "exact", "hnsw": f"M={e.get('m')} efS={e.get('ef_search')} efC={e.get('ef_construction')}",
                  "ivf": f"nlist={e.get('nlist')} nprobe={e.get('nprobe')}"}[kind]
        v, pr = e["validation_queries"], e["first_500_products"]
        print(f"{kind:<6} {params:<28} {e['build_seconds']:>8.3f} {v['recall_at_k']:>10.3f} {v['queries_per_s']:>10.0f} "
              f"{pr['recall_at_k']:>11.3f} {pr['queries_per_s']:>10.0f}")
    print(f"(load avg at end {f['machine']['loadavg_end']}, other train_encoder jobs at end: "
          f"{f['machine']['other_train_encoder_jobs_at_end']})")
    shared = f["machine"]["phases_sharing_cpus_with_jobs_train_encoder"]
    print("phases during which jobs/train_encoder.py also ran (their times are suspect): "
          + (", ".join(shared) if shared else "none"))
    print("CPU used by processes outside this benchmark, mean/max % per phase (200% = 2 cores busy): " + ", ".join(
        f"{name} {entry['outside_cpu_percent_mean']}/{entry['outside_cpu_percent_max']}"
        for name, entry in f["machine"]["phases"].items()))
    print("max 1-min load average per phase: " + ", ".join(
        f"{name} {entry['max_loadavg_1m']}" for name, entry in f["machine"]["phases"].items()))
    print()


if __name__ == "__main__":
    sys.exit(main())
