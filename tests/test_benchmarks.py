"""Every benchmark at its smallest setting runs end to end and prints its figures (none is judged).

A benchmark that no test runs rots: ``benchmarks/embed.py`` once kept calling the
embedding job with the arguments it had before the job changed. Each script runs as
a user runs it, a subprocess with its own local Ray cluster where it starts one, on
the session's tiny run where it needs a trained one. Each starts its own cluster and takes
half a minute to minutes, so all of them are ``slow``: ``make test-all`` is the smoke test
of every benchmark (speed is measured there, never asserted).
``gpu_encoder_check.py`` is not a benchmark but the GPU check (it needs a GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shoprank.config import Config
from shoprank.entrypoint import free_port
from shoprank.store.run import Run

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def run_benchmark(script: str, *args: str, timeout_s: float = 900) -> dict:
    """Run ``benchmarks/<script>`` with ``args``; its last JSON line."""
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], cwd=REPO, capture_output=True, text=True,
        timeout=timeout_s, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, f"{script} exited {result.returncode}:\n{result.stderr[-4000:]}"
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"{script} printed no JSON line:\n{result.stdout[-2000:]}"
    return json.loads(lines[-1])


def run_overrides(config: Config) -> list[str]:
    """``--set`` values that point a benchmark at the session's tiny run and its tiny encoder."""
    return [f"run.root={config.run.root}", f"run.name={config.run.name}", f"encoder.model={config.encoder.model}"]


@pytest.mark.slow
def test_embed(tiny_trained: tuple[Config, Run]) -> None:
    config, run = tiny_trained
    sets = [word for value in run_overrides(config) for word in ("--set", value)]
    figures = run_benchmark("embed.py", "--config", "tiny", *sets, "--actors", "1", "--plain-threads", "1",
                            "--search-repeats", "1")
    products = run.manifest()["stages"]["embed"]["rows"]["products"]
    assert figures["embed_ray"]["products"] == products
    assert not run.exists("bench"), "the benchmark's scratch output is removed"


@pytest.mark.slow
def test_preprocess(tmp_path: Path) -> None:
    figures = run_benchmark("preprocess.py", "--events", "3000", "--products", "300", "--users", "200",
                            "--queries", "40", "--num-blocks", "2", "--root", str(tmp_path))
    assert figures["generation"]["events"] > 0


@pytest.mark.slow
def test_train_encoder(tiny_trained: tuple[Config, Run], tmp_path: Path) -> None:
    config, _ = tiny_trained
    figures = run_benchmark("train_encoder.py", "--config", "tiny", "--model", config.encoder.model,
                            "--steps", "2", "--batch-size", "8", "--root", str(tmp_path))
    assert figures["config"]["steps"] == 2


@pytest.mark.slow
def test_train_ranker(ranked: tuple[Config, Run]) -> None:
    config, _ = ranked
    figures = run_benchmark("train_ranker.py", "--config", "tiny", "--set", *run_overrides(config),
                            "--rows", "2000", "--rounds", "3", "--workers", "1", "--requests", "10")
    assert figures["rounds"] == 3


@pytest.mark.slow
def test_serve_load(ranked: tuple[Config, Run]) -> None:
    config, _ = ranked
    sets = [word for value in [*run_overrides(config), f"serve.port={free_port()}"] for word in ("--set", value)]
    run_benchmark("serve_load.py", "--config", "tiny", *sets, "--duration", "1", "--levels", "1",
                  "--in-process-requests", "10", "--batch", "4")


@pytest.mark.slow
def test_recommend(ranked: tuple[Config, Run]) -> None:
    pytest.importorskip("implicit", reason="the bench extra (make test-all installs it)")
    config, _ = ranked
    sets = [word for value in run_overrides(config) for word in ("--set", value)]
    run_benchmark("recommend.py", "--config", "tiny", *sets, "--no-pipeline")


@pytest.mark.slow
def test_demo_quality_scan(tiny_trained: tuple[Config, Run]) -> None:
    config, run = tiny_trained
    run_benchmark("demo_quality_scan.py", "--data", str(Path(run.path("data"))), "--model", config.encoder.model,
                  "--only", "base")


@pytest.mark.slow
def test_encoder_runtime(tiny_trained: tuple[Config, Run]) -> None:
    config, _ = tiny_trained
    sets = [word for value in run_overrides(config) for word in ("--set", value)]
    figures = run_benchmark("encoder_runtime.py", "--config", "tiny", *sets, "--queries", "32",
                            "--batch1-queries", "8", "--threads", "1")
    assert figures["fine_tuned"]["chosen"] in ("torch", "onnx", "onnx-int8")


@pytest.mark.slow
def test_online_retail_baselines() -> None:
    """The protocol on the repository's copy of Online Retail: its counts (the 1,395 test shoppers of the figures
    measured outside the project), and the repeat baseline far above popularity, as on every measure of this shop."""
    figures = run_benchmark("online_retail.py", "--baselines", "popularity,own")
    assert figures["counts"]["test_shoppers"] == 1395
    assert figures["counts"]["validation_shoppers"] == 1105
    assert figures["counts"]["purchase_lines"] == 396_337
    rows = figures["rows"]
    popular, own = rows["popularity"]["ndcg@10"], rows["own most-bought (filled: recent popularity)"]["ndcg@10"]
    assert own["ci95"][0] > popular["ci95"][1], (own, popular)
    assert 0.07 < popular["mean"] < 0.10 and 0.28 < own["mean"] < 0.35
    assert {row["shoppers"] for row in rows.values()} == {1395}
    assert "recent popularity" in rows  # own most-bought's fill is tuned, so it comes along
