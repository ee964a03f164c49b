"""The end-to-end pipeline: preprocess -> (pretrain) -> encoder -> ONNX export -> embed and index -> features ->
ranker -> evaluate -> register the variants.

Each stage is skipped when its config hash is unchanged and its outputs are there, so
a rerun after a crash continues where it stopped; every attempt lands in the run's
stage log (``stage_log.json``), which also drives the one progress bar across stages.
The summary at the end gives each stage's status and time, the headline metrics and
where the run is.

With ``--sweep`` (:func:`swept_config`), the encoder sweep runs first, then the ranker
sweep over features of the best encoder, and the pipeline trains with the ranker
sweep's best config, which carries the best encoder settings too.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from shoprank.config import Config, load_config
from shoprank.serving.variants import register_variants
from shoprank.stages import STAGES, run_stages
from shoprank.store.run import Run

POLL_S = 1.0


class StageProgress:
    """A progress bar over :data:`shoprank.stages.STAGES` that follows the run's stage log from a thread."""

    def __init__(self, run: Run, since: int) -> None:
        self.run, self.since = run, since
        self.bar = tqdm(total=len(STAGES) + 1, desc="pipeline", unit="stage", mininterval=0)
        self.postfix = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def _follow(self) -> None:
        while not self._stop.wait(POLL_S):
            self.update()

    def update(self) -> None:
        """Redraw only on a change: in a job's log (no terminal) every redraw is a new line."""
        entries = self.run.stage_log()[self.since:]
        finished = [e for e in entries if e["status"] in ("done", "skipped")]
        postfix = f"now: {entries[-1]['stage']}" if entries and entries[-1]["status"] == "started" else ""
        if postfix != self.postfix:
            self.postfix = postfix
            self.bar.set_postfix_str(postfix, refresh=len(finished) == self.bar.n)
        if len(finished) != self.bar.n:
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
    sweeps: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    """Per stage, what it could not do with this data (from the manifest, so a skipped stage's notes show too)."""

    def render(self) -> str:
        lines = [f"run: {self.run}", "", "| stage | status | seconds |", "|---|---|---|"]
        lines += [f"| {s['stage']} | {s['status']} | {s.get('seconds', '')} |" for s in self.stages]
        lines += ["", *(f"{name}: {value}" for name, value in {**self.sweeps, **self.metrics}.items()
                        if value is not None)]
        lines += [f"note ({stage}): {note}" for stage, notes in self.notes.items() for note in notes]
        return "\n".join(lines)


@dataclass(frozen=True)
class SweepPlan:
    """``--sweep``: how many trials each sweep runs, and their time budget."""

    num_samples: int = 8
    time_budget_s: float | None = None


def swept_config(preset: str, overrides: list[str], plan: SweepPlan) -> tuple[Config, dict[str, Any]]:
    """The encoder sweep, then the ranker sweep on the best encoder's features: the config to train with,
    and what each sweep found."""
    from shoprank.sweep import SPACES, run_sweep

    encoder = run_sweep("encoder", preset, overrides, SPACES / "encoder_space.yaml",
                        num_samples=plan.num_samples, time_budget_s=plan.time_budget_s)
    ranker = run_sweep("ranker", encoder.best_config, [], SPACES / "ranker_space.yaml",
                       num_samples=plan.num_samples, time_budget_s=plan.time_budget_s)
    found = {
        f"{kind} sweep": f"best validation NDCG@10 {outcome.best_metric:.4f} of {len(outcome.results)} trials, "
                         f"{outcome.best_params} ({outcome.best_config})"
        for kind, outcome in (("encoder", encoder), ("ranker", ranker))
    }
    return load_config(ranker.best_config), found


def run_pipeline(config: Config, run: Run | None = None, *, sweeps: dict[str, Any] | None = None) -> PipelineSummary:
    """Every stage (each skipped when current), then A and B registered; the summary.

    ``run`` defaults to the one ``config`` names (pass one to use a filesystem object);
    ``sweeps`` is what :func:`swept_config` found, for the summary.
    """
    run = run or Run.for_config(config)
    since = len(run.stage_log())
    with StageProgress(run, since):
        run = run_stages(config, run)
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
    notes = {name: stage["notes"] for name, stage in stages.items() if stage.get("notes")}
    return PipelineSummary(run.uri(), run.stage_log()[since:], metrics, sweeps or {}, notes)
