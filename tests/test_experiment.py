"""A/B statistics against SciPy's own implementations and textbook values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.stats.contingency import relative_risk

from shoprank.experiment.stats import as_dict, compare, funnel, per_session, sample_ratio_mismatch, wilson


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
