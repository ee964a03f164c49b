"""Hyperparameter sweeps of the encoder and the ranker with Ray Tune over Ray Train V2.

Each trial is a driver function (:func:`encoder_trial`, :func:`ranker_trial`) that builds
the trainer with the trial's config and passes Tune's ``TuneReportCallback`` to it, so
every Train report (an epoch of the encoder, ``report_every`` rounds of the ranker)
reaches Tune; the deprecated ``Tuner(trainer)`` form is not used. ASHA stops weak
trials early; ``search: optuna`` (or ``random``) picks the points.

A search space is a YAML file (``tune/*_space.yaml``): config key -> ``{type, ...}``
with types ``loguniform``/``uniform`` (``low``, ``high``), ``randint`` (``low``,
``high`` exclusive) and ``choice`` (``values``). Keys are full config paths
(``encoder.train.learning_rate``), so a trial is the base config plus overrides,
validated like any ``--set``.

Outputs under ``<run.root>/sweeps/<run name>-<kind>/`` (on whatever filesystem the run root
is, shared storage on a cluster): Tune's experiment (restorable: a rerun of
an interrupted sweep continues it with ``Tuner.restore``; a rerun with another base config,
space, number of trials, search or seed is refused, see ``sweep.json``), ``results.csv`` and
``results.md`` (one row per trial), ``metric.png`` (every trial's validation metric
over its reports) and ``best_config.yaml`` (a complete config: give it to the
pipeline with ``--config``).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import ray
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

from shoprank.config import Config, load_config
from shoprank.errors import ConfigError, ShopRankError
from shoprank.privacy import pseudonyms
from shoprank.store.location import Location

log = logging.getLogger(__name__)

METRIC = "validation/ndcg@10"
SPACES = Path(__file__).resolve().parents[2] / "tune"
"""The search spaces beside the sweep entrypoints (``tune/`` of the repository)."""
RANKER_REPORT_EVERY = 5
IDENTITY_FILE = "sweep.json"
"""Beside Tune's experiment: what the sweep was started with (:func:`sweep_identity`)."""
SPACE_TYPES = {
    "loguniform": lambda s: tune.loguniform(s["low"], s["high"]),
    "uniform": lambda s: tune.uniform(s["low"], s["high"]),
    "randint": lambda s: tune.randint(s["low"], s["high"]),
    "choice": lambda s: tune.choice(s["values"]),
}


