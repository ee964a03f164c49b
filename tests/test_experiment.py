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
from shoprank.experiment.report import ab_report, holm_verdict
from shoprank.experiment.report_model import ABReport
from shoprank.experiment.stats import as_dict, compare, funnel, holm, per_session, sample_ratio_mismatch, wilson
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


# ------------------------------------------------------------------------------------------------------ A/B/n


def test_holm_matches_hand_computed_values_and_statsmodels() -> None:
    """Sorted 0.01 (B), 0.03 (D), 0.04 (C) of m = 3: B 3 x 0.01 = 0.03; D max(0.03, 2 x 0.03) = 0.06; C max(0.06,
    1 x 0.04) = 0.06 (step-down: never below an earlier step). A comparison without a p-value counts in m."""
    from statsmodels.stats.multitest import multipletests

    adjusted = holm({"B": 0.01, "C": 0.04, "D": 0.03})
    assert adjusted == pytest.approx({"B": 0.03, "C": 0.06, "D": 0.06})
    rng = np.random.default_rng(40)
    for m in (2, 3, 5, 9):
        raw = rng.uniform(0, 0.2, size=m)
        ours = holm({f"T{i}": float(p) for i, p in enumerate(raw)})
        reference = multipletests(raw, method="holm")[1]
        assert list(ours.values()) == pytest.approx(list(reference))
        assert all(ours[f"T{i}"] >= raw[i] for i in range(m))  # never below the raw p-value
    assert holm({"B": 0.02, "C": None}) == {"B": pytest.approx(0.04), "C": None}
    assert holm({"B": 0.7, "C": 0.9}) == {"B": 1.0, "C": 1.0}  # capped at 1
    assert holm({"B": 0.03}) == {"B": 0.03}  # one comparison: unchanged
    assert holm({}) == {}
    with pytest.raises(ValueError, match="not in \\[0, 1\\]"):
        holm({"B": 1.5})


def test_the_sample_ratio_test_over_three_arms_matches_hand_computed_values() -> None:
    """Weights 1:1:2 and users 110, 95, 195 (400): expected 100, 100, 200, chi-square 100/100 + 25/100 + 25/200 =
    1.375 on 2 degrees of freedom, p = exp(-1.375 / 2); 150, 100, 150 is a mismatch (37.5, p = exp(-18.75))."""
    weights = {"A": 1.0, "B": 1.0, "C": 2.0}
    fine = sample_ratio_mismatch({"A": 110, "B": 95, "C": 195}, weights)
    assert fine.chi2 == pytest.approx(1.375) and fine.p_value == pytest.approx(math.exp(-0.6875))
    assert fine.p_value == pytest.approx(stats.chisquare([110, 95, 195], [100, 100, 200]).pvalue)
    assert not fine.mismatch
    broken = sample_ratio_mismatch({"A": 150, "B": 100, "C": 150}, weights)
    assert broken.chi2 == pytest.approx(37.5) and broken.p_value == pytest.approx(math.exp(-18.75))
    assert broken.mismatch


def three_arm_store(path: Path, buyers: dict[str, int], users: int = 60) -> SqliteEventStore:
    """An event store with ``users`` shoppers per arm, each shown five products once, ``buyers[arm]`` of them buying."""
    store = SqliteEventStore(path)
    t0 = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
    impressions, events = [], []
    for variant, bought in buyers.items():
        for u in range(users):
            request, user = f"{variant}-R{u}", f"{variant}-U{u}"
            impressions += [Impression(request, user, variant, f"P{p}", p + 1, t0) for p in range(5)]
            kinds = ["click"] * (u % 2 == 0 or u < bought) + ["purchase"] * (u < bought)
            events += [{"event_id": f"{request}-{k}", "user_id": user, "session_id": f"S-{request}", "product_id": "P0",
                        "event_type": k, "ts": t0, "request_id": request} for k in kinds]
    store.log_impressions(impressions)
    store.append(events)
    return store


