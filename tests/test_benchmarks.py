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

import pandas as pd
import pytest

from shoprank.config import Config
from shoprank.entrypoint import free_port
from shoprank.store.run import Run

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
ONLINE_RETAIL = BENCHMARKS / "data" / "online-retail" / "online_retail.csv.gz"


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
def test_demo_quality(ranked: tuple[Config, Run], tmp_path: Path) -> None:
    """The quality check reads a run's evaluation and puts each figure beside the README's last record."""
    _, run = ranked
    readme = tmp_path / "README.md"
    readme.write_text("## The demo\n\n| task | popularity | fine-tuned retrieval + ranker (variant B) | B - A |\n"
                      "| --- | --- | --- | --- |\n| search | 0.5 | 0.25 | +0.010 [-0.02, +0.04] |\n\n## Speed\n")
    figures = run_benchmark("demo_quality.py", "--run", run.path(), "--readme", str(readme))
    rows = {(row["task"], row["figure"]): row for row in figures["figures"]}
    evaluation = run.read_json("evaluation", "offline.json")
    popularity = rows[("search", "popularity")]
    assert popularity["now"] == round(evaluation["search"]["popularity"]["ndcg@10"], 4)
    assert popularity["recorded"] == 0.5 and popularity["difference"] == round(popularity["now"] - 0.5, 4)
    assert rows[("search", "B - A")]["recorded"] == 0.01
    assert rows[("recommend", "B brands@10")]["recorded"] is None  # measured, never recorded: shown, no difference
    recorded = subprocess.run([sys.executable, "-c", "import demo_quality; print(demo_quality.recorded())"],
                              cwd=BENCHMARKS, capture_output=True, text=True, check=True).stdout
    assert "'search'" in recorded and "'recommend'" in recorded  # the repository's own table parses


@pytest.mark.slow
def test_encoder_runtime(tiny_trained: tuple[Config, Run]) -> None:
    config, _ = tiny_trained
    sets = [word for value in run_overrides(config) for word in ("--set", value)]
    figures = run_benchmark("encoder_runtime.py", "--config", "tiny", *sets, "--queries", "32",
                            "--batch1-queries", "8", "--threads", "1")
    assert figures["fine_tuned"]["chosen"] in ("torch", "onnx", "onnx-int8")


@pytest.mark.slow
def test_student(distilled: tuple[Config, Run]) -> None:
    config, _ = distilled
    sets = [word for value in [*run_overrides(config), "student.enabled=true", "student.layers=[1]"]
            for word in ("--set", value)]
    figures = run_benchmark("student.py", "--config", "tiny", *sets, "--queries", "32", "--batch1-queries", "8",
                            "--rounds", "1", "--threads", "1")
    assert figures["sizes"]["student"]["layers"] == 1 < figures["sizes"]["torch"]["layers"]
    assert set(figures["queries_per_s"]) == set(figures["queries_per_s_batch1"]) == set(figures["ndcg@10"])


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


