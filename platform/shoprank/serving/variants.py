"""Variants: what the A/B router chooses between, each resolved from a registry alias.

A registry entry (:mod:`shoprank.store.registry`) names a run and, optionally, how to
serve it: ``encoder`` (``fine_tuned``: the run's encoder and index; ``zero_shot``:
the pretrained encoder named by the run's config, over the same catalogue) and
``strategy`` (``ranker``, the hybrid: every candidate source and the run's XGBoost
ranker; ``retrieval``: every source, encoder similarity, BM25 and popularity, no trained
ranker; ``content``: the encoder alone; ``collaborative``: the item-item model alone;
:data:`shoprank.recsys.retrieval.STRATEGY_SOURCES`). An incremental update's run holds
only a ranker and names its ``base_run``, whose data, encoder and index it serves
with. :func:`register_variant` writes an entry for any strategy from a run that exists,
without training anything (``shoprank variants register``).
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from shoprank.config import Config
from shoprank.encoder.runtime import Runtime, chosen_runtime
from shoprank.errors import ShopRankError
from shoprank.recsys.messages import Strategy
from shoprank.store.registry import Registry
from shoprank.store.run import MANIFEST, Run


EncoderKind = Literal["fine_tuned", "zero_shot"]
ENCODERS: tuple[str, ...] = get_args(EncoderKind)
STRATEGIES: tuple[str, ...] = get_args(Strategy)
ALIAS_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""A registry alias a variant names: a letter or digit, then letters, digits, ``_``, ``.`` or ``-`` (64 at most)."""


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



def register_variant(registry: Registry, alias: str, *, run: str | None = None, from_alias: str | None = None,
                     encoder: str = "fine_tuned", strategy: str = "ranker") -> dict:
    """Point registry ``alias`` at an existing run served with ``encoder`` and ``strategy``: ``run`` (a run URI) or
    the run ``from_alias`` names now (an incremental update's ``base_run`` kept). Nothing is trained: the run must
    hold what the choice serves from (the encoder's catalogue embeddings; for ``ranker`` its trained ranker; for
    ``collaborative`` behaviour events). A bad choice is a :class:`ShopRankError` naming the field (the command's
    option) at fault, and nothing is written."""
    from shoprank.data.io import read_table
    from shoprank.data.schema import ENGAGEMENT_TYPES
    from shoprank.encoder.index import ZERO_SHOT_PRODUCTS

    if not ALIAS_PATTERN.match(alias):
        raise ShopRankError(f"NAME {alias!r}: a registry alias is a letter or digit, then letters, digits, '_', '.' "
                            "or '-', 64 characters at most")
    if encoder not in ENCODERS:
        raise ShopRankError(f"--encoder {encoder!r}: one of {', '.join(ENCODERS)}")
    if strategy not in STRATEGIES:
        raise ShopRankError(f"--strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
    if (run is None) == (from_alias is None):
        raise ShopRankError("--run / --from-alias: give exactly one (the run to serve, or the alias whose run to serve)")
    base_run = None
    if from_alias is not None:
        try:
            entry = registry.get(from_alias)
        except ShopRankError as exc:
            raise ShopRankError(f"--from-alias {from_alias!r}: {exc}") from None
        run, base_run = entry["run"], entry.get("base_run")
        where = f"--from-alias {from_alias!r} (run {run})"
    else:
        where = f"--run {run!r}"
    assert run is not None
    ranker_run = Run.from_uri(run)
    if not ranker_run.exists(MANIFEST):
        raise ShopRankError(f"{where}: no run there (no {MANIFEST}); `shoprank config` shows run.root and run.name")
    served = Run.from_uri(base_run) if base_run else ranker_run
    if strategy == "ranker" and encoder == "zero_shot":
        raise ShopRankError("--strategy ranker with --encoder zero_shot: the run's ranker learnt from the fine-tuned "
                            "encoder's similarities; serve the ranker with --encoder fine_tuned, or the zero-shot "
                            "encoder with --strategy retrieval or content")
    if strategy == "ranker" and not ranker_run.exists("ranker", "model"):
        raise ShopRankError(f"--strategy ranker: {where} has no trained ranker (ranker/model); choose retrieval, "
                            "content or collaborative, which need none")
    needed = ZERO_SHOT_PRODUCTS if encoder == "zero_shot" else ("index", "products.faiss")
    if not served.exists(*needed):
        raise ShopRankError(f"--encoder {encoder}: {where} has no {'/'.join(needed)} (written by its embed stage): "
                            "run its pipeline to the embed stage first")
    if strategy == "collaborative":
        kinds = read_table(served, "data", "events", columns=["event_type"]).column("event_type").to_pylist()
        if not ENGAGEMENT_TYPES.intersection(kinds):
            raise ShopRankError(f"--strategy collaborative: {where} has no engagement events (judged queries only), "
                                "so its item-item model is empty and every answer would be the popular fallback")
    details = {"encoder": encoder, "strategy": strategy, **({"base_run": base_run} if base_run else {}),
               **({"registered_from": from_alias} if from_alias else {})}
    return registry.set(alias, run, **details)
