"""The A/B report as Markdown: what the web page shows, ``shoprank simulate`` prints and ``shoprank experiment
readout`` writes, the verdict first.

Its own module so that the page and the traffic simulator, which the page drives,
both use it without importing each other.
"""

from __future__ import annotations

from typing import Any

from shoprank.experiment.calibrate import PER_IMPRESSION_AA_FALSE_POSITIVES
from shoprank.experiment.readout import comparisons_markdown, headline_markdown, user_level_markdown

PER_IMPRESSION_TITLE = "Per-impression figures: descriptive, not for decisions"
"""The line the per-impression figures sit under (the browser test finds the section by it)."""


def _num(value: float | None, spec: str) -> str:
    """A figure, or a dash while there is no data for it."""
    return "–" if value is None else format(value, spec)


def _interval(figure: dict[str, Any], spec: str = ".4f") -> str:
    return f"{_num(figure['rate'], spec)} [{_num(figure['low'], spec)}, {_num(figure['high'], spec)}]"


def report_markdown(report: dict[str, Any]) -> str:
    """The A/B readout as Markdown, what a reader decides on first: the verdict, the decision metric's user-level
    effect, the guardrails and the sample ratio (:func:`headline_markdown`); then the offline figures and the
    user-level details; last, under a line that says so, the per-impression figures, descriptive only."""
    lines = [headline_markdown(report)]
    offline = report.get("offline") or {}
    if offline:
        lines += ["", "**Offline, test split (NDCG@10 of the system each variant serves):** " + "; ".join(
            f"{name}: " + (", ".join(f"{kind} {value:.4f}" for kind, value in figures["ndcg@10"].items())
                           or f"– ({figures['note']})")
            for name, figures in offline.items())]
    compared = report.get("comparisons") or {}
    if report.get("user_level"):
        lines += ["", user_level_markdown(report["user_level"], compared.get("control", "A"),
                                          (compared.get("treatments") or ["B"])[0])]
    if len(compared.get("treatments") or ()) > 1:
        lines += ["", comparisons_markdown(compared)]
    rates = PER_IMPRESSION_AA_FALSE_POSITIVES
    lines += ["", "---", "", f"**{PER_IMPRESSION_TITLE}.** Each impression counted as independent, which a shopper's "
              f"impressions are not: in A/A calibration (`shoprank experiment calibrate`) these z-tests declared a "
              f"difference in {rates['ctr']:.1%} (CTR) and {rates['conversion']:.1%} (conversion) of experiments at "
              f"alpha 0.05. The verdict above reads the user-level test.", "",
              "| variant | users | impressions | clicks | add to cart | purchases | CTR [95% CI] | conversion [95% CI] |",
              "|---|---|---|---|---|---|---|---|"]
    for name, row in report["variants"].items():
        lines.append(f"| {name} | {row['users']} | {row['impressions']} | {row['clicks']} | {row['add_to_carts']} | "
                     f"{row['purchases']} | {_interval(row['ctr'])} | {_interval(row['conversion'])} |")
    arms = {name: arm["lift"] for name, arm in compared.get("arms", {}).items()} if compared else {}
    control = compared.get("control", "A")
    for name, lifts in (arms or {"B": report.get("lift") or {}}).items():
        for metric, lift in lifts.items():
            lines.append("")
            lines.append(f"{name} vs {control} per impression, {metric}: lift {_num(lift['lift'], '+.1%')} "
                         f"[{_num(lift['lift_low'], '+.1%')}, {_num(lift['lift_high'], '+.1%')}], "
                         f"p = {_num(lift['p_value'], '.3g')} (descriptive)")
    forced = report.get("side_by_side") or {}
    if forced:
        lines += ["", "Side-by-side answers (forced; not part of the test): " + "; ".join(
            f"{v}: {r['impressions']} shown, {r['clicks']} clicks, {r['add_to_carts']} carts, {r['purchases']} purchases"
            for v, r in forced.items())]
    return "\n".join(lines)
