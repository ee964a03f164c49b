"""The user-level readout as Markdown: what a data scientist signs (the report's ``user_level`` section).

:func:`headline_markdown` comes first: the verdict and the rule that produced it, the decision metric's effect
with its interval (the estimate the verdict read), the app's guardrails and the sample-ratio check.
:func:`user_level_markdown` follows with the details: per variant the money and the funnel of users; per metric
B against A with the fixed-horizon interval and p-value, the CUPED-adjusted interval and its variance reduction,
and the always-valid interval and p-value; with more than two variants, :func:`comparisons_markdown` gives
each treatment against the control with its Holm-adjusted p-values. :func:`readout_png` draws the same readout as
one picture
(``shoprank experiment readout`` writes both files). A figure the report could not compute is a dash followed by
its reason.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shoprank.store.location import Location


def _num(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _effect(effect: Mapping[str, Any] | None, low: str = "low", high: str = "high") -> str:
    if not effect or effect.get("difference") is None:
        return "–"
    spec = ".4g"
    return (f"{_num(effect['difference'], '+' + spec)} [{_num(effect.get(low), spec)}, "
            f"{_num(effect.get(high), spec)}]")


def _metric_label(name: str) -> str:
    return name.replace("_", " ")


def _pair(report: Mapping[str, Any]) -> tuple[str, str]:
    """The control and the first treatment: the two variants ``user_level.metrics`` compares (A and B unless the
    report names others)."""
    compared = report.get("comparisons") or {}
    return compared.get("control", "A"), (compared.get("treatments") or ["B"])[0]


def headline_markdown(report: Mapping[str, Any]) -> str:
    """What a reader decides on, first: the verdict, the decision metric's user-level effect with its interval and
    p-values (from the estimate the verdict read: CUPED-adjusted where CUPED applies, so the two never disagree),
    the guardrails and the sample-ratio check."""
    section = report.get("user_level") or {}
    a, b = _pair(report)
    verdict = section.get("verdict")
    lines = [f"**Verdict: {verdict['decision']}** ({verdict['rule']})." if verdict
             else "**Verdict: none yet** (both variants need users)."]
    metric = section.get("decision_metric")
    entry = (section.get("metrics") or {}).get(metric) if metric else None
    estimate = entry[entry["estimate"]] if entry and "missing" not in entry else None
    if estimate is not None and estimate["difference"] is None:
        lines += ["", f"**Decision metric: {_metric_label(metric)}**: no figures yet ({estimate['missing']})."]
    elif estimate is not None:
        live = entry.get("always_valid")
        if entry["estimate"] == "cuped":
            how = (f"CUPED-adjusted: {_num(estimate.get('variance_reduction'), '.1%')} of its variance removed, "
                   f"{section['users_with_history']} shoppers with a pre-period")
        else:
            how = f"not CUPED-adjusted: {entry['cuped'].get('missing') or 'no pre-period'}"
        sequence = {**live, "difference": estimate["difference"]} if live else None
        any_look = _num(live["p_value"] if live else None, ".3g")
        lines += ["", f"**Decision metric: {_metric_label(metric)}** (per user, {estimate['method']}; {how}): "
                      f"{a} {_num(estimate['control'], '.4g')}, {b} {_num(estimate['treatment'], '.4g')}; "
                      f"{b} - {a} {_effect(estimate)} (95% CI), p = {_num(estimate['p_value'], '.3g')}; "
                      f"always valid {_effect(sequence)}, p (any look) = {any_look}."
                      f" Planned size {section['planned_users_per_arm']:,} users per arm"
                      f"{', reached' if section.get('past_planned_size') else ''}"
                      f" (from {section['planned_size_from']})."]
    elif metric:
        lines += ["", f"**Decision metric: {_metric_label(metric)}**: no figures yet"
                      + (f" ({entry['missing']})." if entry else ".")]
    compared = report.get("comparisons") or {}
    if len(compared.get("treatments") or ()) > 1 and metric:
        lines += ["", f"**Each treatment against {compared['control']}** ({_metric_label(metric)}, p-values "
                      f"Holm-adjusted over the {len(compared['treatments'])} comparisons): " + "; ".join(
                          _arm_line(name, compared["control"], compared["arms"][name]["metrics"].get(metric))
                          for name in compared["treatments"]) + "."]
    guardrails = report.get("guardrails") or {}
    lines += ["", "**Guardrails:** " + ("; ".join(
        f"{name} {g['requests']} answers, {g['errors']} 5xx, p99 {g['p99_ms']:.0f} ms, "
        + (f"BREACHED: {'; '.join(g['breached'])}" if g["breached"] else "none breached")
        for name, g in guardrails.items()) if guardrails else "no answers in the reporting replica's window yet, "
        "nothing to judge") + "."]
    ratio = report.get("sample_ratio")
    if ratio:
        users = ", ".join(f"{name} {count}" for name, count in ratio["observed"].items())
        state = "**mismatch**: check the assignment" if ratio["mismatch"] else "as configured"
        lines += ["", f"**Sample ratio:** users {users}; p = {_num(ratio['p_value'], '.3f')} ({state})."]
    return "\n".join(lines)


def _arm_line(name: str, control: str, entry: Mapping[str, Any] | None) -> str:
    """One treatment's effect on a metric against the control, with its raw and Holm-adjusted p-values."""
    if not entry or "missing" in entry:
        return f"{name}: no figures ({entry['missing'] if entry else 'not computed'})"
    estimate, holm = entry[entry["estimate"]], entry.get("holm") or {}
    if estimate.get("difference") is None:
        return f"{name}: no figures yet ({estimate.get('missing')})"
    live = entry.get("always_valid") or {}
    return (f"{name} - {control} {_effect(estimate)}, p = {_num(estimate['p_value'], '.3g')} (Holm "
            f"{_num(holm.get('p_value'), '.3g')}), always valid p = {_num(live.get('p_value'), '.3g')} (Holm "
            f"{_num(holm.get('always_valid_p_value'), '.3g')})")


