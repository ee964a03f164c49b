"""User-level A/B statistics: the shopper, not the impression, is the unit.

Shoppers are randomised, so the independent observations are shoppers: one
shopper's impressions, sessions and purchases move together (one taste, one mood,
one budget), and a test that treats each impression as independent has intervals
too narrow and p-values too small. Here every figure is computed from one value
(or one numerator and one denominator) per user:

* **per-user metrics** (conversion per user: did the user buy; revenue per user;
  average order value among buyers) compare the two arms' means with **Welch's**
  t interval and test (no equal-variance assumption; the same numbers as
  ``scipy.stats.ttest_ind(equal_var=False)`` and statsmodels' ``CompareMeans``);
* **ratio metrics** (CTR = clicks / impressions, conversion per session, clicks per
  session, revenue per session) are a ratio of two per-user sums,
  ``sum(num) / sum(den)``, whose denominators vary by user: their variance comes
  from the **delta method**. :func:`linearize` turns each user into one value
  ``R + (num - R den) / mean(den)`` whose mean is the ratio and whose
  variance over n is the delta-method variance, so the ratio metric is compared
  exactly like a mean (with a normal, not t, reference: the delta method is
  asymptotic);
* **CUPED** (Deng, Xu, Kohavi & Walker, 2013) subtracts ``theta (x - mean(x))``
  from each user's value, ``x`` being the metric in the user's pre-experiment
  history and ``theta = cov(x, y) / var(x)`` pooled over both arms. ``x`` was fixed
  before assignment, so the difference stays unbiased, while the variance shrinks
  by ``corr(x, y)^2``: the report states that reduction. Ratio metrics are adjusted
  on their linearised values (Deng et al., 2018); a per-user metric by the same
  quantity per pre-period session (:func:`pre_period_covariate`).

A figure that cannot be computed (an empty arm, one user, no variation, a zero
denominator) is ``None`` with the reason in :attr:`Effect.missing`, never a
division by zero.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Effect:
    """Treatment against control on one metric, computed per user."""

    metric: str
    method: str
    """``welch``, ``delta`` (ratio metrics), each with ``+cuped`` when adjusted."""
    users_control: int
    users_treatment: int
    control: float | None
    """The control arm's value (its mean, or its ratio of sums)."""
    treatment: float | None
    difference: float | None
    """``treatment - control``, in the metric's units."""
    low: float | None
    high: float | None
    """The confidence interval of ``difference``."""
    relative: float | None
    """``treatment / control - 1``."""
    relative_low: float | None
    relative_high: float | None
    """Its delta-method interval (the two arms' means are independent)."""
    p_value: float | None
    standard_error: float | None
    """Of ``difference``; the sequential test and the planner work from it."""
    variance_reduction: float | None = None
    """CUPED only: ``1 - var(adjusted difference) / var(unadjusted difference)``."""
    missing: str | None = None
    """Why a figure above is ``None``."""

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def compare_means(metric: str, control: ArrayLike, treatment: ArrayLike, *, normal: bool = False,
                  method: str = "welch", confidence: float = CONFIDENCE) -> Effect:
    """The difference of two arms' means: Welch's t (``normal=False``) or the normal approximation.

    ``normal=True`` is for linearised ratio metrics, whose delta-method variance is asymptotic.
    """
    a = np.asarray(control, dtype=float)
    b = np.asarray(treatment, dtype=float)
    na, nb = len(a), len(b)
    mean_a = float(a.mean()) if na else None
    mean_b = float(b.mean()) if nb else None
    empty = Effect(metric, method, na, nb, mean_a, mean_b, None, None, None, None, None, None, None, None)
    if na < 2 or nb < 2:
        return replace(empty, missing=f"needs at least 2 users per arm (control {na}, treatment {nb})")
    assert mean_a is not None and mean_b is not None
    var_a, var_b = a.var(ddof=1) / na, b.var(ddof=1) / nb
    difference = mean_b - mean_a
    effect = replace(empty, difference=difference)
    standard_error = math.sqrt(var_a + var_b)
    if standard_error == 0.0:
        return replace(effect, missing="no variation within either arm: no interval or test")
    if normal:
        reference = stats.norm
    else:  # Welch-Satterthwaite degrees of freedom
        dof = (var_a + var_b) ** 2 / (var_a**2 / (na - 1) + var_b**2 / (nb - 1))
        reference = stats.t(dof)
    statistic = difference / standard_error
    half = float(reference.ppf(0.5 + confidence / 2)) * standard_error
    p_value = float(2 * reference.sf(abs(statistic)))
    effect = replace(effect, low=difference - half, high=difference + half, p_value=p_value,
                     standard_error=standard_error)
    if mean_a == 0.0:
        return replace(effect, missing="control value is 0: no relative lift")
    ratio = mean_b / mean_a
    relative_se = math.sqrt(var_b / mean_a**2 + mean_b**2 * var_a / mean_a**4)
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    return replace(effect, relative=ratio - 1, relative_low=_finite(ratio - 1 - z * relative_se),
                   relative_high=_finite(ratio - 1 + z * relative_se))


