"""Fine-tune the encoder on Ray Train (after the data stages, skipped when current).

    python jobs/train_encoder.py --config demo
    ray job submit --working-dir . -- python jobs/train_encoder.py --config demo
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
        run = run_stages(config, until="encoder")
        stage = run.manifest()["stages"]["encoder"]["metrics"]
        print({k: v for k, v in stage.items() if k != "epochs"})
        print(f"run directory: {run.uri()}")
