"""The A/B report (``GET /ab/report``) from what the event store holds.

Only answers the router assigned count: impressions of forced requests (the
side-by-side view) and the events on them are left out. An event belongs to the
variant that showed the product in the request it names (``request_id``), and counts
once per impression and kind: an impression is clicked or not, so a client sending
the same click a thousand times (or a click on a product that answer did not show)
changes nothing, and no rate can exceed 1.

Per variant: users, sessions, impressions, clicks, add-to-carts, purchases; CTR
(clicks / impressions) and conversion (purchases / impressions) with Wilson
intervals; clicks per session; the funnel; and ``hides``, the impressions the shopper
said "not interested" to (the product, its brand or its category: one per impression),
with their rate (``hide_rate``), a guardrail: a ranker that shows what shoppers do not
want gets more of them. A hide is no engagement, so CTR and conversion leave it out. Then B against A on CTR and conversion
(lift, interval, p-value) and the sample-ratio check of users against the split.
``timeline``: per variant, cumulative CTR and conversion at up to ``TIMELINE_POINTS``
moments between the first and the last impression (what the page plots).
``side_by_side``: the forced answers' own counts, apart from the test.

``user_level``: the same engagements with the shopper as the unit (shoppers are
what the router randomises; see :mod:`shoprank.experiment.userstats`): per variant
users, sessions, revenue (a purchase's product price, times its ``quantity`` where
the events carry one, else 1), revenue per user, average order value and the
funnel of users shown, clicked, carted, bought; per metric B against A with the
fixed-horizon interval and p-value (delta method for ratio metrics, Welch for
per-user ones), the CUPED-adjusted result with its variance reduction, and the
always-valid mSPRT readout (:mod:`shoprank.experiment.sequential`) tuned for
``planned`` users per arm, on the CUPED-adjusted estimate where CUPED applies
(``estimate`` names which); and a one-line verdict on ``decision_metric`` read from
that same estimate and test, so the headline and the verdict never disagree.
Revenue figures need ``prices`` (product id -> price); without them they say so.

``comparisons``, **A/B/n**: every variant of the split but the control (``treatments``)
against the control, on every figure above (the per-impression lifts, and every
user-level metric with its fixed-horizon, CUPED and always-valid readouts), the p-values
adjusted with **Holm's step-down** procedure (:func:`shoprank.experiment.stats.holm`).
The family is *one metric's comparisons*: for each metric, its ``m`` = (variants - 1)
p-values of treatment against control, so the chance that any treatment is declared
different from the control on that metric when none is stays at alpha. The verdict reads
one family, the decision metric's, twice: the always-valid p-values (valid at any look,
and Holm needs nothing else of them) and, at the planned size, the fixed-horizon ones of
the same estimate. It ships the treatment whose adjusted test shows it above the control
(the largest difference, when several), keeps the control when every treatment is shown
below it or the planned size is reached without a winner, and otherwise keeps running.
With two variants the family has one member, Holm changes nothing, and the
verdict is ``user_level``'s own; with more, ``user_level``'s verdict *is* this one (its
``metrics`` stay the control against the first treatment, as with two).
The sample-ratio check is already over every arm: a chi-square goodness-of-fit test of the
users per variant against the split's weights (``sample_ratio``; ``mismatch`` below p = 0.001).

The CUPED covariate is each shopper's **pre-period**: their events in the served
run's event log over its last ``serve.cuped_pre_period_days`` (:func:`run_pre_period`,
computed once by the ingress; the log is pseudonymised with the key the app uses, so
its user ids are the store's), plus the live store's events from the log's end to
the experiment's ``start`` (the first assigned impression unless given), joined by
pseudonym. The two do not overlap, so no event counts twice.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shoprank.experiment.sequential import ALPHA, UNPLANNED, PlannedSize, always_valid, mixing_sd
from shoprank.experiment.stats import as_dict, compare, funnel, holm, per_session, sample_ratio_mismatch, wilson
from shoprank.data.schema import NEGATIVE_EVENT_TYPES
from shoprank.experiment.userstats import PER_USER_METRICS, RATIO_METRICS, REVENUE_METRICS, UserTotals, metric_effects
from shoprank.store.events import EventStore

TIMELINE_POINTS = 30
ENGAGEMENTS = ("click", "add_to_cart", "purchase")
HIDE = "hide"
"""The kind every "not interested" type counts as: an impression is hidden or not, whichever of them was sent."""
SESSION_GAP_S = 1800.0
"""A user's impressions more than 30 minutes apart start a new session (the web analytics convention)."""
DECISION_METRIC = "conversion_per_user"
"""The metric the verdict reads unless ``serve.decision_metric`` names another (docs/experiments.md argues it)."""