def welch(metric: str, control: ArrayLike, treatment: ArrayLike, confidence: float = CONFIDENCE) -> Effect:
    """A per-user metric (one value per user): Welch's unequal-variance t interval and test."""
    return compare_means(metric, control, treatment, confidence=confidence)


def linearize(numerator: ArrayLike, denominator: ArrayLike) -> np.ndarray | None:
    """Per-user values whose mean is ``sum(num) / sum(den)`` and whose variance / n is its delta-method variance.

    ``R + (num_i - R den_i) / mean(den)``: the first-order Taylor expansion of the ratio of means around
    the arm's means. None when the arm has no users or its denominators sum to 0 (no ratio).
    """
    num = np.asarray(numerator, dtype=float)
    den = np.asarray(denominator, dtype=float)
    if not len(den) or den.sum() <= 0:
        return None
    ratio = num.sum() / den.sum()
    return ratio + (num - ratio * den) / den.mean()


def delta_ratio(metric: str, numerator_control: ArrayLike, denominator_control: ArrayLike,
                numerator_treatment: ArrayLike, denominator_treatment: ArrayLike,
                confidence: float = CONFIDENCE) -> Effect:
    """A ratio metric (sum of per-user numerators over sum of denominators): delta-method interval and z-test."""
    a = linearize(numerator_control, denominator_control)
    b = linearize(numerator_treatment, denominator_treatment)
    if a is None or b is None:
        return Effect(metric, "delta", len(np.atleast_1d(numerator_control)), len(np.atleast_1d(numerator_treatment)),
                      None if a is None else float(a.mean()), None if b is None else float(b.mean()),
                      None, None, None, None, None, None, None, None,
                      missing="an arm's denominator sums to 0: no ratio")
    return compare_means(metric, a, b, normal=True, method="delta", confidence=confidence)


def cuped(metric: str, control: ArrayLike, control_before: ArrayLike, treatment: ArrayLike,
          treatment_before: ArrayLike, *, normal: bool = False, method: str = "welch",
          confidence: float = CONFIDENCE) -> Effect:
    """The difference of means adjusted by each user's pre-experiment value (CUPED), with the variance reduction.

    ``theta`` is pooled over both arms: the covariate is pre-treatment, so pooling costs no bias and
    halves theta's noise. Without pre-experiment variation theta is 0 and the result is the unadjusted one.
    """
    y_a, x_a = np.asarray(control, dtype=float), np.asarray(control_before, dtype=float)
    y_b, x_b = np.asarray(treatment, dtype=float), np.asarray(treatment_before, dtype=float)
    if y_a.shape != x_a.shape or y_b.shape != x_b.shape:
        raise ValueError("each user needs one pre-experiment value: shapes of values and covariates differ")
    plain = compare_means(metric, y_a, y_b, normal=normal, method=method, confidence=confidence)
    x, y = np.concatenate([x_a, x_b]), np.concatenate([y_a, y_b])
    method = f"{method}+cuped"
    if plain.standard_error is None or len(x) < 3 or x.var() == 0.0:
        reason = plain.missing or "no variation in the pre-experiment values: nothing to adjust by"
        return replace(plain, method=method, variance_reduction=0.0 if plain.standard_error else None,
                       missing=reason)
    theta = float(np.cov(x, y)[0, 1] / x.var(ddof=1))
    centre = x.mean()
    adjusted = compare_means(metric, y_a - theta * (x_a - centre), y_b - theta * (x_b - centre), normal=normal,
                             method=method, confidence=confidence)
    if adjusted.standard_error is None:
        return replace(adjusted, variance_reduction=None)
    return replace(adjusted, variance_reduction=1.0 - adjusted.standard_error**2 / plain.standard_error**2)


def cuped_ratio(metric: str, numerator_control: ArrayLike, denominator_control: ArrayLike,
                numerator_before_control: ArrayLike, denominator_before_control: ArrayLike,
                numerator_treatment: ArrayLike, denominator_treatment: ArrayLike,
                numerator_before_treatment: ArrayLike, denominator_before_treatment: ArrayLike,
                confidence: float = CONFIDENCE) -> Effect:
    """A ratio metric adjusted by the same ratio over each user's history: CUPED on linearised values.

    The covariate is linearised around the pooled pre-experiment ratio (a fixed function of
    pre-treatment data, the same for both arms); users without history sit at its centre.
    """
    a = linearize(numerator_control, denominator_control)
    b = linearize(numerator_treatment, denominator_treatment)
    if a is None or b is None:
        return replace(delta_ratio(metric, numerator_control, denominator_control, numerator_treatment,
                                   denominator_treatment, confidence), method="delta+cuped")
    before_num = np.concatenate([np.asarray(numerator_before_control, float),
                                 np.asarray(numerator_before_treatment, float)])
    before_den = np.concatenate([np.asarray(denominator_before_control, float),
                                 np.asarray(denominator_before_treatment, float)])
    before = linearize(before_num, before_den)
    if before is None:
        before = np.zeros(len(a) + len(b))
    return cuped(metric, a, before[: len(a)], b, before[len(a):], normal=True, method="delta",
                 confidence=confidence)


