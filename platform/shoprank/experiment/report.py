"""The A/B report (``GET /ab/report``) from what the event store holds.

Only answers the router assigned count: impressions of forced requests (the
side-by-side view) and the events on them are left out. An event belongs to the
variant that showed the product in the request it names (``request_id``), and counts
once per impression and kind: an impression is clicked or not, so a client sending
the same click a thousand times (or a click on a product that answer did not show)
changes nothing, and no rate can exceed 1.

Per variant: users, sessions, impressions, clicks, add-to-carts, purchases; CTR
(clicks / impressions) and conversion (purchases / impressions) with Wilson
intervals; clicks per session; the funnel. Then B against A on CTR and conversion
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
per-user ones), the CUPED-adjusted result with its variance reduction (covariate:
each user's value of the metric in the store's events before the experiment's
``start``, the first assigned impression unless given), and the always-valid
mSPRT readout (:mod:`shoprank.experiment.sequential`) tuned for
``planned_users_per_arm``; and a one-line verdict with the rule that produced it.
Revenue figures need ``prices`` (product id -> price); without them they say so.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from shoprank.experiment.sequential import ALPHA, PLANNED_USERS_PER_ARM, always_valid, mixing_sd
from shoprank.experiment.stats import as_dict, compare, funnel, per_session, sample_ratio_mismatch, wilson
from shoprank.experiment.userstats import PER_USER_METRICS, RATIO_METRICS, REVENUE_METRICS, UserTotals, metric_effects
from shoprank.store.events import EventStore

TIMELINE_POINTS = 30
ENGAGEMENTS = ("click", "add_to_cart", "purchase")
SESSION_GAP_S = 1800.0
"""A user's impressions more than 30 minutes apart start a new session (the web analytics convention)."""
PRIMARY_METRIC = "conversion_per_user"
"""The metric the verdict reads."""


def ab_report(store: EventStore, split: Mapping[str, float], control: str = "A", treatment: str = "B", *,
              prices: Mapping[str, float] | None = None, start: dt.datetime | None = None,
              planned_users_per_arm: int = PLANNED_USERS_PER_ARM) -> dict[str, Any]:
    """The report's figures as JSON-ready dicts (see the module docstring)."""
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
        v: {"users": set(), "sessions": set(), "view": 0, "click": 0, "add_to_cart": 0, "purchase": 0} for v in split
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
        if kind == "view" or (*impression, kind) in engaged or not (impression in forced or impression in shown):
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
    before = events.slice(0, 0) if start is None else _events_before(events, start)
    report["user_level"] = user_level(
        {v: _user_totals(v, requests_of, impressions_of, user_engaged, prices) for v in split},
        _history(before, prices),
        control, treatment, start=start, prices_known=prices is not None,
        planned_users_per_arm=planned_users_per_arm, sample_ratio_broken=report["sample_ratio"]["mismatch"])
    return report


def _quantities(events: pa.Table) -> list[float]:
    """Each event's ``quantity`` where the events carry one (a purchase of three counts three times), else 1."""
    if "quantity" not in events.column_names:
        return [1.0] * events.num_rows
    return [1.0 if q is None else float(q) for q in events.column("quantity").to_pylist()]


def _events_before(events: pa.Table, start: dt.datetime) -> pa.Table:
    """The events strictly before ``start``: the users' pre-experiment history."""
    import pyarrow.compute as pc

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
               treatment: str, *, start: dt.datetime | None, prices_known: bool, planned_users_per_arm: int,
               sample_ratio_broken: bool) -> dict[str, Any]:
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
        "session_gap_s": SESSION_GAP_S, "planned_users_per_arm": planned_users_per_arm, "alpha": ALPHA,
        "users_with_history": sum(1 for name in arms for u in arms[name][0] if u in history),
        "revenue": "price x quantity (quantity 1 unless the event names one)" if prices_known
        else "unknown: no product prices were given to the report",
    }
    if control not in arms or treatment not in arms:
        return section
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
        entry: dict[str, Any] = {"fixed_horizon": plain.as_dict(), "cuped": adjusted.as_dict(), "always_valid": None}
        if plain.standard_error is not None and plain.difference is not None:
            tau = mixing_sd(plain.standard_error, plain.users_control, plain.users_treatment, planned_users_per_arm)
            entry["always_valid"] = always_valid(plain.difference, plain.standard_error, tau).as_dict()
        metrics[metric] = entry
    section["metrics"] = metrics
    section["past_planned_size"] = min(len(arms[control][0]), len(arms[treatment][0])) >= planned_users_per_arm
    section["verdict"] = verdict(metrics[PRIMARY_METRIC], sample_ratio_broken, section["past_planned_size"])
    return section


def verdict(primary: Mapping[str, Any], sample_ratio_broken: bool, past_planned_size: bool) -> dict[str, str]:
    """Ship B, keep A or keep running, on the primary metric, with the rule that decided."""
    if sample_ratio_broken:
        return {"decision": "fix the assignment", "rule": "sample-ratio mismatch (p < 0.001): no figure can be trusted"}
    live = primary.get("always_valid")
    if live and live["reject"]:
        better = primary["fixed_horizon"]["difference"] > 0
        return {"decision": "ship B" if better else "keep A",
                "rule": f"always-valid test on {PRIMARY_METRIC}: B {'above' if better else 'below'} A at alpha "
                        f"{ALPHA}, valid at any look up to the planned size"}
    if past_planned_size:
        fixed = primary["fixed_horizon"]
        if fixed["p_value"] is not None and fixed["p_value"] < ALPHA:
            better = fixed["difference"] > 0
            return {"decision": "ship B" if better else "keep A",
                    "rule": f"planned size reached: fixed-horizon test on {PRIMARY_METRIC}, "
                            f"p = {fixed['p_value']:.3g}"}
        return {"decision": "keep A", "rule": f"planned size reached with no difference in {PRIMARY_METRIC} "
                                              f"at alpha {ALPHA}: B is not shown to be better"}
    return {"decision": "keep running",
            "rule": f"the always-valid test on {PRIMARY_METRIC} has not decided and the planned size is not reached"}


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
