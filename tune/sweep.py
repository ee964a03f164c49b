"""Shared entrypoint of tune/sweep_encoder.py and tune/sweep_ranker.py (see shoprank.sweep)."""

from __future__ import annotations

import argparse
from pathlib import Path

import ray

from shoprank.entrypoint import config_from_args, ray_init_kwargs, setup_logging, user_errors
from shoprank.sweep import run_sweep

HERE = Path(__file__).resolve().parent


def main(kind: str, doc: str) -> None:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo", help="preset name or YAML path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--space", default=str(HERE / f"{kind}_space.yaml"))
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--max-concurrent-trials", type=int, default=None,
                        help="default: as many as the cluster's CPUs (GPUs with ray.use_gpu) allow")
    parser.add_argument("--time-budget-s", type=float, default=None)
    parser.add_argument("--search", choices=["optuna", "random"], default="optuna")
    setup_logging()
    with user_errors():
        args = parser.parse_args()
        config = config_from_args(args)
        kwargs = ray_init_kwargs(config.ray)
        if kwargs.get("address") == "local":
            # Ray Train's placement-group cleaner needs the State API (the dashboard) to free
            # the CPUs of a trial that ASHA stopped; without it the next trial waits forever.
            kwargs["include_dashboard"] = True
        ray.init(**kwargs)
        outcome = run_sweep(kind, args.config, args.set, args.space, num_samples=args.num_samples,
                            max_concurrent_trials=args.max_concurrent_trials, time_budget_s=args.time_budget_s,
                            search=args.search)
        print((outcome.directory / "results.md").read_text())
        print(f"best validation NDCG@10 {outcome.best_metric:.4f}: {outcome.best_params}")
        print(f"best config: {outcome.best_config}  (python jobs/pipeline.py --config {outcome.best_config})")