def test_a_three_arm_report_compares_each_treatment_with_the_control_holm_adjusted(tmp_path: Path) -> None:
    """A control and two treatments: ``comparisons`` holds each treatment against A on every metric, its p-values
    adjusted with Holm's procedure over the two comparisons (never below the raw ones, monotone in them); the
    two-variant fields stay A against B; the sample-ratio test covers the three arms; the verdict is the
    experiment's, the same in ``user_level``, and it ships the treatment that wins after the correction."""
    store = three_arm_store(tmp_path / "events.db", {"A": 12, "B": 15, "C": 40})
    from shoprank.experiment.sequential import PlannedSize

    report = ab_report(store, {"A": 1.0, "B": 1.0, "C": 1.0}, prices={"P0": 10.0}, planned=PlannedSize(50, "test"))
    ABReport.model_validate({**report, "experiment": "abn", "impressions_dropped": 0})
    assert report["sample_ratio"]["observed"] == {"A": 60, "B": 60, "C": 60} and not report["sample_ratio"]["mismatch"]
    compared = report["comparisons"]
    assert (compared["control"], compared["treatments"], compared["correction"]) == ("A", ["B", "C"], "holm")
    assert report["lift"] == compared["arms"]["B"]["lift"]  # the two-variant field: A against B, as before
    assert report["user_level"]["metrics"]["conversion_per_user"]["fixed_horizon"] == \
        compared["arms"]["B"]["metrics"]["conversion_per_user"]["fixed_horizon"]
    for metric, entry in compared["arms"]["C"]["metrics"].items():
        if "missing" in entry:
            continue
        raw = {arm: compared["arms"][arm]["metrics"][metric] for arm in ("B", "C")}
        p = {arm: e[e["estimate"]]["p_value"] for arm, e in raw.items()}
        adjusted = {arm: e["holm"]["p_value"] for arm, e in raw.items()}
        assert adjusted == pytest.approx(holm(p)), metric
        if None in p.values():  # no variation in an arm (every session one click): no test, nothing to adjust
            continue
        assert all(adjusted[arm] >= p[arm] for arm in p), metric
        low, high = sorted(p, key=p.get)
        assert adjusted[low] <= adjusted[high], metric  # the step-down keeps the raw p-values' order
    lifts = {arm: compared["arms"][arm]["lift"]["ctr"]["p_value"] for arm in ("B", "C")}
    assert {arm: compared["arms"][arm]["lift_p_holm"]["ctr"] for arm in ("B", "C")} == pytest.approx(holm(lifts))
    conversion = compared["arms"]["C"]["metrics"]["conversion_per_user"]
    assert conversion["holm"]["always_valid_reject"] and conversion["fixed_horizon"]["difference"] > 0
    assert compared["verdict"]["decision"] == "ship C" and compared["verdict"]["winner"] == "C"
    assert "Holm-adjusted over the 2 comparisons with A" in compared["verdict"]["rule"]
    assert report["user_level"]["verdict"] == compared["verdict"]
    assert with_guardrails(compared["verdict"], {"C": {"breached": ["p99 latency 2000 ms over 1000 ms"]}}) == {
        "decision": "keep A", "winner": None,
        "rule": f"guardrail: C's p99 latency 2000 ms over 1000 ms (else: {compared['verdict']['rule']})"}
    markdown = headline_markdown(report)
    assert "**Verdict: ship C**" in markdown and "**Each treatment against A**" in markdown and "(Holm " in markdown


def test_two_arms_keep_their_report_and_a_named_control_is_the_one_compared(tmp_path: Path) -> None:
    store = three_arm_store(tmp_path / "events.db", {"A": 12, "B": 40})
    two = ab_report(store, {"A": 0.5, "B": 0.5})
    assert two["comparisons"]["treatments"] == ["B"] and two["comparisons"]["verdict"] == two["user_level"]["verdict"]
    holm_b = two["comparisons"]["arms"]["B"]["metrics"]["ctr"]
    assert holm_b["holm"]["p_value"] == holm_b[holm_b["estimate"]]["p_value"]  # one comparison: Holm changes nothing
    flipped = ab_report(store, {"A": 0.5, "B": 0.5}, "B")
    assert flipped["comparisons"]["control"] == "B" and flipped["comparisons"]["treatments"] == ["A"]
    assert flipped["comparisons"]["arms"]["A"]["metrics"]["conversion_per_user"]["fixed_horizon"]["difference"] < 0


@pytest.mark.parametrize("entries,past,decision", [
    ({"B": (0.01, 0.04, 0.02), "C": (0.05, 0.001, 0.001)}, False, "ship C"),  # both shown above A: the larger ships
    ({"B": (-0.05, 0.001, 0.001), "C": (-0.01, 0.01, 0.04)}, False, "keep A"),  # both below A
    ({"B": (0.02, 0.3, 0.02), "C": (-0.01, 0.6, 0.6)}, False, "keep running"),
    ({"B": (0.02, 0.3, 0.02), "C": (-0.01, 0.6, 0.6)}, True, "ship B"),  # at the planned size, the fixed horizon
    ({"B": (0.02, 0.3, 0.3), "C": (-0.01, 0.6, 0.6)}, True, "keep A"),
])
def test_the_holm_verdict_reads_the_adjusted_tests(entries: dict, past: bool, decision: str) -> None:
    """(difference, adjusted always-valid p, adjusted fixed-horizon p) per treatment -> the decision."""
    def entry(difference: float, live: float, fixed: float) -> dict:
        return {"estimate": "fixed_horizon", "fixed_horizon": {"difference": difference, "p_value": fixed},
                "holm": {"p_value": fixed, "always_valid_p_value": live, "reject": fixed < 0.05,
                         "always_valid_reject": live < 0.05}}

    got = holm_verdict("conversion_per_user", {k: entry(*v) for k, v in entries.items()}, "A", False, past)
    assert got["decision"] == decision, got
    assert holm_verdict("conversion_per_user", {k: entry(*v) for k, v in entries.items()}, "A", True,
                        past)["decision"] == "fix the assignment"
