"""Generate or read the shop's records and build the run's training data (Ray Data).

    python jobs/preprocess.py --config demo
    ray job submit --working-dir . -- python jobs/preprocess.py --config demo
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
        run = run_stages(config, until="preprocess")
        print(f"run directory: {run.uri()}")
