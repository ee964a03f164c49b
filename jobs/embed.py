"""Embed the catalogue and the users with the fine-tuned encoder and build the retrieval index.

    python jobs/embed.py --config demo
    ray job submit --working-dir . -- python jobs/embed.py --config demo
"""

from __future__ import annotations

from shoprank.encoder.stages import train_and_embed
from shoprank.entrypoint import config_from_args, init_ray, job_parser, setup_logging, user_errors

if __name__ == "__main__":
    setup_logging()
    with user_errors():
        config = config_from_args(job_parser(__doc__).parse_args())
        init_ray(config.ray)
        run = train_and_embed(config)
        print(f"run directory: {run.uri()}")
