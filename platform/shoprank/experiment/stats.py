"""The statistics of an A/B report, as plain functions of counts.

* a rate with its 95% **Wilson** interval (well behaved at small counts and rates
  near 0 or 1, unlike the normal approximation);
* B against A: the **relative lift** ``p_B / p_A - 1`` with the Katz log interval
  (the delta method on ``log(p_B / p_A)``) and the two-sided p-value of the pooled
  **two-proportion z-test**;
* the **sample-ratio mismatch** check: a chi-square goodness-of-fit test of the
  users each variant got against the configured split; a tiny p-value (below
  0.001 by convention) means the assignment is broken and no other figure of the
  report can be trusted;
* the **funnel** view -> click -> add to cart -> purchase, each step's rate of the
  step before;
* **Holm's step-down** adjustment of the p-values of several comparisons (an A/B/n
  experiment's treatments, each against the control), which keeps the chance of any
  false rejection among them at alpha, uniformly more powerful than Bonferroni.

Every function takes counts, returns plain numbers, and is tested against SciPy's
own implementations of the same statistics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from scipy import stats

FUNNEL = ("view", "click", "add_to_cart", "purchase")
SRM_ALPHA = 0.001


@dataclass(frozen=True)
class Rate:
    """successes / trials with its confidence interval."""

    successes: int
    trials: int
    rate: float
    low: float
    high: float


def wilson(successes: int, trials: int, confidence: float = 0.95) -> Rate:
    """The rate and its Wilson score interval (0, 0, 1 for no trials: nothing is known)."""
    _check_counts(successes, trials)
    if trials == 0:
        return Rate(successes, trials, 0.0, 0.0, 1.0)
    z = stats.norm.ppf(0.5 + confidence / 2)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return Rate(successes, trials, p, max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class Comparison:
    """Treatment against control on one rate."""

    control: Rate
    treatment: Rate
    lift: float
    """``treatment / control - 1`` (nan when the control rate is 0)."""
    lift_low: float
    lift_high: float
    z: float
    p_value: float


def compare(
    control_successes: int, control_trials: int, treatment_successes: int, treatment_trials: int,
    confidence: float = 0.95,
) -> Comparison:
    """Relative lift with its interval, and the pooled two-proportion z-test (two-sided)."""
    control = wilson(control_successes, control_trials, confidence)
    treatment = wilson(treatment_successes, treatment_trials, confidence)
    nan = float("nan")
    pooled_trials = control_trials + treatment_trials
    if control_trials == 0 or treatment_trials == 0:
        return Comparison(control, treatment, nan, nan, nan, nan, nan)
    pooled = (control_successes + treatment_successes) / pooled_trials
    variance = pooled * (1 - pooled) * (1 / control_trials + 1 / treatment_trials)
    difference = treatment.rate - control.rate
    if variance > 0:
        z = difference / math.sqrt(variance)
        p_value = float(2 * stats.norm.sf(abs(z)))
    else:  # both rates 0 or both 1: no evidence either way
        z, p_value = 0.0, 1.0
    if control_successes == 0 or treatment_successes == 0:
        return Comparison(control, treatment, nan if control_successes == 0 else -1.0, nan, nan, z, p_value)
    ratio = treatment.rate / control.rate
    spread = stats.norm.ppf(0.5 + confidence / 2) * math.sqrt(
        1 / treatment_successes - 1 / treatment_trials + 1 / control_successes - 1 / control_trials
    )
    return Comparison(control, treatment, ratio - 1, ratio * math.exp(-spread) - 1, ratio * math.exp(spread) - 1,
                      z, p_value)


@dataclass(frozen=True)
class SampleRatio:
    """Users per variant against the configured split."""

    observed: dict[str, int]
    expected_share: dict[str, float]
    chi2: float
    p_value: float
    mismatch: bool
    """True when ``p_value < SRM_ALPHA``: the assignment is broken."""


def sample_ratio_mismatch(observed: Mapping[str, int], expected_share: Mapping[str, float]) -> SampleRatio:
    """Chi-square goodness of fit of the observed counts to the expected shares."""
    names = list(expected_share)
    if set(observed) - set(names):
        raise ValueError(f"variants {sorted(set(observed) - set(names))} have no expected share")
    total_share = sum(expected_share.values())
    if total_share <= 0 or any(v < 0 for v in expected_share.values()):
        raise ValueError("expected shares must be non-negative and sum to more than 0")
    counts = [int(observed.get(n, 0)) for n in names]
    total = sum(counts)
    if total == 0:
        return SampleRatio(dict(zip(names, counts)), dict(expected_share), 0.0, 1.0, False)
    expected = [total * expected_share[n] / total_share for n in names]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(counts, expected) if e > 0)
    p_value = float(stats.chi2.sf(chi2, df=len(names) - 1))
    return SampleRatio(dict(zip(names, counts)), dict(expected_share), chi2, p_value, p_value < SRM_ALPHA)


def holm(p_values: Mapping[str, float | None]) -> dict[str, float | None]:
    """Holm's step-down adjusted p-values of one family of comparisons (name -> p-value).

    With the ``m`` p-values in increasing order ``p_(1) <= ... <= p_(m)``, the ``i``-th adjusted one is
    ``max_{j <= i} min(1, (m - j + 1) p_(j))``: rejecting every comparison whose adjusted p-value is below alpha is
    Holm's procedure (1979), whose family-wise error rate is at most alpha under any dependence. A comparison
    without a p-value (too few users yet) still counts in ``m`` (the family is every comparison planned, so a
    figure never gets less strict as arms fill up) and is adjusted to None. Ties keep their order of
    ``p_values``. Statsmodels' ``multipletests(method="holm")`` gives the same numbers.
    """
    for name, p in p_values.items():
        if p is not None and not 0.0 <= p <= 1.0:
            raise ValueError(f"p-value of {name!r} is {p}, not in [0, 1]")
    m = len(p_values)
    known = sorted(((p, i, name) for i, (name, p) in enumerate(p_values.items()) if p is not None))
    adjusted: dict[str, float | None] = dict.fromkeys(p_values)
    running = 0.0
    for rank, (p, _, name) in enumerate(known):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[name] = running
    return adjusted


def funnel(counts: Mapping[str, int]) -> list[dict[str, float]]:
    """Each funnel step's count and its rate of the step before (the first step's rate is 1)."""
    steps = []
    previous = None
    for step in FUNNEL:
        count = int(counts.get(step, 0))
        rate = 1.0 if previous is None else (count / previous if previous else 0.0)
        steps.append({"step": step, "count": count, "rate_of_previous": rate})
        previous = count
    return steps


def per_session(total: int, sessions: int) -> float:
    """Average of a count per session (0 without sessions)."""
    return total / sessions if sessions else 0.0


def as_dict(value: Rate | Comparison | SampleRatio) -> dict:
    """JSON-ready form (nan becomes None)."""
    def clean(v: object) -> object:
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return clean(asdict(value))  # type: ignore[return-value]


def _check_counts(successes: int, trials: int) -> None:
    if trials < 0 or successes < 0 or successes > trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")

