"""Incremental ranker update on new events, warm-started from a run's ranker; registered as a new run.

The alias (``--alias``, default ``latest``) moves to the new run only when validation
NDCG@10 on the new requests does not drop (``ranker.update_tolerance``).

    python jobs/update_ranker.py --config demo --events events.parquet
    ray job submit --working-dir . -- python jobs/update_ranker.py --config demo --events /data/events.parquet
"""

from __future__ import annotations

import ray

from shoprank.entrypoint import config_from_args, job_parser, ray_init_options, setup_logging, user_errors
from shoprank.ranker.update import update_ranker
from shoprank.store.run import Run

if __name__ == "__main__":
    setup_logging()
    parser = job_parser(__doc__)
    parser.add_argument("--events", required=True, help="new events (Parquet, CSV or JSON Lines, event records)")
    parser.add_argument("--alias", default="latest", help="registry alias to move when the update is no worse")
    with user_errors():
        args = parser.parse_args()
        config = config_from_args(args)
        with ray_init_options(config.ray) as options:
            ray.init(**options)
        print(update_ranker(config, Run.for_config(config), args.events, alias=args.alias))
