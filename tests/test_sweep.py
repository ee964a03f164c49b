"""Ray Tune sweeps on the tiny run: ranker trials with Optuna and ASHA; an interrupted sweep resumed.

The default suite's sweep has two trials, which run side by side on the session's 2 CPUs (one
worker each): one round of trials. The slow tests run four, in two rounds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from shoprank.config import Config, load_config
from shoprank.errors import ShopRankError
from shoprank.store.run import Run
from shoprank.sweep import SPACES, SWEEPS, asha_horizon, run_sweep

REPO = Path(__file__).resolve().parents[1]


def _overrides(config: Config, root: Path | None = None) -> list[str]:
    return [f"run.root={root or config.run.root}", f"encoder.model={config.encoder.model}", "ranker.num_workers=1"]


@pytest.mark.timeout(1200)
def test_a_ranker_sweep_writes_its_table_plot_and_best_config(ranked: tuple[Config, Run]) -> None:
    config, _ = ranked
    outcome = run_sweep("ranker", "tiny", _overrides(config), REPO / "tune" / "ranker_space.yaml", num_samples=2,
                        search="optuna")
    directory = Path(outcome.directory.path())
    results = pd.read_csv(directory / "results.csv")
    assert len(results) == 2
    assert results["error"].isna().all(), results["error"].dropna().tolist()
    assert {"ranker.eta", "ranker.max_depth", "ranker.objective"} <= set(results.columns)
    assert results["best validation/ndcg@10"].between(0, 1).all()
    assert (directory / "results.md").read_text().count("\n") == 4  # header, rule, a row per trial
    assert (directory / "metric.png").stat().st_size > 10_000
    best = load_config(str(outcome.best_config))
    assert best.ranker.eta == outcome.best_params["ranker.eta"]
    assert outcome.best_metric == results["best validation/ndcg@10"].max()
    with pytest.raises(ShopRankError, match="another num_samples; run the command that started it"):
        run_sweep("ranker", "tiny", _overrides(config), REPO / "tune" / "ranker_space.yaml", num_samples=3)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_an_interrupted_sweep_is_resumed(ranked: tuple[Config, Run], tmp_path: Path) -> None:
    config, run = ranked
    root = tmp_path / "runs"
    (root / run.name).parent.mkdir(parents=True)
    subprocess.run(["cp", "-r", run.path(), str(root / run.name)], check=True)
    command = [sys.executable, str(REPO / "tune" / "sweep_ranker.py"), "--config", "tiny", "--num-samples", "4",
               "--max-concurrent-trials", "1", *(f"--set={o}" for o in _overrides(config, root))]
    directory = root / "sweeps" / f"{run.name}-ranker"
    first = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 400
    while len(list(directory.glob("ranker_trial_*/result.json"))) < 1 or not any(
            p.stat().st_size for p in directory.glob("ranker_trial_*/result.json")):
        assert first.poll() is None and time.monotonic() < deadline, "the sweep ended or stalled before a trial reported"
        time.sleep(1)
    os.killpg(first.pid, signal.SIGINT)  # what Ctrl-C does: Tune saves the experiment state and stops
    assert first.wait(timeout=120) == 2  # "interrupted ... run the same command again", no results yet
    assert not (directory / "results.csv").exists()
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "continuing the interrupted sweep" in second.stderr + second.stdout
    results = pd.read_csv(directory / "results.csv")
    assert len(results) == 4
    assert yaml.safe_load((directory / "best_config.yaml").read_text())["ranker"]["num_workers"] == 1


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_pipeline_with_sweep_trains_with_the_best_configs(ranked: tuple[Config, Run], tmp_path: Path) -> None:
    """``jobs/pipeline.py --sweep``: both sweeps, then every stage under the ranker sweep's best config."""
    config, run = ranked
    root = tmp_path / "runs"
    root.mkdir()
    subprocess.run(["cp", "-r", run.path(), str(root / run.name)], check=True)
    command = [sys.executable, str(REPO / "jobs" / "pipeline.py"), "--config", "tiny", "--sweep", "--sweep-samples",
               "2", *(f"--set={o}" for o in _overrides(config, root))]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1700)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "encoder sweep: best validation NDCG@10" in done.stdout and "ranker sweep: best" in done.stdout
    best = yaml.safe_load((root / "sweeps" / f"{run.name}-ranker" / "best_config.yaml").read_text())
    encoder_best = yaml.safe_load((root / "sweeps" / f"{run.name}-encoder" / "best_config.yaml").read_text())
    trained = Run(str(root), run.name).manifest()["config"]
    assert trained["ranker"] == best["ranker"] and trained["encoder"] == encoder_best["encoder"] == best["encoder"]
    assert len(pd.read_csv(root / "sweeps" / f"{run.name}-encoder" / "results.csv")) == 2


def test_ranker_trials_share_the_cluster_when_the_layout_is_left_to_it(ray_local: None) -> None:
    """``ranker.num_workers`` unset: a trial takes the whole cluster (the session's one node of 2 CPUs), so one runs
    at a time by default; trials asked to run two at once get one CPU each, decided by the sweep, not by each
    trial's look at the cluster. Set, the layout is the config's."""
    from shoprank.ranker.train import WorkerLayout

    ranker = SWEEPS["ranker"]
    auto, explicit = load_config("tiny"), load_config("tiny", ["ranker.num_workers=1"])
    assert ranker.cpus_per_trial(auto) == 2 and ranker.cpus_per_trial(explicit) == 1
    assert ranker.trial_args(auto, 1) == {"layout": WorkerLayout(1, 2)}
    assert ranker.trial_args(auto, 2) == {"layout": WorkerLayout(1, 1)}
    assert ranker.trial_args(explicit, 2) == {} and SWEEPS["encoder"].trial_args(auto, 2) == {}


@pytest.mark.parametrize("kind, key, values, expected", [
    ("ranker", "ranker.num_boost_round", {"type": "choice", "values": [10, 200, 50]}, 200 // 5),
    ("ranker", "ranker.num_boost_round", {"type": "randint", "low": 20, "high": 61}, 60 // 5),
    ("encoder", "encoder.train.epochs", {"type": "choice", "values": [1, 3, 2]}, 3),
])
def test_asha_lets_the_longest_trial_of_the_space_finish(kind: str, key: str, values: dict, expected: int,
                                                          tmp_path: Path) -> None:
    """ASHA's horizon is the space's longest trial, not the base config's (tiny: 2 epochs, 40 rounds)."""
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({key: values, "ranker.eta": {"type": "uniform", "low": 0.1, "high": 0.2}}))
    assert asha_horizon(SWEEPS[kind], "tiny", [], space) == expected
    space.write_text(yaml.safe_dump({"ranker.eta": {"type": "uniform", "low": 0.1, "high": 0.2}}))
    assert asha_horizon(SWEEPS[kind], "tiny", [], space) == SWEEPS[kind].max_reports(load_config("tiny"))
    assert asha_horizon(SWEEPS["ranker"], "tiny", [], SPACES / "ranker_space.yaml") == 300 // 5

