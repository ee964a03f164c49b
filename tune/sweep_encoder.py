"""Sweep the encoder fine-tuning (learning rate, LoRA r and alpha, temperature, hard negatives,
epochs) with Ray Tune:

    python tune/sweep_encoder.py --config demo --num-samples 6
    ray job submit --working-dir . -- python tune/sweep_encoder.py --config cluster --num-samples 24
"""

from shoprank.entrypoint import config_from_args, init_ray, setup_logging, user_errors
from shoprank.sweep import sweep_from_args, sweep_parser

if __name__ == "__main__":
    setup_logging()
    with user_errors():
        args = sweep_parser("encoder", __doc__).parse_args()
        init_ray(config_from_args(args).ray, dashboard=True)
        print(sweep_from_args("encoder", args))