@pytest.mark.slow
def test_online_retail_system_beats_popularity_and_repeat_purchase_on_two_months(tmp_path: Path) -> None:
    """Issue 36's must-hold on a slice that runs in minutes: the pipeline on two months of the repository's copy
    (2011-09-10 to 2011-11-08, every column as it is: no invented category or brand), validated on two weeks from
    2011-10-12 (246 shoppers), tested on the two weeks from 2011-10-26 (438 shoppers), answers through Serve's
    request path above popularity and above each shopper's own most-bought products (the repeat baseline).
    The sizes are pinned here, so the example config may grow for the full benchmark without slowing this test."""
    raw = pd.read_csv(ONLINE_RETAIL, dtype=str, keep_default_na=False)  # rewritten as read: ids, dates, blanks
    data = tmp_path / "two-months.csv.gz"
    raw[(raw["InvoiceDate"] >= "2011-09-10") & (raw["InvoiceDate"] < "2011-11-09")].to_csv(data, index=False)
    runs = tmp_path / "runs"
    # the encoder small (it does not carry this data); requests of two weeks, the slice's horizon, where the
    # example's month would leave the ranker one truncated window to learn from; and a ranker for 760 training
    # requests: the example's depth-6 trees stopped after 8 to 56 rounds and scattered (validation NDCG@10 0.209 to
    # 0.222 over two pipeline runs x three seeds, the test figure 0.224 to 0.254 against own most-bought's 0.2304:
    # CI once failed on it); shallow, well-filled trees chosen on validation (0.236 to 0.251; the test 0.246 to 0.260)
    sets = [f"run.root={runs}", "encoder.train.epochs=1", "encoder.train.max_coengagement_pairs=400",
            "export.timed_queries=16", "features.request_window_days=14",
            "ranker.eta=0.05", "ranker.max_depth=3", "ranker.min_child_weight=20"]
    figures = run_benchmark("online_retail.py", "--data", str(data), "--validation-from", "2011-10-12",
                            "--test-from", "2011-10-26", "--baselines", "popularity,own", "--system",
                            *(word for value in sets for word in ("--set", value)))
    assert figures["data"] == str(data.resolve())
    assert (figures["counts"]["validation_shoppers"], figures["counts"]["test_shoppers"]) == (246, 438)
    preprocess = Run(str(runs), "online-retail").manifest()["stages"]["preprocess"]
    assert preprocess["rows"]["categories"] == 0, "the reader invents no category"
    rows, differences = figures["rows"], figures["system_minus"]
    system = rows["the system (pipeline run, Serve's request path)"]["ndcg@10"]
    for baseline in ("popularity", "own most-bought (filled: recent popularity)"):
        assert system["mean"] > rows[baseline]["ndcg@10"]["mean"], (
            f"the system's NDCG@10 {system} is not above {baseline}'s {rows[baseline]['ndcg@10']} "
            f"(paired difference {differences[baseline]})")


@pytest.mark.slow
def test_exploration(ranked: tuple[Config, Run]) -> None:
    config, _ = ranked
    sets = [word for value in run_overrides(config) for word in ("--set", value)]
    figures = run_benchmark("exploration.py", "--config", "tiny", *sets, "--visits", "40", "--new-products", "6")
    assert figures["identical_before_put"], "before the put no product is eligible: every arm answers alike"
    arms = figures["arms"]
    assert arms["no exploration"]["explored_share"] == 0.0
    slots = arms["recommendation slots"]
    assert 0.0 < slots["explored_share_recommend"] <= 0.2, "at most 2 of 10 items per recommendation"
    assert slots.get("explored_share_search", 0.0) == 0.0, "search has no slot by default"
    assert slots["new_shown_at_least_once"] > 0.0


@pytest.mark.slow
def test_serve_levers(ranked: tuple[Config, Run], tmp_path: Path) -> None:
    """Two levers' serve_load runs and their table rows: HAProxy in front (SHOPRANK_INGRESS=haproxy, the load at
    serve.port) and direct ingress (the load at the ingress replica's own port): each answered by the ingress replica
    itself, with no Python proxy in between."""
    config, _ = ranked
    sets = [word for value in run_overrides(config) for word in ("--set", value)]
    levers = ["shoprank haproxy", "throughput-optimized + direct"]
    figures = run_benchmark("serve_levers.py", "--levers", *levers, "--log-dir", str(tmp_path), "--config", "tiny",
                            *sets, "--duration", "1", "--levels", "1", "--in-process-requests", "10", "--batch", "4")
    for lever in levers:
        served = figures["levers"][lever]["served"]["/search c=1"]
        assert served["requests"] > 0 and served["errors"] == 0, (lever, served)
        assert served["cpu_ms_per_request"]["ingress"] > 0, (lever, served)


@pytest.mark.slow
def test_categories(ranked: tuple[Config, Run]) -> None:
    config, run = ranked
    sets = [word for value in run_overrides(config) for word in ("--set", value)]
    figures = run_benchmark("categories.py", "--config", "tiny", *sets, "--repeats", "1")
    assert figures["held_out"]["rows"] == run.manifest()["stages"]["evaluate"]["metrics"]["categories"]["rows"]
    fill = figures["ingest_fill"]
    assert fill["predicted"] == fill["hidden"] > 0 and fill["accuracy"] > fill["most_frequent_share"]
    assert figures["nothing_missing"]["products_without_category"] == 0
