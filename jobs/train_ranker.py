"""Build ranking features with Ray Data and train the XGBoost ranker on Ray Train (earlier stages skipped when current).

    python jobs/train_ranker.py --config demo
    ray job submit --working-dir . -- python jobs/train_ranker.py --config demo
"""

from __future__ import annotations

import ray

from shoprank.entrypoint import config_from_args, job_parser, ray_init_options, setup_logging, user_errors
from shoprank.stages import run_stages

if __name__ == "__main__":
    setup_logging()
    with user_errors():
        config = config_from_args(job_parser(__doc__).parse_args())
        with ray_init_options(config.ray) as options:
            ray.init(**options)
        run = run_stages(config, until="ranker")
        print({k: v for k, v in run.manifest()["stages"]["ranker"]["metrics"].items()})
        print(f"run directory: {run.uri()}")