def comparisons_markdown(compared: Mapping[str, Any]) -> str:
    """The ``comparisons`` section (A/B/n) as Markdown: per treatment and metric the difference from the control
    with its 95% interval, its p-value and the Holm-adjusted one (the family: the metric's comparisons), and the
    always-valid p-value raw and adjusted."""
    control = compared["control"]
    lines = [f"**A/B/n: each treatment against {control}.** {compared['correction'].capitalize()}'s step-down "
             f"correction, family {compared['family']}; alpha {compared['alpha']:g}.", "",
             f"| treatment | users | metric | treatment - {control} [95% CI] | p | Holm p | always-valid p | Holm "
             "always-valid p |", "|---|---|---|---|---|---|---|---|"]
    for name in compared["treatments"]:
        arm = compared["arms"][name]
        for metric, entry in arm["metrics"].items():
            if "missing" in entry:
                continue
            estimate, holm, live = entry[entry["estimate"]], entry["holm"], entry.get("always_valid") or {}
            lines.append(f"| {name} | {arm['users']} | {metric} ({estimate['method']}) | {_effect(estimate)} | "
                         f"{_num(estimate['p_value'], '.3g')} | {_num(holm['p_value'], '.3g')} | "
                         f"{_num(live.get('p_value'), '.3g')} | {_num(holm['always_valid_p_value'], '.3g')} |")
    return "\n".join(lines)