@dataclass(frozen=True)
class PrePeriod:
    """Shoppers' totals in the served run's event log over its last days: the CUPED covariate's history."""

    totals: dict[str, np.ndarray]
    """Pseudonym -> totals in :class:`UserTotals`' field order."""
    since: dt.datetime | None
    until: dt.datetime | None
    """The log's last event: the live store's events after it complete the pre-period."""


def run_pre_period(events: pa.Table, prices: Mapping[str, float] | None, days: float) -> PrePeriod:
    """Each shopper's totals over the last ``days`` of a run's event log (user_id, session_id, product_id,
    event_type, ts, optionally quantity)."""
    if not events.num_rows:
        return PrePeriod({}, None, None)
    until = pc.max(events.column("ts")).as_py()
    since = until - dt.timedelta(days=days)
    recent = events.filter(pc.greater_equal(events.column("ts"), pa.scalar(since, events.schema.field("ts").type)))
    return PrePeriod(_history(recent, prices), since, until)


def ab_report(store: EventStore, split: Mapping[str, float], control: str | None = None,
              treatment: str | None = None, *, prices: Mapping[str, float] | None = None,
              start: dt.datetime | None = None, planned: PlannedSize = UNPLANNED, pre_period: PrePeriod | None = None,
              decision_metric: str = DECISION_METRIC) -> dict[str, Any]:
    """The report's figures as JSON-ready dicts (see the module docstring); ``pre_period``: the run's history
    (:func:`run_pre_period`), without which the covariate is the live store's events before the start alone.
    ``control``: the variant every other is compared with (default: the split's first); ``treatment``: the one
    ``lift`` and ``user_level.metrics`` compare with it (default: the next of the split), as with two variants;
    ``comparisons`` holds every treatment."""
    names = list(split)
    control = control if control is not None else (names[0] if names else "A")
    treatments = [name for name in names if name != control]
    treatment = treatment if treatment is not None else (treatments[0] if treatments else "B")
    shown: dict[tuple[str, str], str] = {}
    """(request, product) of each assigned impression -> its variant."""
    shown_to: dict[tuple[str, str], str] = {}
    """(request, product) of each assigned impression -> its user."""
    requests_of: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    """(variant, user) -> request -> its first impression's time: the sessions."""
    impressions_of: dict[tuple[str, str], int] = defaultdict(int)
    user_engaged: list[tuple[str, str, str, str, str, float]] = []
    """(variant, user, request, product, kind, quantity) of each counted engagement."""
    shown_at: list[tuple[float, str]] = []
    engaged_at: list[tuple[float, str, str]] = []
    counted: dict[str, dict[str, Any]] = {
        v: {"users": set(), "sessions": set(), "view": 0, "click": 0, "add_to_cart": 0, "purchase": 0, HIDE: 0}
        for v in split
    }
    side_by_side: dict[str, dict[str, int]] = {}
    forced: dict[tuple[str, str], str] = {}
    for impression in store.impressions():
        if impression.forced:
            forced[(impression.request_id, impression.product_id)] = impression.variant
            row = side_by_side.setdefault(impression.variant, dict.fromkeys(("view", *ENGAGEMENTS), 0))
            row["view"] += 1
            continue
        if impression.variant not in counted:
            continue
        shown[(impression.request_id, impression.product_id)] = impression.variant
        shown_to[(impression.request_id, impression.product_id)] = impression.user_id
        requests_of[(impression.variant, impression.user_id)].setdefault(impression.request_id,
                                                                          impression.ts.timestamp())
        impressions_of[(impression.variant, impression.user_id)] += 1
        shown_at.append((impression.ts.timestamp(), impression.variant))
        row = counted[impression.variant]
        row["users"].add(impression.user_id)
        row["view"] += 1
    events = store.events()
    engaged: set[tuple[str, str, str]] = set()
    for request, product, session, kind, ts, quantity in zip(
        *(events.column(name).to_pylist() for name in ("request_id", "product_id", "session_id", "event_type", "ts")),
        _quantities(events),
    ):
        impression = (request, product)
        if kind == "view" or not (impression in forced or impression in shown):
            continue
        if kind in NEGATIVE_EVENT_TYPES:
            if impression in shown and (*impression, HIDE) not in engaged:  # the side-by-side view counts no hide
                engaged.add((*impression, HIDE))
                counted[shown[impression]][HIDE] += 1
            continue
        if (*impression, kind) in engaged:
            continue
        engaged.add((*impression, kind))
        if impression in forced:
            side_by_side[forced[impression]][kind] += 1
            continue
        variant = shown[impression]
        counted[variant][kind] += 1
        user_engaged.append((variant, shown_to[impression], request, product, kind, quantity))
        engaged_at.append((ts.timestamp(), variant, kind))
        counted[variant]["sessions"].add(session)
    variants = {}
    for name, row in counted.items():
        variants[name] = {
            "users": len(row["users"]), "impressions": row["view"], "clicks": row["click"],
            "add_to_carts": row["add_to_cart"], "purchases": row["purchase"],
            "ctr": as_dict(wilson(row["click"], row["view"])),
            "conversion": as_dict(wilson(row["purchase"], row["view"])),
            "clicks_per_engaged_session": per_session(row["click"], len(row["sessions"])),
            "funnel": funnel({k: row[k] for k in ("view", "click", "add_to_cart", "purchase")}),
            "hides": row[HIDE], "hide_rate": as_dict(wilson(row[HIDE], row["view"])),
        }
    report: dict[str, Any] = {"variants": variants}
    if control in counted and treatment in counted:
        a, b = counted[control], counted[treatment]
        report["lift"] = {
            "ctr": as_dict(compare(a["click"], a["view"], b["click"], b["view"])),
            "conversion": as_dict(compare(a["purchase"], a["view"], b["purchase"], b["view"])),
        }
    report["sample_ratio"] = as_dict(sample_ratio_mismatch({v: r["users"] for v, r in variants.items()}, split))
    report["side_by_side"] = {
        v: {"impressions": r["view"], "clicks": r["click"], "add_to_carts": r["add_to_cart"], "purchases": r["purchase"]}
        for v, r in sorted(side_by_side.items())
    }
    report["timeline"] = timeline(shown_at, engaged_at, list(split))
    if start is None and shown_at:
        start = dt.datetime.fromtimestamp(min(t for t, _ in shown_at), dt.timezone.utc)
    history, described = _pre_period_history(events, start, pre_period, prices)
    arms = {v: _user_totals(v, requests_of, impressions_of, user_engaged, prices) for v in split}
    report["user_level"] = user_level(
        arms, history, control, treatment, start=start, prices_known=prices is not None,
        planned=planned, sample_ratio_broken=report["sample_ratio"]["mismatch"],
        decision_metric=decision_metric, pre_period=described)
    if control in counted and treatments:
        report["comparisons"] = comparisons(
            arms, history, counted, control, treatments, prices_known=prices is not None, planned=planned,
            sample_ratio_broken=report["sample_ratio"]["mismatch"], decision_metric=decision_metric,
            first=report["user_level"].get("metrics") if treatment == treatments[0] else None)
        if len(treatments) > 1:  # the verdict of the whole experiment, Holm-adjusted (with two: the same one)
            report["user_level"]["verdict"] = report["comparisons"]["verdict"]
    return report


