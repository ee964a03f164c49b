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
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import ray

from shoprank.cluster import ensure_token, free_port, on_loopback
from shoprank.config import Config, RayConfig, load_config
from shoprank.errors import ConfigError, ShopRankError
from shoprank.haproxy import ingress_env

if TYPE_CHECKING:  # ray.train costs every `shoprank` command a second of imports
    from ray.train import Result
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

EXIT_USER_ERROR = 2
GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"


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


@contextmanager
def ray_init_options(ray_config: RayConfig, *, dashboard: bool = False) -> Iterator[dict[str, Any]]:
    """``ray.init`` arguments: join the cluster a job runs on, or start a local one with an
    explicit CPU count; pass them to ``ray.init`` inside the ``with``.

    Under ``ray job submit`` Ray sets ``RAY_ADDRESS``; joining must not pass
    ``num_cpus``. Run directly, the job starts a local cluster (:func:`local_ray_options`)
    sized by config, so it never claims more CPUs than the machine can spare; sweeps
    ask for its ``dashboard``, because Ray Train's placement-group cleaner needs the
    State API to free the CPUs of a trial that ASHA stopped.
    """
    address = ray_config.address or os.environ.get("RAY_ADDRESS")
    if address:
        yield {"address": address, "log_to_driver": True}
    else:
        with local_ray_options(ray_config.num_cpus, dashboard=dashboard) as options:
            yield options


@contextmanager
def local_ray_options(num_cpus: int, *, dashboard: bool = False) -> Iterator[dict[str, Any]]:
    """``ray.init`` arguments of a new local Ray cluster (even when a ``ray start`` cluster runs
    on this machine) whose workers know its address; pass them to ``ray.init`` inside the ``with``.

    Ray Train's placement-group cleaner, a detached actor that frees the CPUs of a
    training run whose controller died (a trial ASHA stopped), looks its cluster up
    through ``RAY_ADDRESS``, else through ``/tmp/ray/ray_current_cluster``, which names
    the ``ray start`` cluster of this machine if there is one. There it does not find the
    controller, takes it for dead and frees the CPUs of a live run; with two local
    clusters and no such file it fails and the CPUs stay held, so the next stage waits
    forever. So the GCS port is chosen here (``RAY_GCS_SERVER_PORT``, read when the head
    starts, set only inside the ``with``) and every worker of the job gets ``RAY_ADDRESS``.
    The auth token is created here too, mode 0600, as ``shoprank cluster up`` creates it.
    """
    ensure_token()  # else ray.init writes one readable by every user of the machine (mode 0644)
    port = free_port()
    # read when the head starts, so set only inside the ``with``: the GCS port, and Serve's ingress (shoprank.haproxy)
    started_with = {GCS_PORT_VARIABLE: str(port), **ingress_env(loopback=True, free_port=free_port)}
    before = {name: os.environ.get(name) for name in started_with}
    os.environ.update(started_with)
    try:
        with on_loopback():  # every listener of the new cluster on 127.0.0.1 (shoprank.cluster)
            yield {"address": "local", "num_cpus": num_cpus, "include_dashboard": dashboard,
                   "dashboard_port": free_port() if dashboard else None,
                   "runtime_env": {"env_vars": {"RAY_ADDRESS": f"{ray.util.get_node_ip_address()}:{port}"}}}
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def check_gpu(settings: RayConfig, gpus: int = 1) -> None:
    """With ``ray.use_gpu``, return once the cluster has ``gpus`` GPUs; refuse within seconds where none can come.

    A cluster with no GPU now may start a GPU node on demand (worker types at ``min_workers: 0``): the
    autoscaler is asked for the GPUs (``request_resources``) and this waits up to ``ray.gpu_wait_s``,
    logging its progress, while it launches one. When an update of the autoscaler (every 5 s) has seen the
    request and launched nothing for it, no node type can offer a GPU (or the cluster has no autoscaler):
    refused then. Its launches are the autoscaler's own report, the one ``ray status`` prints.

    Here, not beside the encoder's trainer, because the ranker's training workers import it: pulling
    PyTorch and transformers into every XGBoost worker and controller cost about 5 s of CPU each.
    """
    if not settings.use_gpu or ray.cluster_resources().get("GPU", 0) >= gpus:
        return
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": 1}] * gpus)
    try:
        _wait_for_gpus(gpus, settings.gpu_wait_s)
    finally:
        request_resources(bundles=[])  # the trainer's own request keeps the node; this one would keep it idle


