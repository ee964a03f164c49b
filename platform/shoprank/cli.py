"""The ``shoprank`` command: cluster management and config inspection.

Workloads are the ``jobs/*.py`` entrypoints, run directly or with ``ray job submit``.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from shoprank import cluster
from shoprank.config import load_config
from shoprank.entrypoint import user_errors


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoprank", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    c = commands.add_parser("cluster", help="start, stop or describe the local Ray head")
    c.add_argument("action", choices=["up", "down", "info"])
    c.add_argument("--num-cpus", type=int, default=2)
    c.add_argument("--port", type=int, default=6379)
    c.add_argument("--dashboard-port", type=int, default=8265)

    cfg = commands.add_parser("config", help="print a preset with overrides applied, validated")
    cfg.add_argument("--config", default="demo")
    cfg.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    with user_errors():
        if args.command == "cluster":
            head = cluster.LocalCluster(args.port, args.dashboard_port, args.num_cpus)
            if args.action == "up":
                cluster.start(head)
                print(cluster.how_to_reach(head))
            elif args.action == "down":
                cluster.stop()
            else:
                state = "running" if cluster.dashboard_ready(head) else "not running"
                print(f"Ray head is {state}.\n{cluster.how_to_reach(head)}")
        elif args.command == "config":
            config = load_config(args.config, args.set)
            print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
