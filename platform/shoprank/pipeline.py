"""The end-to-end pipeline: preprocess -> encoder -> embed and index -> features -> ranker ->
evaluate -> register the variants.

Each stage is skipped when its config hash is unchanged and its outputs are there, so
a rerun after a crash continues where it stopped; every attempt lands in the run's
stage log (``stage_log.json``), which also drives the one progress bar across stages.
The summary at the end gives each stage's status and time, the headline metrics and
where the run is.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from shoprank.config import Config
from shoprank.ranker.stages import train_rank_and_evaluate
from shoprank.serving.variants import register_variants
from shoprank.store.run import Run

STAGES = ("ingest", "preprocess", "encoder", "embed", "features", "ranker", "evaluate")
POLL_S = 1.0


class StageProgress:
    """A progress bar over :data:`STAGES` that follows the run's stage log from a thread."""

    def __init__(self, run: Run, since: int) -> None:
        self.run, self.since = run, since
        self.bar = tqdm(total=len(STAGES) + 1, desc="pipeline", unit="stage")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def _follow(self) -> None:
        while not self._stop.wait(POLL_S):
            self.update()

    def update(self) -> None:
        entries = self.run.stage_log()[self.since:]
        finished = [e for e in entries if e["status"] in ("done", "skipped")]
        running = [e["stage"] for e in entries if e["status"] == "started"][-1:] if entries else []
        self.bar.set_postfix_str(f"now: {running[0]}" if running and entries[-1]["status"] == "started" else "")
        self.bar.update(len(finished) - self.bar.n)

    def __enter__(self) -> "StageProgress":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.update()
        self.bar.close()


@dataclass
class PipelineSummary:
    run: str
    stages: list[dict[str, Any]]
    metrics: dict[str, Any]

    def render(self) -> str:
        lines = [f"run: {self.run}", "", "| stage | status | seconds |", "|---|---|---|"]
        lines += [f"| {s['stage']} | {s['status']} | {s.get('seconds', '')} |" for s in self.stages]
        lines += ["", *(f"{name}: {value}" for name, value in self.metrics.items())]
        return "\n".join(lines)


def run_pipeline(config: Config) -> PipelineSummary:
    """Every stage (each skipped when current), then A and B registered; the summary."""
    run = Run.for_config(config)
    since = len(run.stage_log())
    with StageProgress(run, since):
        run = train_rank_and_evaluate(config)
        register_variants(config, run)
        run.log_stage("register", "done")
    stages = run.manifest()["stages"]
    metrics = {
        "encoder NDCG@10 gain over zero-shot": stages["encoder"]["metrics"].get("ndcg_gain_over_zero_shot"),
        "search: ranker NDCG@10 gain over retrieval": stages["evaluate"]["metrics"].get("search/ranker_ndcg_gain_over_retrieval"),
        "recommend: ranker NDCG@10 gain over retrieval":
            stages["evaluate"]["metrics"].get("recommend/ranker_ndcg_gain_over_retrieval"),
        "evaluation table": run.uri("evaluation", "offline.md"),
        "registry": "A (zero-shot baseline) and B (fine-tuned + ranker) -> this run",
    }
    return PipelineSummary(run.uri(), run.stage_log()[since:], metrics)