def autoscaler_status() -> dict[str, Any]:
    """The autoscaler's last report (what ``ray status`` reads): its launches, and ``time``, when it wrote it."""
    import json

    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
    return json.loads(raw) if raw else {}


def _wait_for_gpus(gpus: int, wait_s: float, poll_s: float = 1.0, progress_every_s: float = 15.0) -> None:
    log = logging.getLogger("shoprank")
    started = said = time.time()
    seen_by_autoscaler = False  # an autoscaler report written after the request
    launched: dict[str, int] = {}
    while True:
        if ray.cluster_resources().get("GPU", 0) >= gpus:
            log.info("a GPU node joined after %.0f s", time.time() - started)
            return
        status = autoscaler_status()
        report = status.get("autoscaler_report") or {}
        launching = {**report.get("pending_launches", {}), **{n[-2]: 1 for n in report.get("pending_nodes", [])}}
        launched.update(launching)
        # the autoscaler stamps its report just after reading the resource requests, and launches in the same
        # update: a report stamped after the request (with a margin for that read) has seen it
        seen_by_autoscaler = seen_by_autoscaler or status.get("time", 0) > started + 0.5
        if seen_by_autoscaler and not launched:
            raise ConfigError(f"ray.use_gpu is true but the Ray cluster has no GPU and no node type of it offers "
                              f"one: the autoscaler launched nothing for {gpus} GPU(s); set ray.use_gpu=false or "
                              "add a GPU node type")
        waited = time.time() - started
        if waited >= wait_s:
            raise ConfigError(f"ray.use_gpu is true and no GPU node joined within {wait_s:.0f} s (ray.gpu_wait_s); "
                              f"launched: {launched or 'nothing'}; see `ray status`")
        if time.time() - said >= progress_every_s:
            log.info("waiting for the autoscaler to start a GPU node: %.0f s of %.0f, launching %s",
                     waited, wait_s, launching or "nothing yet")
            said = time.time()
        time.sleep(poll_s)


TRAIN_POLL_VARIABLE = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
"""Ray Train's controller polls its workers this often; Ray copies the driver's value to the controller."""


def fit(trainer: DataParallelTrainer, settings: RayConfig, env: dict[str, str] | None = None) -> Result:
    """``trainer.fit()``, its controller polling every ``ray.train_poll_s``, with the process's SIGINT handler
    as it was before; ``env``: more of Ray Train's variables for the call (copied to the controller likewise).

    Ray Train's controller waits up to its polling interval (Ray's default: 2 s) at each step of a run
    (workers scheduled, started, each poll, finished): measured on the tiny pipeline and a ranker update
    here, 111 s at 2 s against 86 s at 0.25 s. The interval is set in this process's environment for the
    call only, which Ray copies into the controller's.

    In the main thread, Ray Train's ``fit`` installs a SIGINT handler that holds the run's
    controller and leaves it installed: the controller, its dataset manager and split
    coordinators then outlive the run until the next ``fit`` (measured: about a fifth of a
    core, polling, through the stages and tests that follow), and a later Ctrl-C asks a
    finished run to abort. Restoring the handler drops the last handle, so they stop.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if in_main_thread else None
    variables = {TRAIN_POLL_VARIABLE: str(settings.train_poll_s), **(env or {})}
    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        return trainer.fit()
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, before)
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a user error into a one-line message and exit status 2."""
    try:
        yield
    except ShopRankError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
