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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from shoprank.experiment.stats import as_dict, compare, funnel, per_session, sample_ratio_mismatch, wilson
from shoprank.store.events import EventStore

TIMELINE_POINTS = 30
ENGAGEMENTS = ("click", "add_to_cart", "purchase")


def ab_report(store: EventStore, split: Mapping[str, float], control: str = "A", treatment: str = "B") -> dict[str, Any]:
    """The report's figures as JSON-ready dicts (see the module docstring)."""
    shown: dict[tuple[str, str], str] = {}
    """(request, product) of each assigned impression -> its variant."""
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
        shown_at.append((impression.ts.timestamp(), impression.variant))
        row = counted[impression.variant]
        row["users"].add(impression.user_id)
        row["view"] += 1
    events = store.events()
    engaged: set[tuple[str, str, str]] = set()
    for request, product, session, kind, ts in zip(
        *(events.column(name).to_pylist() for name in ("request_id", "product_id", "session_id", "event_type", "ts"))
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
    return report


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
