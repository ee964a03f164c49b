"""What every ``jobs/*.py`` entrypoint shares: arguments, logging, Ray connection, errors.

Entrypoints stay thin: parse ``--config`` / ``--set``, connect to Ray under
``if __name__ == "__main__"``, call the library. A user error
(:class:`~shoprank.errors.ShopRankError`) is printed as one clear message and exits
with status 2, never as a stack trace.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from shoprank.config import Config, RayConfig, load_config
from shoprank.errors import ShopRankError

EXIT_USER_ERROR = 2


def job_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every job takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="demo", help="preset name (tiny, demo, cluster) or YAML path")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set source.synthetic.seed=3 (repeatable)",
    )
    return parser


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.set)


def ray_init_kwargs(ray_config: RayConfig) -> dict[str, Any]:
    """Join the cluster a job runs on, or start a local one with an explicit CPU count.

    Under ``ray job submit`` Ray sets ``RAY_ADDRESS``; joining must not pass
    ``num_cpus``. Run directly, the job starts a local cluster sized by config, so
    it never claims more CPUs than the machine can spare.
    """
    address = ray_config.address or os.environ.get("RAY_ADDRESS")
    if address:
        return {"address": address, "log_to_driver": True}
    # address="local": start a new instance even when a `ray start` cluster runs on this machine.
    return {"address": "local", "num_cpus": ray_config.num_cpus, "include_dashboard": False}


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a user error into a one-line message and exit status 2."""
    try:
        yield
    except ShopRankError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
