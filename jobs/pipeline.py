"""The whole pipeline: data, encoder, embedding and index, ranking features, ranker, evaluation,
then variants A and B registered. Finished stages are skipped, so a rerun continues after a crash.

    python jobs/pipeline.py --config demo
    ray job submit --working-dir . -- python jobs/pipeline.py --config demo --set run.root=$PWD/runs
"""

from __future__ import annotations

import ray

from shoprank.entrypoint import config_from_args, job_parser, ray_init_kwargs, setup_logging, user_errors
from shoprank.pipeline import run_pipeline

if __name__ == "__main__":
    setup_logging()
    with user_errors():
        config = config_from_args(job_parser(__doc__).parse_args())
        ray.init(**ray_init_kwargs(config.ray))
        print(run_pipeline(config).render())
