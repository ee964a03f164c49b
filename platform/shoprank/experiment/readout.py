"""The user-level readout as Markdown: what a data scientist signs (the report's ``user_level`` section).

Per variant the money and the funnel of users; per metric B against A with the
fixed-horizon interval and p-value, the CUPED-adjusted interval and its variance
reduction, and the always-valid interval and p-value; then the verdict and the
rule that produced it, and the app's guardrails when the report has them. A figure the report could not compute is a dash followed
by its reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _num(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _effect(effect: Mapping[str, Any] | None, low: str = "low", high: str = "high") -> str:
    if not effect or effect.get("difference") is None:
        return "–"
    spec = ".4g"
    return (f"{_num(effect['difference'], '+' + spec)} [{_num(effect.get(low), spec)}, "
            f"{_num(effect.get(high), spec)}]")


def user_level_markdown(section: Mapping[str, Any], guardrails: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """The ``user_level`` section of :func:`shoprank.experiment.report.ab_report` as Markdown, with the report's
    ``guardrails`` (the app's, :mod:`shoprank.experiment.guardrails`) when given."""
    lines = [f"**Unit: the user.** Experiment start {section.get('experiment_start') or '–'}; "
             f"{section.get('users_with_history', 0)} users with pre-experiment history (CUPED); "
             f"revenue: {section.get('revenue')}.", "",
             "| variant | users | sessions | shown | clicked | carted | bought | revenue | per user | AOV |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in section.get("variants", {}).items():
        funnel = row["funnel_users"]
        lines.append(f"| {name} | {row['users']} | {row['sessions']} | {funnel['shown']} | {funnel['clicked']} | "
                     f"{funnel['carted']} | {funnel['bought']} | {_num(row['revenue'], ',.2f')} | "
                     f"{_num(row['revenue_per_user'], '.2f')} | {_num(row['average_order_value'], '.2f')} |")
    metrics = section.get("metrics")
    if not metrics:
        return "\n".join(lines)
    lines += ["", "| metric | A | B | B - A [95% CI] | p | CUPED: B - A [95% CI] | variance cut | "
                  "always valid: B - A [CS] | p (any look) |", "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, entry in metrics.items():
        if "missing" in entry:
            notes.append(f"{name}: {entry['missing']}")
            continue
        fixed, adjusted, live = entry["fixed_horizon"], entry["cuped"], entry["always_valid"]
        sequence = {**live, "difference": fixed["difference"]} if live else None
        lines.append(
            f"| {name} ({fixed['method']}) | {_num(fixed['control'], '.4g')} | {_num(fixed['treatment'], '.4g')} | "
            f"{_effect(fixed)} | {_num(fixed['p_value'], '.3g')} | {_effect(adjusted)} | "
            f"{_num(adjusted.get('variance_reduction'), '.1%')} | {_effect(sequence)} | "
            f"{_num(live['p_value'] if live else None, '.3g')} |")
        if fixed.get("missing"):
            notes.append(f"{name}: {fixed['missing']}")
    verdict = section["verdict"]
    lines += ["", f"**Verdict: {verdict['decision']}** ({verdict['rule']}; planned size "
                  f"{section['planned_users_per_arm']} users per arm"
                  f"{', reached' if section.get('past_planned_size') else ''})."]
    if guardrails:
        lines += ["", "| guardrail | " + " | ".join(guardrails) + " |", "|---|" + "---|" * len(guardrails),
                  "| answers (5xx) | " + " | ".join(f"{g['requests']} ({g['errors']})" for g in guardrails.values())
                  + " |",
                  "| p99 latency | " + " | ".join(f"{g['p99_ms']:.0f} ms" for g in guardrails.values()) + " |",
                  "| breached | " + " | ".join("; ".join(g["breached"]) or "none" for g in guardrails.values()) + " |"]
    if notes:
        lines += ["", "Not computed: " + "; ".join(notes) + "."]
    return "\n".join(lines)