def read_space(path: str | Path) -> dict[str, Any]:
    """A search space YAML -> Tune's param space; errors name the key."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    space = {}
    for key, spec in raw.items():
        if not isinstance(spec, dict) or spec.get("type") not in SPACE_TYPES:
            raise ConfigError(f"{path}: {key}: needs a type among {', '.join(SPACE_TYPES)}, got {spec!r}")
        try:
            space[key] = SPACE_TYPES[spec["type"]](spec)
        except KeyError as missing:
            raise ConfigError(f"{path}: {key}: a {spec['type']} needs {missing}") from None
    return space


def space_upper_bound(path: str | Path, key: str) -> Any | None:
    """The largest value the space at ``path`` can give ``key`` (None when it does not vary it).

    A ``choice`` of numbers: the largest; ``uniform``/``loguniform``: ``high``;
    ``randint``: ``high - 1`` (Tune's upper bound is exclusive)."""
    spec = (yaml.safe_load(Path(path).read_text()) or {}).get(key)
    if not isinstance(spec, dict):
        return None
    if spec.get("type") == "choice":
        return max(spec["values"])
    return spec["high"] - 1 if spec.get("type") == "randint" else spec.get("high")


def asha_horizon(sweep: "Sweep", preset: str, overrides: list[str], space_path: str | Path) -> int:
    """ASHA's ``max_t``: the reports of the longest trial the space allows, not of the base config
    (with the base config's 100 rounds as the horizon, a trial that drew 300 was stopped after 100
    while its sampled 300 went into the best config)."""
    upper = space_upper_bound(space_path, sweep.length_key)
    extra = [] if upper is None else [f"{sweep.length_key}={upper}"]
    return sweep.max_reports(load_config(preset, [*overrides, *extra]))


def trial_config(preset: str, overrides: list[str], params: dict[str, Any]) -> Config:
    return load_config(preset, [*overrides, *(f"{key}={value}" for key, value in params.items())])


def encoder_trial(params: dict[str, Any], preset: str, overrides: list[str], storage: str) -> None:
    """One encoder trial: fine-tune with the trial's config beside the run, report each epoch."""
    from shoprank.encoder.train import train_encoder
    from shoprank.store.run import Run

    config = trial_config(preset, overrides, params)
    train_encoder(config, Run.for_config(config), storage=storage, name=f"trial-{tune.get_context().get_trial_id()}",
                  callbacks=[TuneReportCallback()])


def ranker_trial(params: dict[str, Any], preset: str, overrides: list[str], storage: str, layout: Any = None) -> None:
    """One ranker trial: XGBoost on Ray Train on the run's feature rows, reporting every few rounds; ``layout``
    (a :class:`~shoprank.ranker.train.WorkerLayout`): the trial's share of the cluster, which the sweep decides
    when ``ranker.num_workers`` is unset (the trials' own look at the cluster would race each other)."""
    from shoprank.ranker.train import read_features, train_ranker, with_positives
    from shoprank.store.run import Run

    config = trial_config(preset, overrides, params)
    run = Run.for_config(config)
    train, validation = (with_positives(read_features(run, split)) for split in ("train", "validation"))
    train_ranker(config, train, validation, storage, name=f"trial-{tune.get_context().get_trial_id()}",
                 callbacks=[TuneReportCallback()], report_every=RANKER_REPORT_EVERY,
                 storage_filesystem=run.filesystem_for_ray, layout=layout)


def ranker_cpus(config: Config) -> int:
    """The CPUs of one ranker training: its workers' (unset ``ranker.num_workers``: the whole cluster's)."""
    from shoprank.ranker.train import worker_layout  # here: ray.train.xgboost is seconds of imports

    return worker_layout(config).cpus


def ranker_trial_args(config: Config, concurrent: int) -> dict[str, Any]:
    """Each trial's layout when the config leaves it to the cluster: its share among ``concurrent`` trials."""
    from shoprank.ranker.train import worker_layout

    return {"layout": worker_layout(config, trials=concurrent)} if config.ranker.num_workers is None else {}


@dataclass(frozen=True)
class Sweep:
    """What differs between the encoder and the ranker sweep."""

    name: str
    trial: Callable[..., None]
    length_key: str
    """The config key that sets how long a trial trains (epochs, boosting rounds)."""
    max_reports: Callable[[Config], int]
    """The most reports a trial of this config makes."""
    cpus_per_trial: Callable[[Config], float]
    prepare_until: str
    """The last stage the trials read from (:func:`shoprank.stages.run_stages` runs up to it first): the data and
    the pre-trained backbone (when ``pretrain.enabled``) for the encoder, the feature rows for the ranker (no
    ranker is trained to get them)."""
    trial_args: Callable[[Config, int], dict[str, Any]] = lambda config, concurrent: {}
    """What each trial is given besides its parameters, knowing how many trials run at once."""


SWEEPS = {
    "encoder": Sweep("encoder", encoder_trial, "encoder.train.epochs", lambda c: c.encoder.train.epochs,
                     lambda c: c.encoder.train.num_workers * c.encoder.train.cpus_per_worker, "pretrain"),
    "ranker": Sweep("ranker", ranker_trial, "ranker.num_boost_round",
                    lambda c: max(1, c.ranker.num_boost_round // RANKER_REPORT_EVERY),
                    ranker_cpus, "features", ranker_trial_args),
}


@dataclass
class SweepOutcome:
    directory: Location
    results: pd.DataFrame
    best_params: dict[str, Any]
    best_metric: float
    best_config: str
    """``best_config.yaml``'s path or URI: what ``--config`` takes."""


def run_sweep(
    kind: str, preset: str, overrides: list[str], space_path: str | Path, *, num_samples: int,
    max_concurrent_trials: int | None = None, time_budget_s: float | None = None, search: str = "optuna",
    seed: int = 0,
) -> SweepOutcome:
    """Run (or continue, when interrupted before) the ``kind`` sweep; write its tables, plot and best config."""
    # Imported here: each trial's process imports this module, and needs none of the stages' bodies
    # (PyTorch and transformers among them: about 8 s of imports a trial on 2 cores).
    from shoprank.stages import run_stages

    sweep = SWEEPS[kind]
    config = load_config(preset, overrides)
    sweeps = Location(config.run.root).child("sweeps")
    name = f"{config.run.name}-{kind}"
    directory = sweeps.child(name)
    filesystem = directory.filesystem_for_ray
    pseudonyms(config)  # the users' key exists before the identity is computed: its id is part of every stage's
    identity = sweep_identity(kind, config, space_path, num_samples=num_samples, search=search, seed=seed)
    restoring = tune.Tuner.can_restore(directory.uri(), storage_filesystem=filesystem)
    if restoring:
        check_same_sweep(directory, identity)
    run_stages(config, until=sweep.prepare_until)
    cluster_cpus = float(ray.cluster_resources().get("CPU", 1))
    per_trial = sweep.cpus_per_trial(config)
    concurrent = max_concurrent_trials or max(1, int(cluster_cpus // max(per_trial, 1)))
    # The trial's driver only builds the trainer and waits: no CPU of its own (Tune needs some
    # resource, so a little memory), or on a small cluster it would hold the CPU its workers need.
    trainable = tune.with_resources(
        tune.with_parameters(sweep.trial, preset=preset, overrides=overrides, storage=directory.uri("trials"),
                             **sweep.trial_args(config, concurrent)),
        {"CPU": 0, "memory": 64 * 1024**2},
    )
    if restoring:
        log.info("continuing the interrupted sweep in %s", directory.uri())
        tuner = tune.Tuner.restore(directory.uri(), trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=filesystem)
    else:
        search_alg = None
        if search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search_alg = OptunaSearch(seed=seed)
        tuner = tune.Tuner(
            trainable,
            param_space=read_space(space_path),
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", num_samples=num_samples, max_concurrent_trials=concurrent,
                time_budget_s=time_budget_s, search_alg=search_alg,
                scheduler=ASHAScheduler(time_attr="training_iteration",
                                        max_t=asha_horizon(sweep, preset, overrides, space_path),
                                        grace_period=1, reduction_factor=2),
            ),
            # a trial that fails (a worker that did not start in time on a busy machine) gets a second try
            run_config=tune.RunConfig(name=name, storage_path=sweeps.uri(), storage_filesystem=filesystem,
                                      failure_config=tune.FailureConfig(max_failures=1)),
        )
        directory.write_json(identity, IDENTITY_FILE)
    grid = tuner.fit()
    unfinished = len(grid) - grid.num_terminated - grid.num_errors
    if unfinished or (time_budget_s is None and len(grid) < num_samples):
        raise ShopRankError(f"the sweep in {directory.uri()} was interrupted after {grid.num_terminated} of {num_samples} "
                            "trials; run the same command again to continue it")
    return write_outputs(grid, directory, preset, overrides)


def sweep_identity(kind: str, config: Config, space_path: str | Path, *, num_samples: int, search: str,
                   seed: int) -> dict[str, str]:
    """What makes a rerun the same sweep: its kind, its base config (the identity of the stage its trials
    train, which covers every setting they read, upstream stages included), its search space, its number
    of trials, its search algorithm and seed."""
    from shoprank.stages import stage_hash  # here, as in run_sweep

    sections = stage_hash(config, kind)
    space = hashlib.sha256(Path(space_path).read_bytes()).hexdigest()[:16]
    return {"kind": kind, "base config": sections, "search space": space, "num_samples": str(num_samples),
            "search": search, "seed": str(seed)}


def check_same_sweep(directory: Location, identity: dict[str, str]) -> None:
    """Refuse to continue a sweep started with another config or space: it would finish the old
    sweep and report its results as this one's."""
    if not directory.exists(IDENTITY_FILE):
        return
    started = directory.read_json(IDENTITY_FILE)
    changed = [key for key, value in identity.items() if started.get(key) != value]
    if changed:
        raise ShopRankError(
            f"{directory.uri()} holds a sweep started with another {', '.join(changed)}; run the command that "
            "started it to continue it, or remove that folder to start this sweep")


def write_outputs(grid: tune.ResultGrid, directory: Location, preset: str, overrides: list[str]) -> SweepOutcome:
    """``results.csv``/``.md``, ``metric.png``, ``best_config.yaml`` (uploaded together when remote)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    figure, axis = plt.subplots(figsize=(7, 4))
    for result in grid:
        params = {k: v for k, v in (result.config or {}).items()}
        history = result.metrics_dataframe
        final = (result.metrics or {}).get(METRIC)
        best = float(history[METRIC].max()) if history is not None and METRIC in history else None
        rows.append({"trial": (result.metrics or {}).get("trial_id"), **params, "reports": len(history)
                     if history is not None else 0, "final " + METRIC: final, "best " + METRIC: best,
                     "error": _error_summary(result.error)})
        if history is not None and METRIC in history:
            axis.plot(history["training_iteration"], history[METRIC], marker="o", label=rows[-1]["trial"])
    axis.set_xlabel("report (encoder: epoch; ranker: 5 boosting rounds)")
    axis.set_ylabel(METRIC)
    title = directory.path().rsplit("/", 1)[-1]
    axis.set_title(f"{title}: every trial")
    axis.legend(fontsize="small")
    figure.tight_layout()
    results = pd.DataFrame(rows).sort_values("best " + METRIC, ascending=False, na_position="last")
    best = grid.get_best_result(metric=METRIC, mode="max", scope="all")
    best_params = dict(best.config)
    config = trial_config(preset, overrides, best_params)
    with directory.local_output() as local:
        figure.savefig(local / "metric.png", dpi=100)
        results.to_csv(local / "results.csv", index=False)
        (local / "results.md").write_text(_markdown(results))
        (local / "best_config.yaml").write_text(
            f"# Best trial of {title}: {METRIC} {results.iloc[0]['best ' + METRIC]:.4f}\n"
            + yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
        )
    plt.close(figure)
    return SweepOutcome(directory, results, best_params, float(results.iloc[0]["best " + METRIC]),
                        directory.uri("best_config.yaml"))


def _error_summary(error: BaseException | None) -> str:
    """The line of a failed trial's error that says what went wrong: Ray's text starts with the
    actor's name and pid and ends with the exception, so the table keeps the last line."""
    if error is None:
        return ""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


def _markdown(frame: pd.DataFrame) -> str:
    cells = frame.astype(object).where(frame.notna(), "")
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |"
              for row in cells.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def sweep_parser(kind: str, doc: str | None) -> argparse.ArgumentParser:
    """The options of ``tune/sweep_<kind>.py``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="demo", help="preset name or YAML path")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--space", default=str(SPACES / f"{kind}_space.yaml"))
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--max-concurrent-trials", type=int, default=None,
                        help="default: as many as the cluster's CPUs (GPUs with ray.use_gpu) allow")
    parser.add_argument("--time-budget-s", type=float, default=None)
    parser.add_argument("--search", choices=["optuna", "random"], default="optuna")
    return parser


def sweep_from_args(kind: str, args: argparse.Namespace) -> str:
    """Run the sweep the parsed options describe; its table and best config, as text."""
    outcome = run_sweep(kind, args.config, args.set, args.space, num_samples=args.num_samples,
                        max_concurrent_trials=args.max_concurrent_trials, time_budget_s=args.time_budget_s,
                        search=args.search)
    return (outcome.directory.read_text("results.md")
            + f"best validation NDCG@10 {outcome.best_metric:.4f}: {outcome.best_params}\n"
            + f"best config: {outcome.best_config}  (python jobs/pipeline.py --config {outcome.best_config})")