@dataclass(frozen=True)
class UserTotals:
    """One arm's users, one entry each (the same order in every array): what each did in the experiment.

    A session is a run of the user's impressions without a gap over the report's session gap
    (impressions carry no session id); a converted session is one with a purchase.
    """

    impressions: np.ndarray
    clicks: np.ndarray
    add_to_carts: np.ndarray
    purchases: np.ndarray
    revenue: np.ndarray
    sessions: np.ndarray
    converted_sessions: np.ndarray

    @classmethod
    def empty(cls) -> "UserTotals":
        return cls(*(np.zeros(0) for _ in range(7)))


RATIO_METRICS: dict[str, tuple[str, str]] = {
    "ctr": ("clicks", "impressions"),
    "conversion_per_session": ("converted_sessions", "sessions"),
    "clicks_per_session": ("clicks", "sessions"),
    "revenue_per_session": ("revenue", "sessions"),
}
"""Ratio metrics (delta method): numerator and denominator fields of :class:`UserTotals`."""
PER_USER_METRICS = ("conversion_per_user", "revenue_per_user", "average_order_value")
"""Per-user metrics (Welch); the average order value is each buyer's revenue per purchase, over buyers only."""
REVENUE_METRICS = ("revenue_per_session", "revenue_per_user", "average_order_value")


def _per_user_values(metric: str, totals: UserTotals) -> np.ndarray:
    if metric == "conversion_per_user":
        return (totals.purchases > 0).astype(float)
    if metric == "revenue_per_user":
        return totals.revenue.astype(float)
    buyers = totals.purchases > 0
    return totals.revenue[buyers] / totals.purchases[buyers]


PER_SESSION_COVARIATES = {"conversion_per_user": "converted_sessions", "revenue_per_user": "revenue"}
"""Per-user metric -> the :class:`UserTotals` field that, per pre-period session, is its CUPED covariate."""


def pre_period_covariate(metric: str, before: UserTotals) -> np.ndarray:
    """A per-user metric's CUPED covariate: the same quantity per pre-period session (the share of the user's
    sessions that bought; their revenue per session).

    Why per session: a pre-period's total ("bought at all in the last 90 days") mostly says how often the shopper
    came, while the experiment's outcome is what they did on its few visits. On the demo shop's ground truth
    (:mod:`shoprank.experiment.calibrate`'s page bank, 2,000 shoppers, about 14 earlier visits each) "bought before"
    explains 0.7% of a visit's conversion, the share of sessions that bought 7%. Users without a pre-period sit at
    the mean of those with one: they move neither theta nor their own value.
    """
    sessions = before.sessions
    known = sessions > 0
    rate = np.divide(getattr(before, PER_SESSION_COVARIATES[metric]), sessions, out=np.zeros(len(sessions)),
                     where=known)
    if known.any():
        rate[~known] = rate[known].mean()
    return rate


def metric_effects(metric: str, control: UserTotals, treatment: UserTotals, control_before: UserTotals,
                   treatment_before: UserTotals, confidence: float = CONFIDENCE) -> tuple[Effect, Effect]:
    """The fixed-horizon effect of ``metric`` and its CUPED-adjusted one (covariate: the same ratio before, or for
    a per-user metric :func:`pre_period_covariate`)."""
    if metric in RATIO_METRICS:
        num, den = RATIO_METRICS[metric]
        plain = delta_ratio(metric, getattr(control, num), getattr(control, den), getattr(treatment, num),
                            getattr(treatment, den), confidence)
        adjusted = cuped_ratio(metric, getattr(control, num), getattr(control, den), getattr(control_before, num),
                               getattr(control_before, den), getattr(treatment, num), getattr(treatment, den),
                               getattr(treatment_before, num), getattr(treatment_before, den), confidence)
        return plain, adjusted
    plain = welch(metric, _per_user_values(metric, control), _per_user_values(metric, treatment), confidence)
    if metric == "average_order_value":  # buyers only: their history is no covariate of a selected group
        return plain, replace(plain, method="welch+cuped",
                              missing="CUPED needs every user; this metric has buyers only")
    both = UserTotals(*(np.concatenate([getattr(control_before, name), getattr(treatment_before, name)])
                        for name in UserTotals.__dataclass_fields__))
    covariate = pre_period_covariate(metric, both)  # one pooled fill for users without history, as theta is pooled
    adjusted = cuped(metric, _per_user_values(metric, control), covariate[: len(control.sessions)],
                     _per_user_values(metric, treatment), covariate[len(control.sessions):], confidence=confidence)
    return plain, adjusted