HOLM_FAMILY = ("per metric: that metric's comparisons of every treatment with the control (variants - 1 of them); "
               "the verdict reads the decision metric's family")


def comparisons(arms: Mapping[str, tuple[list[str], UserTotals]], history: Mapping[str, np.ndarray],
                counted: Mapping[str, Mapping[str, Any]], control: str, treatments: list[str], *, prices_known: bool,
                planned: PlannedSize, sample_ratio_broken: bool, decision_metric: str = DECISION_METRIC,
                first: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``comparisons`` section (module docstring): per treatment its per-impression lifts and every user-level
    metric against ``control``, each p-value with its Holm-adjusted one over the treatments (per metric), and the
    verdict on ``decision_metric``. ``first``: the first treatment's metrics when already computed."""
    lifts = {name: {"ctr": as_dict(compare(counted[control]["click"], counted[control]["view"],
                                           counted[name]["click"], counted[name]["view"])),
                    "conversion": as_dict(compare(counted[control]["purchase"], counted[control]["view"],
                                                  counted[name]["purchase"], counted[name]["view"]))}
             for name in treatments}
    metrics = {name: dict(first) if first is not None and i == 0 else
               metric_results(arms, history, control, name, prices_known=prices_known, planned=planned)
               for i, name in enumerate(treatments)}
    lift_holm = {kind: holm({name: lifts[name][kind]["p_value"] for name in treatments})
                 for kind in ("ctr", "conversion")}
    for metric in (*RATIO_METRICS, *PER_USER_METRICS):
        entries = {name: metrics[name].get(metric) for name in treatments}
        measured = {name: entry for name, entry in entries.items() if entry is not None and "missing" not in entry}
        fixed = holm({name: (entry[entry["estimate"]]["p_value"] if name in measured else None)
                      for name, entry in entries.items()})
        live = holm({name: ((entry.get("always_valid") or {}).get("p_value") if name in measured else None)
                     for name, entry in entries.items()})
        for name, entry in measured.items():
            metrics[name][metric] = {**entry, "holm": {
                "p_value": fixed[name], "always_valid_p_value": live[name],
                "reject": fixed[name] is not None and fixed[name] < ALPHA,
                "always_valid_reject": live[name] is not None and live[name] < ALPHA}}
    users = [len(arms[name][0]) for name in (control, *treatments)]
    past = min(users) >= planned.users_per_arm
    arms_section = {name: {"users": len(arms[name][0]), "lift": lifts[name],
                           "lift_p_holm": {kind: lift_holm[kind][name] for kind in lift_holm},
                           "metrics": metrics[name]} for name in treatments}
    if len(treatments) == 1:  # one comparison: Holm changes nothing, and the two-variant verdict decides
        decided = verdict(decision_metric, metrics[treatments[0]].get(decision_metric), sample_ratio_broken,
                          min(users[0], users[1]) >= planned.users_per_arm, control, treatments[0])
    else:
        decided = holm_verdict(decision_metric, {name: metrics[name].get(decision_metric) for name in treatments},
                               control, sample_ratio_broken, past)
    return {"control": control, "treatments": list(treatments), "correction": "holm", "family": HOLM_FAMILY,
            "alpha": ALPHA, "past_planned_size": past, "arms": arms_section, "verdict": decided}


def holm_verdict(metric: str, entries: Mapping[str, Mapping[str, Any] | None], control: str,
                 sample_ratio_broken: bool, past_planned_size: bool) -> dict[str, Any]:
    """Ship a treatment, keep ``control`` or keep running, on the decision metric's Holm-adjusted tests over the
    treatments (``entries``: treatment -> its metric entry with ``holm``), with the rule that decided and the
    ``winner`` (None unless a treatment ships)."""
    family = f"Holm-adjusted over the {len(entries)} comparisons with {control}"
    if sample_ratio_broken:
        return {"decision": "fix the assignment", "rule": "sample-ratio mismatch (p < 0.001): no figure can be trusted",
                "winner": None}
    measured = {name: entry for name, entry in entries.items() if entry is not None and "missing" not in entry}
    if not measured:
        return {"decision": "keep running", "rule": f"the decision metric {metric} has no figures for any treatment "
                                                    "yet", "winner": None}
    named = {name: f"{metric}{' (CUPED-adjusted)' if entry['estimate'] == 'cuped' else ''}"
             for name, entry in measured.items()}

    def difference(name: str) -> float:
        return measured[name][measured[name]["estimate"]]["difference"] or 0.0

    def shown(key: str, above: bool) -> list[str]:
        return [name for name, entry in measured.items() if entry["holm"][key] and (difference(name) > 0) == above]

    winners, losers = shown("always_valid_reject", True), shown("always_valid_reject", False)
    if winners:
        best = max(winners, key=difference)
        return {"decision": f"ship {best}", "winner": best,
                "rule": f"always-valid test on {named[best]}, {family}: {best} above {control} (adjusted p = "
                        f"{measured[best]['holm']['always_valid_p_value']:.3g}), valid at any look up to the planned "
                        "size" + (f"; the largest difference of {', '.join(winners)}" if len(winners) > 1 else "")}
    if len(losers) == len(entries):
        return {"decision": f"keep {control}", "winner": None,
                "rule": f"always-valid test on {metric}, {family}: every treatment below {control}"}
    if past_planned_size:
        fixed = shown("reject", True)
        if fixed:
            best = max(fixed, key=difference)
            return {"decision": f"ship {best}", "winner": best,
                    "rule": f"planned size reached: fixed-horizon test on {named[best]}, {family}: adjusted p = "
                            f"{measured[best]['holm']['p_value']:.3g}"}
        return {"decision": f"keep {control}", "winner": None,
                "rule": f"planned size reached with no treatment above {control} in {metric} at alpha {ALPHA}, "
                        f"{family}"}
    below = f" ({', '.join(losers)} already shown below {control})" if losers else ""
    return {"decision": "keep running", "winner": None,
            "rule": f"the always-valid test on {metric}, {family}, has not decided and the planned size is not "
                    f"reached{below}"}


def _pre_period_history(events: pa.Table, start: dt.datetime | None, pre_period: PrePeriod | None,
                        prices: Mapping[str, float] | None) -> tuple[dict[str, np.ndarray], str]:
    """Each user's pre-period totals (the run's log, then the live store's events up to ``start``) and what the
    pre-period was, in words."""
    if start is None:
        return {}, "none: the experiment has not started"
    live = _events_before(events, start)
    if pre_period is None or pre_period.until is None:
        return _history(live, prices), "the live store's events before the experiment's start"
    if pre_period.until >= start:  # the run's log reaches into the experiment: it is no pre-period
        return _history(live, prices), ("the live store's events before the experiment's start (the run's event "
                                         "log reaches past the start, so it is left out)")
    live = live.filter(pc.greater(live.column("ts"), pa.scalar(pre_period.until, live.schema.field("ts").type)))
    history = {user: totals.copy() for user, totals in pre_period.totals.items()}
    for user, totals in _history(live, prices).items():
        history[user] = history[user] + totals if user in history else totals
    return history, (f"the run's event log from {pre_period.since.isoformat()} to its end "
                     f"{pre_period.until.isoformat()} and the live store's events from then to the experiment's start")


def _quantities(events: pa.Table) -> list[float]:
    """Each event's ``quantity`` where the events carry one (a purchase of three counts three times), else 1."""
    if "quantity" not in events.column_names:
        return [1.0] * events.num_rows
    return [1.0 if q is None else float(q) for q in events.column("quantity").to_pylist()]


def _events_before(events: pa.Table, start: dt.datetime) -> pa.Table:
    """The events strictly before ``start``: the users' pre-experiment history."""
    return events.filter(pc.less(events.column("ts"), pa.scalar(start, events.schema.field("ts").type)))


def _sessions(request_times: dict[str, float]) -> dict[str, int]:
    """Each request's session number: a new session after a gap of more than ``SESSION_GAP_S``."""
    numbers: dict[str, int] = {}
    session, last = -1, None
    for request, ts in sorted(request_times.items(), key=lambda item: item[1]):
        if last is None or ts - last > SESSION_GAP_S:
            session += 1
        numbers[request] = session
        last = ts
    return numbers


def _user_totals(variant: str, requests_of: Mapping[tuple[str, str], dict[str, float]],
                 impressions_of: Mapping[tuple[str, str], int], engaged: list[tuple[str, str, str, str, str, float]],
                 prices: Mapping[str, float] | None) -> tuple[list[str], UserTotals]:
    """The variant's users (sorted) and their totals."""
    users = sorted(u for v, u in requests_of if v == variant)
    index = {u: i for i, u in enumerate(users)}
    sessions = {u: _sessions(requests_of[(variant, u)]) for u in users}
    totals = {name: np.zeros(len(users)) for name in UserTotals.__dataclass_fields__}
    for user in users:
        totals["impressions"][index[user]] = impressions_of[(variant, user)]
        totals["sessions"][index[user]] = len(set(sessions[user].values()))
    converted: set[tuple[str, int]] = set()
    for v, user, request, product, kind, quantity in engaged:
        if v != variant:
            continue
        field = {"click": "clicks", "add_to_cart": "add_to_carts", "purchase": "purchases"}[kind]
        totals[field][index[user]] += 1
        if kind == "purchase":
            totals["revenue"][index[user]] += (prices or {}).get(product, 0.0) * quantity
            converted.add((user, sessions[user][request]))
    for user, _ in converted:
        totals["converted_sessions"][index[user]] += 1
    return users, UserTotals(**totals)


def _history(events: pa.Table, prices: Mapping[str, float] | None) -> dict[str, np.ndarray]:
    """Each user's pre-experiment totals (views as impressions, sessions by session id), in UserTotals' field order."""
    fields = list(UserTotals.__dataclass_fields__)
    history: dict[str, np.ndarray] = {}
    sessions: dict[str, set[str]] = defaultdict(set)
    converted: dict[str, set[str]] = defaultdict(set)
    kinds = {"view": "impressions", "click": "clicks", "add_to_cart": "add_to_carts", "purchase": "purchases"}
    for user, session, product, kind, quantity in zip(
        *(events.column(name).to_pylist() for name in ("user_id", "session_id", "product_id", "event_type")),
        _quantities(events),
    ):
        if kind not in kinds:  # a "not interested": no figure of UserTotals
            continue
        row = history.setdefault(user, np.zeros(len(fields)))
        row[fields.index(kinds[kind])] += 1
        sessions[user].add(session)
        if kind == "purchase":
            row[fields.index("revenue")] += (prices or {}).get(product, 0.0) * quantity
            converted[user].add(session)
    for user, row in history.items():
        row[fields.index("sessions")] = len(sessions[user])
        row[fields.index("converted_sessions")] = len(converted[user])
    return history


def user_level(arms: Mapping[str, tuple[list[str], UserTotals]], history: Mapping[str, np.ndarray], control: str,
               treatment: str, *, start: dt.datetime | None, prices_known: bool, planned: PlannedSize,
               sample_ratio_broken: bool, decision_metric: str = DECISION_METRIC,
               pre_period: str = "the live store's events before the experiment's start") -> dict[str, Any]:
    """The ``user_level`` section: per-variant money and funnel, per-metric effects, the verdict."""
    variants = {}
    for name, (users, totals) in arms.items():
        buyers = int((totals.purchases > 0).sum())
        revenue = float(totals.revenue.sum())
        variants[name] = {
            "users": len(users), "sessions": int(totals.sessions.sum()),
            "revenue": revenue if prices_known else None,
            "revenue_per_user": revenue / len(users) if prices_known and users else None,
            "average_order_value": (revenue / float(totals.purchases.sum())
                                    if prices_known and totals.purchases.sum() else None),
            "funnel_users": {"shown": len(users), "clicked": int((totals.clicks > 0).sum()),
                             "carted": int((totals.add_to_carts > 0).sum()), "bought": buyers},
        }
    section: dict[str, Any] = {
        "unit": "user", "experiment_start": start.isoformat() if start else None, "variants": variants,
        "session_gap_s": SESSION_GAP_S, "planned_users_per_arm": planned.users_per_arm,
        "planned_size_from": planned.source, "alpha": ALPHA,
        "users_with_history": sum(1 for name in arms for u in arms[name][0] if u in history),
        "pre_period": pre_period, "decision_metric": decision_metric,
        "revenue": "price x quantity (quantity 1 unless the event names one)" if prices_known
        else "unknown: no product prices were given to the report",
    }
    if control not in arms or treatment not in arms:
        return section
    metrics = metric_results(arms, history, control, treatment, prices_known=prices_known, planned=planned)
    section["metrics"] = metrics
    section["past_planned_size"] = min(len(arms[control][0]), len(arms[treatment][0])) >= planned.users_per_arm
    section["verdict"] = verdict(decision_metric, metrics.get(decision_metric), sample_ratio_broken,
                                 section["past_planned_size"], control, treatment)
    return section


def metric_results(arms: Mapping[str, tuple[list[str], UserTotals]], history: Mapping[str, np.ndarray],
                   control: str, treatment: str, *, prices_known: bool, planned: PlannedSize) -> dict[str, Any]:
    """Every user-level metric, ``treatment`` against ``control``: fixed-horizon, CUPED-adjusted and always-valid,
    and which estimate the always-valid test and a verdict read."""
    nothing = np.zeros(len(UserTotals.__dataclass_fields__))

    def before(name: str) -> UserTotals:
        rows = np.array([history.get(u, nothing) for u in arms[name][0]]).reshape(-1, len(nothing))
        return UserTotals(*rows.T)

    metrics: dict[str, Any] = {}
    for metric in (*RATIO_METRICS, *PER_USER_METRICS):
        if metric in REVENUE_METRICS and not prices_known:
            metrics[metric] = {"missing": "no product prices were given to the report"}
            continue
        plain, adjusted = metric_effects(metric, arms[control][1], arms[treatment][1], before(control),
                                         before(treatment))
        # CUPED applies where it could adjust (a pre-period with variation): then the sequential test, the headline
        # and the verdict all read the adjusted estimate, one set of numbers
        estimate = adjusted if adjusted.standard_error is not None and adjusted.missing is None else plain
        entry: dict[str, Any] = {"fixed_horizon": plain.as_dict(), "cuped": adjusted.as_dict(), "always_valid": None,
                                 "estimate": "cuped" if estimate is adjusted else "fixed_horizon"}
        if estimate.standard_error is not None and estimate.difference is not None:
            tau = mixing_sd(estimate.standard_error, estimate.users_control, estimate.users_treatment,
                            planned.users_per_arm)
            entry["always_valid"] = always_valid(estimate.difference, estimate.standard_error, tau).as_dict()
        metrics[metric] = entry
    return metrics


def verdict(metric: str, entry: Mapping[str, Any] | None, sample_ratio_broken: bool,
            past_planned_size: bool, control: str = "A", treatment: str = "B") -> dict[str, str]:
    """Ship the treatment (``ship B``), keep the control (``keep A``) or keep running, on the decision metric's
    ``entry`` (the estimate it names: CUPED-adjusted where CUPED applies), with the rule that decided."""
    a, b = control, treatment
    if sample_ratio_broken:
        return {"decision": "fix the assignment", "rule": "sample-ratio mismatch (p < 0.001): no figure can be trusted"}
    if entry is None or "missing" in entry:
        return {"decision": "keep running", "rule": f"the decision metric {metric} has no figures: "
                                                    + (entry["missing"] if entry else "not a user-level metric")}
    estimate = entry[entry["estimate"]]
    name = f"{metric}{' (CUPED-adjusted)' if entry['estimate'] == 'cuped' else ''}"
    live = entry.get("always_valid")
    if live and live["reject"]:
        better = estimate["difference"] > 0
        return {"decision": f"ship {b}" if better else f"keep {a}",
                "rule": f"always-valid test on {name}: {b} {'above' if better else 'below'} {a} at alpha "
                        f"{ALPHA}, valid at any look up to the planned size"}
    if past_planned_size:
        if estimate["p_value"] is not None and estimate["p_value"] < ALPHA:
            better = estimate["difference"] > 0
            return {"decision": f"ship {b}" if better else f"keep {a}",
                    "rule": f"planned size reached: fixed-horizon test on {name}, p = {estimate['p_value']:.3g}"}
        return {"decision": f"keep {a}", "rule": f"planned size reached with no difference in {name} "
                                                 f"at alpha {ALPHA}: {b} is not shown to be better"}
    return {"decision": "keep running",
            "rule": f"the always-valid test on {name} has not decided and the planned size is not reached"}


def timeline(shown_at: list[tuple[float, str]], engaged_at: list[tuple[float, str, str]],
             variants: list[str]) -> list[dict[str, Any]]:
    """Cumulative CTR and conversion per variant at evenly spaced moments (epoch seconds)."""
    if not shown_at:
        return []
    shown_times = np.array([t for t, _ in shown_at])
    moments = np.linspace(shown_times.min(), max(shown_times.max(), max((t for t, _, _ in engaged_at), default=0.0)),
                          TIMELINE_POINTS)
    points = []
    for variant in variants:
        seen = np.sort(np.array([t for t, v in shown_at if v == variant]))
        clicks = np.sort(np.array([t for t, v, k in engaged_at if v == variant and k == "click"]))
        bought = np.sort(np.array([t for t, v, k in engaged_at if v == variant and k == "purchase"]))
        for moment in moments:
            impressions = int(np.searchsorted(seen, moment, side="right"))
            if impressions:
                points.append({
                    "ts": float(moment), "variant": variant, "impressions": impressions,
                    "ctr": int(np.searchsorted(clicks, moment, side="right")) / impressions,
                    "conversion": int(np.searchsorted(bought, moment, side="right")) / impressions,
                })
    return points
