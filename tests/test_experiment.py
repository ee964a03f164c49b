"""A/B statistics against SciPy's own implementations and textbook values."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from scipy.stats.contingency import relative_risk

from shoprank.experiment.assignment import assign
from shoprank.experiment.guardrails import GuardrailLimits, GuardrailWindow, with_guardrails
from shoprank.experiment.readout import headline_markdown, readout_png
from shoprank.experiment.report import ab_report
from shoprank.experiment.stats import as_dict, compare, funnel, per_session, sample_ratio_mismatch, wilson
from shoprank.store.events import Impression, SqliteEventStore


@pytest.mark.parametrize("successes,trials", [(81, 263), (0, 10), (10, 10), (1, 2), (37, 12_345), (500, 1000)])
def test_wilson_interval_matches_scipy(successes: int, trials: int) -> None:
    reference = stats.binomtest(successes, trials).proportion_ci(0.95, method="wilson")
    rate = wilson(successes, trials)
    assert rate.rate == pytest.approx(successes / trials)
    assert rate.low == pytest.approx(reference.low, abs=1e-12)
    assert rate.high == pytest.approx(reference.high, abs=1e-12)


def test_wilson_textbook_value_and_no_trials() -> None:
    rate = wilson(81, 263)
    assert (round(rate.low, 4), round(rate.high, 4)) == (0.2553, 0.3662)
    assert (wilson(0, 0).low, wilson(0, 0).high) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes <= trials"):
        wilson(5, 3)


@pytest.mark.parametrize("a,na,b,nb", [(100, 1000, 120, 1000), (30, 2000, 55, 1900), (400, 5000, 380, 5100)])
def test_lift_interval_is_scipys_relative_risk_and_p_value_its_chi_square(a: int, na: int, b: int, nb: int) -> None:
    result = compare(a, na, b, nb)
    reference = relative_risk(b, nb, a, na)
    interval = reference.confidence_interval(0.95)
    assert result.lift == pytest.approx(reference.relative_risk - 1)
    assert result.lift_low == pytest.approx(interval.low - 1, rel=1e-9)
    assert result.lift_high == pytest.approx(interval.high - 1, rel=1e-9)
    # the pooled two-proportion z-test is the uncorrected chi-square test of the 2x2 table
    chi2, p_value, _, _ = stats.chi2_contingency(np.array([[a, na - a], [b, nb - b]]), correction=False)
    assert result.z**2 == pytest.approx(chi2)
    assert result.p_value == pytest.approx(p_value)
    assert (result.z > 0) == (b / nb > a / na)


def test_compare_degenerate_counts_give_no_false_certainty() -> None:
    same = compare(0, 100, 0, 100)
    assert same.p_value == 1.0 and math.isnan(same.lift)
    assert math.isnan(compare(0, 0, 5, 10).p_value)
    assert as_dict(same)["lift"] is None


def test_sample_ratio_mismatch_matches_scipy_chisquare() -> None:
    balanced = sample_ratio_mismatch({"A": 1010, "B": 990}, {"A": 0.5, "B": 0.5})
    reference = stats.chisquare([1010, 990], [1000, 1000])
    assert balanced.chi2 == pytest.approx(reference.statistic)
    assert balanced.p_value == pytest.approx(reference.pvalue)
    assert not balanced.mismatch
    broken = sample_ratio_mismatch({"A": 1200, "B": 800}, {"A": 0.5, "B": 0.5})
    assert broken.mismatch and broken.p_value < 1e-10
    uneven = sample_ratio_mismatch({"A": 900, "B": 100}, {"A": 0.9, "B": 0.1})
    assert uneven.chi2 == pytest.approx(0.0) and not uneven.mismatch
    with pytest.raises(ValueError, match="no expected share"):
        sample_ratio_mismatch({"C": 3}, {"A": 0.5, "B": 0.5})


def test_funnel_and_per_session() -> None:
    steps = funnel({"view": 1000, "click": 100, "add_to_cart": 20, "purchase": 10})
    assert [s["rate_of_previous"] for s in steps] == [1.0, 0.1, 0.2, 0.5]
    assert funnel({})[1]["rate_of_previous"] == 0.0
    assert per_session(30, 12) == 2.5 and per_session(3, 0) == 0.0


def test_assignment_is_stable_follows_the_split_and_reshuffles_per_experiment() -> None:
    users = [f"U{i:05d}" for i in range(20_000)]
    first = [assign(u, "exp-1", {"A": 0.5, "B": 0.5}) for u in users]
    assert first == [assign(u, "exp-1", {"A": 0.5, "B": 0.5}) for u in users]
    assert not sample_ratio_mismatch({"A": first.count("A"), "B": first.count("B")}, {"A": 0.5, "B": 0.5}).mismatch
    skewed = [assign(u, "exp-1", {"A": 0.9, "B": 0.1}) for u in users]
    assert skewed.count("B") / len(users) == pytest.approx(0.1, abs=0.01)
    other = [assign(u, "exp-2", {"A": 0.5, "B": 0.5}) for u in users]
    assert sum(x == y for x, y in zip(first, other)) / len(users) == pytest.approx(0.5, abs=0.02)
    with pytest.raises(ValueError, match="split"):
        assign("U1", "exp-1", {"A": -1.0, "B": 0.5})


def test_ab_report_counts_assigned_answers_only(tmp_path: Path) -> None:
    store = SqliteEventStore(tmp_path / "events.db")
    t0 = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
    impressions, events = [], []
    for variant, requests, clicks, purchases in (("A", 10, 2, 1), ("B", 10, 5, 2)):
        for r in range(requests):
            request = f"{variant}-R{r}"
            impressions += [Impression(request, f"{variant}-U{r}", variant, f"P{p}", p + 1, t0) for p in range(10)]
            kinds = ["click"] * (r < clicks) + ["purchase"] * (r < purchases)
            events += [{"event_id": f"{request}-{k}", "user_id": f"{variant}-U{r}", "session_id": f"S-{request}",
                        "product_id": "P0", "event_type": k, "ts": t0, "request_id": request} for k in kinds]
    # a forced side-by-side answer, clicked: must not count
    impressions += [Impression("F-R0", "A-U0", "B", "P0", 1, t0, forced=True)]
    events.append({"event_id": "forced-click", "user_id": "A-U0", "session_id": "S-F", "product_id": "P0",
                   "event_type": "click", "ts": t0, "request_id": "F-R0"})
    store.log_impressions(impressions)
    store.append(events)
    report = ab_report(store, {"A": 0.5, "B": 0.5})
    a, b = report["variants"]["A"], report["variants"]["B"]
    assert (a["users"], a["impressions"], a["clicks"], a["purchases"]) == (10, 100, 2, 1)
    assert (b["users"], b["impressions"], b["clicks"], b["purchases"]) == (10, 100, 5, 2)
    assert b["ctr"]["rate"] == 0.05 and b["funnel"][1]["rate_of_previous"] == 0.05
    assert report["lift"]["ctr"]["p_value"] == pytest.approx(compare(2, 100, 5, 100).p_value)
    assert report["lift"]["ctr"]["lift"] == pytest.approx(1.5)
    assert report["sample_ratio"]["mismatch"] is False


def test_repeated_and_unshown_engagements_count_once_and_the_report_never_fails(tmp_path: Path) -> None:
    """A thousand clicks on one impression are one clicked impression, a click naming an answer that did not show its
    product is none: no rate over 1, so the report (and its Wilson intervals) keeps answering."""
    store = SqliteEventStore(tmp_path / "events.db")
    t0 = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
    store.log_impressions([Impression("R1", "U1", "A", "P1", 1, t0), Impression("R1", "U1", "A", "P2", 2, t0),
                           Impression("R2", "U2", "B", "P1", 1, t0)])
    click = {"user_id": "U1", "session_id": "S1", "product_id": "P1", "event_type": "click", "ts": t0, "request_id": "R1"}
    store.append([{**click, "event_id": f"c{i}"} for i in range(1000)])
    store.append([{**click, "event_id": "elsewhere", "product_id": "P9"},
                  {**click, "event_id": "bought", "event_type": "purchase"},
                  {**click, "event_id": "bought-again", "event_type": "purchase"}])
    report = ab_report(store, {"A": 0.5, "B": 0.5})
    a = report["variants"]["A"]
    assert (a["impressions"], a["clicks"], a["purchases"]) == (2, 1, 1)
    assert a["ctr"]["rate"] == 0.5 and a["ctr"]["high"] <= 1.0 and a["conversion"]["rate"] == 0.5
    assert report["variants"]["B"]["clicks"] == 0 and "ctr" in report["lift"]


LIMITS = GuardrailLimits(p99_ms=1000.0, error_rate=0.05, min_requests=100)


def test_a_slow_or_failing_treatment_breaches_its_guardrails_and_is_not_shipped() -> None:
    window = GuardrailWindow(1000)
    for i in range(200):
        window.observe("A", 0.05, False)
        window.observe("B", 2.0 if i % 50 == 0 else 0.05, i % 10 == 0)  # 2% at 2 s, 10% server errors
    figures = window.figures(LIMITS)
    assert figures["A"] == {"requests": 200, "errors": 0, "error_rate": 0.0, "p99_ms": pytest.approx(50.0),
                            "breached": []}
    assert figures["B"]["errors"] == 20 and figures["B"]["error_rate"] == pytest.approx(0.1)
    assert figures["B"]["p99_ms"] == pytest.approx(2000.0)
    assert figures["B"]["breached"] == ["p99 latency 2000 ms over 1000 ms", "server error rate 10.00% over 5.00%"]
    ship = {"decision": "ship B", "rule": "always-valid test on conversion_per_user: B above A"}
    kept = with_guardrails(ship, figures)
    assert kept["decision"] == "keep A" and kept["rule"].startswith("guardrail: B's p99 latency 2000 ms")
    assert with_guardrails(ship, {"B": figures["A"]}) == ship
    running = {"decision": "keep running", "rule": "not decided"}
    assert with_guardrails(running, figures) == running


def test_guardrails_judge_only_enough_recent_answers() -> None:
    few = GuardrailWindow(1000)
    for _ in range(10):
        few.observe("B", 5.0, True)
    assert few.figures(LIMITS)["B"]["error_rate"] == 1.0 and few.figures(LIMITS)["B"]["breached"] == []
    recent = GuardrailWindow(100)
    for seconds, failed in [(5.0, True)] * 100 + [(0.01, False)] * 100:
        recent.observe("B", seconds, failed)
    assert recent.figures(LIMITS)["B"] == {"requests": 100, "errors": 0, "error_rate": 0.0,
                                           "p99_ms": pytest.approx(10.0), "breached": []}


def test_the_readout_draws_whole_reports_and_empty_ones(tmp_path: Path) -> None:
    """A report with traffic in both arms, and one of an empty store: each becomes one whole PNG (nothing half
    written beside it), and the Markdown readout's headline carries the guardrails under the verdict."""
    store = SqliteEventStore(tmp_path / "events.db")
    t0 = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
    impressions, events = [], []
    for variant, bought in (("A", 8), ("B", 14)):
        for u in range(40):
            request, user = f"{variant}-R{u}", f"{variant}-U{u}"
            impressions += [Impression(request, user, variant, f"P{p}", p + 1, t0) for p in range(5)]
            kinds = ["click"] + ["purchase"] * (u < bought)
            events += [{"event_id": f"{request}-{k}", "user_id": user, "session_id": f"S-{request}", "product_id": "P0",
                        "event_type": k, "ts": t0, "request_id": request} for k in kinds]
    store.log_impressions(impressions)
    store.append(events)
    window = GuardrailWindow(1000)
    for _ in range(150):
        window.observe("A", 0.05, False)
        window.observe("B", 1.5, False)
    report = {**ab_report(store, {"A": 0.5, "B": 0.5}, prices={"P0": 10.0}), "experiment": "readout-test",
              "guardrails": window.figures(LIMITS)}
    empty = {**ab_report(SqliteEventStore(tmp_path / "empty.db"), {"A": 0.5, "B": 0.5}), "experiment": "empty"}
    for name, drawn in (("full", report), ("empty", empty)):
        readout_png(drawn, tmp_path / "out" / f"{name}.png")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["empty.png", "full.png"]
    assert all((tmp_path / "out" / f).read_bytes().startswith(b"\x89PNG") for f in ("empty.png", "full.png"))
    markdown = headline_markdown(report)
    assert markdown.startswith("**Verdict:") and "B 150 answers, 0 5xx, p99 1500 ms" in markdown
    assert "BREACHED: p99 latency 1500 ms over 1000 ms" in markdown and "A 150 answers, 0 5xx, p99 50 ms" in markdown
