"""The whole pipeline: data, encoder, its ONNX export, embedding and index, ranking features, ranker, evaluation,
then variants A and B registered. Finished stages are skipped, so a rerun continues after a crash.

    python jobs/pipeline.py --config demo
    ray job submit --working-dir . -- python jobs/pipeline.py --config demo --set run.root=$PWD/runs

With --sweep, the encoder and ranker sweeps (tune/) run first and the pipeline trains with
their best config; an interrupted sweep continues when the same command is run again:

    python jobs/pipeline.py --config tiny --sweep --sweep-samples 4
"""

from __future__ import annotations

import ray

from shoprank.entrypoint import config_from_args, job_parser, ray_init_options, setup_logging, user_errors
from shoprank.pipeline import SweepPlan, run_pipeline, swept_config

if __name__ == "__main__":
    setup_logging()
    parser = job_parser(__doc__)
    parser.add_argument("--sweep", action="store_true", help="sweep the encoder, then the ranker, and train with the best")
    parser.add_argument("--sweep-samples", type=int, default=SweepPlan.num_samples, help="trials per sweep")
    parser.add_argument("--sweep-time-budget-s", type=float, default=None, help="time budget per sweep")
    with user_errors():
        args = parser.parse_args()
        config = config_from_args(args)
        with ray_init_options(config.ray, dashboard=args.sweep) as options:
            ray.init(**options)
        found = {}
        if args.sweep:
            config, found = swept_config(args.config, args.set, SweepPlan(args.sweep_samples, args.sweep_time_budget_s))
        print(run_pipeline(config, sweeps=found).render())
