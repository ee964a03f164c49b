"""The A/B report (``GET /ab/report``) from what the event store holds.

Only answers the router assigned count: impressions of forced requests (the
side-by-side view) and the events on them are left out. An event belongs to the
variant that showed the product in the request it names (``request_id``).

Per variant: users, sessions, impressions, clicks, add-to-carts, purchases; CTR
(clicks / impressions) and conversion (purchases / impressions) with Wilson
intervals; clicks per session; the funnel. Then B against A on CTR and conversion
(lift, interval, p-value) and the sample-ratio check of users against the split.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shoprank.experiment.stats import as_dict, compare, funnel, per_session, sample_ratio_mismatch, wilson
from shoprank.store.events import EventStore


def ab_report(store: EventStore, split: Mapping[str, float], control: str = "A", treatment: str = "B") -> dict[str, Any]:
    """The report's figures as JSON-ready dicts (see the module docstring)."""
    shown: dict[str, str] = {}
    counted: dict[str, dict[str, Any]] = {
        v: {"users": set(), "sessions": set(), "view": 0, "click": 0, "add_to_cart": 0, "purchase": 0} for v in split
    }
    for impression in store.impressions():
        if impression.forced or impression.variant not in counted:
            continue
        shown[impression.request_id] = impression.variant
        row = counted[impression.variant]
        row["users"].add(impression.user_id)
        row["view"] += 1
    events = store.events()
    for request, session, kind in zip(events.column("request_id").to_pylist(), events.column("session_id").to_pylist(),
                                      events.column("event_type").to_pylist()):
        variant = shown.get(request)
        if variant is None or kind == "view":
            continue
        counted[variant][kind] += 1
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
    return report
