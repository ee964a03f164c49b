"""Variants: what the A/B router chooses between, each resolved from a registry alias.

A registry entry (:mod:`shoprank.store.registry`) names a run and, optionally, how to
serve it: ``encoder`` (``fine_tuned``: the run's encoder and index; ``zero_shot``:
the pretrained encoder named by the run's config, over the same catalogue) and
``strategy`` (``ranker``: the run's XGBoost ranker; ``retrieval``: encoder
similarity and popularity, no trained ranker). An incremental update's run holds
only a ranker and names its ``base_run``, whose data, encoder and index it serves
with.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shoprank.config import Config
from shoprank.encoder.runtime import Runtime, chosen_runtime
from shoprank.recsys.messages import Strategy
from shoprank.store.registry import Registry
from shoprank.store.run import Run


EncoderKind = Literal["fine_tuned", "zero_shot"]


class VariantSpec(BaseModel):
    """One variant, resolved: which runs to load and how to rank."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    alias: str
    run: str
    """The run whose catalogue, events, encoder and index serve (an update's ``base_run``)."""
    ranker_run: str
    """The run whose ``ranker/model`` ranks (the alias's own run)."""
    encoder: EncoderKind = "fine_tuned"
    strategy: Strategy = "ranker"
    runtime: Runtime = Field("torch", description="How its query encoder runs (serve.encoder_runtime, resolved: "
                             "shoprank.encoder.runtime).")


SYSTEM_OF: dict[tuple[EncoderKind, Strategy], str] = {
    ("zero_shot", "retrieval"): "retrieval (zero-shot encoder)",
    ("fine_tuned", "retrieval"): "retrieval (fine-tuned encoder)",
    ("fine_tuned", "ranker"): "fine-tuned retrieval + ranker",
    ("zero_shot", "content"): "retrieval (zero-shot encoder)",
    ("fine_tuned", "content"): "retrieval (fine-tuned encoder)",
}
"""The row of a run's offline evaluation (:mod:`shoprank.evaluation.offline`) that a variant serves. ``content`` is
exactly the evaluation's dense retrieval rows (the encoder's nearest products by cosine), less its cold-start
fallback, which the evaluation's row does not have; ``collaborative`` has no row (no offline figure)."""


def offline_figures(spec: VariantSpec) -> dict[str, object]:
    """The variant's offline NDCG@10 per task, from its run's evaluation, to show beside the online figures; a task
    without a figure says why."""
    system = SYSTEM_OF.get((spec.encoder, spec.strategy))
    evaluation = Run.from_uri(spec.run).manifest().get("stages", {}).get("evaluate", {})
    table = evaluation.get("metrics", {}).get("table", {})
    if system is None or spec.ranker_run != spec.run:
        why = ("an incremental update: its validation figure is in its run's manifest" if system
               else "no offline figure: the evaluation has no item-item-only system" if spec.strategy == "collaborative"
               else f"the evaluation has no {spec.encoder} encoder with the {spec.strategy} strategy")
        return {"system": system, "ndcg@10": {}, "note": why}
    return {"system": system, "note": None if table else "the run has no offline evaluation",
            "ndcg@10": {kind: rows[system]["ndcg@10"] for kind, rows in table.items() if system in rows}}


def resolve_variant(registry: Registry, name: str, alias: str) -> VariantSpec:
    """Variant ``name`` as registry ``alias`` describes it now."""
    entry = registry.get(alias)
    return VariantSpec(
        name=name, alias=alias, run=entry.get("base_run") or entry["run"], ranker_run=entry["run"],
        encoder=entry.get("encoder", "fine_tuned"), strategy=entry.get("strategy", "ranker"),
    )


def resolve_variants(config: Config) -> dict[str, VariantSpec]:
    """``serve.variants`` (name -> alias) looked up in the registry under ``run.root``, each with the runtime its
    query encoder runs in (``serve.encoder_runtime`` for its run's export)."""
    registry = Registry(config.run.root)
    specs = {name: resolve_variant(registry, name, alias) for name, alias in config.serve.variants.items()}
    return {name: spec.model_copy(update={"runtime": chosen_runtime(config, Run.from_uri(spec.run), spec.encoder,
                                                                     config.serve.encoder_runtime)})
            for name, spec in specs.items()}


def register_variants(config: Config, run: Run) -> dict[str, dict]:
    """The demo's experiment: ``A`` the baseline (zero-shot encoder, no ranker), ``B`` the trained run."""
    registry = Registry.beside(run)
    return {
        "A": registry.set("A", run.uri(), encoder="zero_shot", strategy="retrieval"),
        "B": registry.set("B", run.uri(), encoder="fine_tuned", strategy="ranker"),
    }

