"""Sweep the encoder fine-tuning (learning rate, LoRA r and alpha, temperature, hard negatives,
epochs) with Ray Tune:

    python tune/sweep_encoder.py --config demo --num-samples 6
    ray job submit --working-dir . -- python tune/sweep_encoder.py --config cluster --num-samples 24
"""

import ray

from shoprank.entrypoint import config_from_args, ray_init_options, setup_logging, user_errors
from shoprank.sweep import sweep_from_args, sweep_parser

if __name__ == "__main__":
    setup_logging()
    with user_errors():
        args = sweep_parser("encoder", __doc__).parse_args()
        with ray_init_options(config_from_args(args).ray, dashboard=True) as options:
            ray.init(**options)
        print(sweep_from_args("encoder", args))
