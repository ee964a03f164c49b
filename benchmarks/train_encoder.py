"""Benchmark: encoder fine-tuning on Ray Train (TorchTrainer, 1 worker) against a plain PyTorch loop.

Usage (from the repository root)::

    .venv/bin/python benchmarks/train_encoder.py                          # demo preset, 30 steps, batch 32
    .venv/bin/python benchmarks/train_encoder.py --steps 3 --batch-size 8 \\
        --set source.synthetic.num_products=300 --set source.synthetic.num_sessions=500
    .venv/bin/python benchmarks/train_encoder.py --model /path/to/local/model --root /tmp/bench --json out.json

The embedding job and the index are measured by ``benchmarks/embed.py``.

What it does (one local Ray cluster, ``num_cpus=2``):

1. **Data**: the ``demo`` preset (or ``--preset``) with ``run.root`` in a temporary directory (or
   ``--root``), generated and preprocessed by ``run_stages(until="preprocess")``; the training tables come from the
   library's ``build_training_tables`` (query-product rows with hard negatives, co-engagement pairs).
2. **Training throughput**, same model (``encoder.model``, the packaged MiniLM by default), same
   tokenized rows, same batch size, same number of steps, same model construction (the library's
   ``build_model``: LoRA-wrapped backbone + category head) and the same optimisation: the library's
   ``Optimisation``, which ``train_loop_per_worker`` steps with (losses weighted by the config,
   AdamW with the config's lr and weight decay, linear warm-up then decay over the benchmark's
   steps, gradient clipping at 1.0, the config's gradient accumulation), same seed:

   a. **Ray Train**: a ``TorchTrainer`` with ``encoder.train.num_workers`` (1) worker of
      ``cpus_per_worker`` CPUs (as the preset says). The rows are tokenized by Ray Data with the library's
      ``Tokenize`` exactly as ``train_encoder`` does (materialised before ``fit``). The worker does
      ``--steps`` steps over ``get_dataset_shard("train").iter_torch_batches`` (and the ``pairs``
      shard); only the step loop is timed (each step: fetch the batches, then ``Optimisation.step``:
      forward, backward, clip, optimiser step); it reports samples/s with ``ray.train.report``.
      ``trainer.fit()`` is also timed end to end (controller and worker start-up, model load, steps,
      report, shutdown).
   b. **Plain PyTorch, one process**: the same table tokenized by calling ``Tokenize`` directly, batches
      sliced from the arrays in order, the same step loop in the driver process.

   Threads: the Ray worker gets ``cpus_per_worker`` CPUs and, as ``train_loop_per_worker`` does, as
   many torch threads; the plain loop runs at that same thread count for the ratio, and also at
   the other count of {1, 2} (extra information, not part of the ratio). ``--set
   encoder.train.cpus_per_worker=1`` benchmarks a 1-CPU worker. Batches are full
   (``drop_last``) so every step sees exactly ``--batch-size`` query-product rows; an exhausted
   dataset starts over. A "samples" figure counts query-product rows; each row also encodes its
   positive and ``hard_negatives`` negatives, and each step a batch of co-engagement pairs.
3. **Report**: a table, then one JSON line with every figure. Nothing is asserted. A watcher notes,
   per phase, whether ``jobs/train_encoder.py`` ran meanwhile and how much CPU processes outside
   this benchmark used (200% = both cores of a 2-CPU machine).

Times are wall-clock times on a possibly shared 2-CPU machine: read them as indications, not limits.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from common import machine, print_contention, print_title, round_floats, run_benchmark, \
    setup_logging, versions, watched_ray

# --------------------------------------------------------------------------- shared step loop


def run_steps(optimisation: Any, next_qp: Any, next_pairs: Any, steps: int) -> dict[str, Any]:
    """``steps`` steps of the library's ``Optimisation``; the same code times the Ray worker and the plain loop.

    ``next_qp()`` / ``next_pairs()`` return the next batch (``next_pairs`` may return None).
    Returns total loop seconds, compute-only seconds (``Optimisation.step``: forward to
    optimiser step), per-step seconds, rows seen and the first / last loss.
    """
    optimisation.model.train()
    step_s: list[float] = []
    step_rows: list[int] = []
    compute_s = 0.0
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(steps):
        t0 = time.perf_counter()
        qp = next_qp()
        pairs = next_pairs()
        t1 = time.perf_counter()
        loss, _ = optimisation.step(step, qp, pairs, use_bf16=False)
        losses.append(float(loss))
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


def make_model(model_name: str, encoder: dict[str, Any], num_categories: int, steps: int) -> tuple[Any, Any, int]:
    """The library's model (``build_model``) as ``train_loop_per_worker`` builds it (rank 0), seeded.

    Returns the model, the ``EncoderConfig`` and the number of optimiser steps that ``steps``
    batches make (``gradient_accumulation`` batches each), for ``Optimisation``'s schedule.
    """
    import torch

    from shoprank.config import EncoderConfig
    from shoprank.encoder.model import load_backbone
    from shoprank.encoder.objectives import build_model

    config = EncoderConfig.model_validate(encoder)
    total_steps = max(1, steps // config.train.gradient_accumulation)
    torch.manual_seed(config.train.seed)
    backbone, _ = load_backbone(model_name)
    model = build_model(backbone, config, num_categories, total_steps)
    torch.manual_seed(config.train.seed + 1)  # the same dropout stream in both loops
    return model, config, total_steps


# --------------------------------------------------------------------------- (a) Ray Train worker


def bench_train_loop(loop: dict[str, Any]) -> None:
    """Ray Train worker: build the model, then time ``loop['steps']`` steps over the dataset shards."""
    import ray.train
    import ray.train.torch
    import torch

    from shoprank.encoder.objectives import Optimisation

    torch.set_num_threads(loop["threads"])
    setup_started = time.perf_counter()
    model, config, total_steps = make_model(loop["model"], loop["encoder"], loop["num_categories"], loop["steps"])
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    optimisation = Optimisation(model, config.train, total_steps)
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
    result = run_steps(optimisation, next_qp, next_pairs, loop["steps"])
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

    from shoprank.encoder.tokens import Tokenize

    encoder = config.encoder
    train = encoder.train

    def tokenized(table: pa.Table) -> Any:
        # exactly as shoprank.encoder.train.train_encoder tokenizes: a callable object (tasks, the
        # tokenizer pickled in), materialised before fit
        return ray.data.from_arrow(table).map_batches(
            Tokenize(encoder.model, encoder.max_length), num_cpus=0.5, batch_format="numpy",
        ).materialize()

    started = time.perf_counter()
    datasets = {"train": tokenized(qp)}
    if co.num_rows and train.coengagement_weight > 0:
        datasets["pairs"] = tokenized(co)
    tokenize_s = time.perf_counter() - started
    loop = {"model": encoder.model, "encoder": encoder.model_dump(mode="json"), "num_categories": num_categories,
            "steps": args.steps, "batch_size": args.batch_size, "threads": train.cpus_per_worker,
            "has_pairs": "pairs" in datasets}
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
    from shoprank.encoder.tokens import Tokenize

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

    from shoprank.encoder.objectives import Optimisation

    torch.set_num_threads(threads)
    setup_started = time.perf_counter()
    model, encoder, total_steps = make_model(config.encoder.model, config.encoder.model_dump(mode="json"),
                                             num_categories, args.steps)
    optimisation = Optimisation(model, encoder.train, total_steps)
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
    result = run_steps(optimisation, next_qp, next_pairs, args.steps)
    result.update(setup_seconds=setup_s, torch_threads=torch.get_num_threads(), qp_epochs=qp_state["epochs"],
                  pair_epochs=pair_state["epochs"])
    return result


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", "--preset", dest="preset", default="demo",
                        help="config preset or YAML file (default: demo)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override passed to load_config, repeatable (e.g. source.synthetic.num_products=300)")
    parser.add_argument("--model", default=None, help="encoder.model (default: the preset's, the packaged MiniLM)")
    parser.add_argument("--steps", type=int, default=30, help="training steps (batches) of each training loop")
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size (query-product rows)")
    parser.add_argument("--root", default=None, help="run root (kept); default: a temporary directory, removed")
    parser.add_argument("--json", default=None, help="also write the JSON figures to this file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 2:
        parser.error("--steps must be >= 1 and --batch-size >= 2")
    setup_logging()
    return run_benchmark(lambda root: _benchmark(args, root), args.root, "shoprank-bench-encoder-", args.json)


def _benchmark(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from shoprank.config import load_config
    from shoprank.encoder.train import build_training_tables
    from shoprank.stages import run_stages

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
                   "warmup_fraction": encoder.train.warmup_fraction,
                   "gradient_accumulation": encoder.train.gradient_accumulation,
                   "hard_negatives": encoder.train.hard_negatives, "description_chars": encoder.description_chars,
                   "num_workers": encoder.train.num_workers, "cpus_per_worker": encoder.train.cpus_per_worker},
        "machine": machine(),
        "versions": versions(),
    }
    with watched_ray(figures["machine"]) as watcher:
        # 1. data
        watcher.set_phase("prepare_data")
        started = time.perf_counter()
        run = run_stages(config, until="preprocess")
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
        same = figures["plain"][f"threads_{worker_threads}"]
        figures["train_threads_compared"] = worker_threads
        figures["train_ratio_ray_over_plain_same_threads"] = figures["ray_train"]["samples_per_s"] / same["samples_per_s"]
        figures["train_compute_ratio_ray_over_plain_same_threads"] = (
            figures["ray_train"]["compute_samples_per_s"] / same["compute_samples_per_s"])
    figures = round_floats(figures)
    _report(figures)
    return figures


def _report(f: dict[str, Any]) -> None:
    c, rt = f["config"], f["ray_train"]
    tc = f["train_threads_compared"]
    same = f["plain"][f"threads_{tc}"]
    extra = [(t, f["plain"][f"threads_{t}"]) for t in (1, 2) if t != tc]
    tt = f["training_tables"]
    print_title("encoder training benchmark", f["machine"], [
        f"model {c['model']} ({c['finetune']}), preset {c['preset']}, max_length {c['max_length']}, "
        f"description_chars {c['description_chars']}, {c['steps']} steps of batch {c['batch_size']}, "
        f"lr {c['learning_rate']} (warm-up {c['warmup_fraction']}, gradient accumulation "
        f"{c['gradient_accumulation']}), hard negatives {c['hard_negatives']}",
        f"data: prepare_data {f['prepare_data_seconds']:.1f} s; {tt['qp_rows']:,} query-product rows, "
        f"{tt['coengagement_rows']:,} co-engagement pairs, {tt['categories']} categories",
    ], width=104, versions_figures=f["versions"])
    print("TRAINING (samples = query-product rows; steps loop = fetch batches + Optimisation.step)")
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
    print_contention(f["machine"])


if __name__ == "__main__":
    sys.exit(main())