def user_level_markdown(section: Mapping[str, Any], control: str = "A", treatment: str = "B") -> str:
    """The ``user_level`` section of :func:`shoprank.experiment.report.ab_report` in full, as Markdown: per variant
    the money and the funnel of users, per metric (``treatment`` against ``control``) the fixed-horizon, CUPED and
    always-valid figures (what :func:`headline_markdown` puts first comes from here)."""
    a, b = control, treatment
    lines = [f"**Unit: the user.** Experiment start {section.get('experiment_start') or '–'}; "
             f"{section.get('users_with_history', 0)} users with a pre-period (CUPED's covariate: "
             f"{section.get('pre_period') or '–'}); revenue: {section.get('revenue')}.", "",
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
    lines += ["", f"| metric | {a} | {b} | {b} - {a} [95% CI] | p | CUPED: {b} - {a} [95% CI] | variance cut | "
                  f"always valid (CUPED where it applies): {b} - {a} [CS] | p (any look) |",
              "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, entry in metrics.items():
        if "missing" in entry:
            notes.append(f"{name}: {entry['missing']}")
            continue
        fixed, adjusted, live = entry["fixed_horizon"], entry["cuped"], entry["always_valid"]
        sequence = {**live, "difference": entry[entry["estimate"]]["difference"]} if live else None
        lines.append(
            f"| {name} ({fixed['method']}) | {_num(fixed['control'], '.4g')} | {_num(fixed['treatment'], '.4g')} | "
            f"{_effect(fixed)} | {_num(fixed['p_value'], '.3g')} | {_effect(adjusted)} | "
            f"{_num(adjusted.get('variance_reduction'), '.1%')} | {_effect(sequence)} | "
            f"{_num(live['p_value'] if live else None, '.3g')} |")
        if fixed.get("missing"):
            notes.append(f"{name}: {fixed['missing']}")
    if notes:
        lines += ["", "Not computed: " + "; ".join(notes) + "."]
    return "\n".join(lines)


FUNNEL = ("shown", "clicked", "carted", "bought")


def readout_png(report: Mapping[str, Any], path: Path) -> None:
    """The readout of a whole ``/ab/report`` as a PNG at ``path``: per variant the funnel of users; per metric
    B - A relative to A, with the fixed-horizon interval (thick) and the always-valid one (thin); the verdict, its
    rule and the guardrails as the title. A metric without figures is left out and named. The file appears whole
    or not at all (:meth:`~shoprank.store.location.Location.write_bytes`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    section = report.get("user_level") or {}
    figure, (funnel_axis, effect_axis) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [1, 1.4]})
    variants = section.get("variants") or {}
    width = 0.8 / max(1, len(variants))
    for i, (name, row) in enumerate(variants.items()):
        shares = [row["funnel_users"][step] / row["users"] if row["users"] else 0.0 for step in FUNNEL]
        funnel_axis.bar([x + i * width for x in range(len(FUNNEL))], shares, width, label=f"{name} ({row['users']} users)")
    funnel_axis.set_xticks([x + width * (len(variants) - 1) / 2 for x in range(len(FUNNEL))], FUNNEL)
    funnel_axis.set_ylabel("share of the variant's users")
    funnel_axis.set_title("Funnel of users")
    if variants:
        funnel_axis.legend()
    rows, left_out = [], []
    for name, entry in (section.get("metrics") or {}).items():
        estimate = entry.get(entry.get("estimate", "fixed_horizon")) or {}
        control = estimate.get("control")
        if estimate.get("difference") is None or not control:
            left_out.append(name)
            continue
        live = entry.get("always_valid") or {}
        rows.append((name, estimate["difference"] / control, estimate.get("low"), estimate.get("high"),
                     live.get("low"), live.get("high"), control))
    for y, (name, relative, low, high, live_low, live_high, control) in enumerate(rows):
        if live_low is not None and live_high is not None:
            effect_axis.plot([live_low / control, live_high / control], [y, y], color="#9bd", linewidth=2)
        if low is not None and high is not None:
            effect_axis.plot([low / control, high / control], [y, y], color="#236", linewidth=6)
        effect_axis.plot([relative], [y], "o", color="#d62")
    effect_axis.axvline(0.0, color="#666", linewidth=1)
    effect_axis.set_yticks(range(len(rows)), [row[0] for row in rows])
    effect_axis.invert_yaxis()
    effect_axis.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    effect_axis.set_xlabel("B - A, relative to A (CUPED-adjusted where it applies): 95% interval (thick), "
                           "always-valid (thin)")
    effect_axis.set_title("B against A per user" + (f" (no figures: {', '.join(left_out)})" if left_out else ""))
    if not rows:
        effect_axis.text(0.5, 0.5, "no figures yet: both variants need users", ha="center", transform=effect_axis.transAxes)
    verdict = section.get("verdict")
    title = [f"{report.get('experiment', 'experiment')}: " + (f"{verdict['decision']} ({verdict['rule']})" if verdict
                                                             else "no verdict yet")]
    guardrails = report.get("guardrails") or {}
    if guardrails:
        title.append("Guardrails: " + "; ".join(
            f"{name} p99 {g['p99_ms']:.0f} ms, 5xx {g['error_rate']:.1%} of {g['requests']}"
            + (f" BREACHED: {', '.join(g['breached'])}" if g["breached"] else "") for name, g in guardrails.items()))
    figure.suptitle("\n".join(textwrap.fill(line, 150) for line in title), fontsize=10)
    figure.tight_layout()
    picture = io.BytesIO()
    figure.savefig(picture, format="png", dpi=100)
    plt.close(figure)
    Location(str(path.parent)).write_bytes(picture.getvalue(), path.name)
