"""Always-valid monitoring: the mixture sequential probability ratio test (mSPRT) and its confidence sequence.

The page refreshes the A/B figures every few seconds. A fixed-horizon p-value
looked at on every refresh, and acted on the first time it dips under 0.05,
declares a winner in far more than 5% of A/A tests (``shoprank experiment
calibrate`` measures how many). The mixture SPRT (Robbins, 1970; Johari, Pekelis
& Walsh, "Always valid inference", 2017) stays at ``alpha`` however often it is
looked at.

The effect estimate ``d`` (treatment minus control, from :mod:`userstats`) is
asymptotically ``N(theta, s^2)``. Against ``theta = 0`` the likelihood ratio,
averaged over a **mixing distribution** ``theta ~ N(0, tau^2)``, is::

    Lambda = sqrt(s^2 / (s^2 + tau^2)) * exp(tau^2 d^2 / (2 s^2 (s^2 + tau^2)))

a nonnegative martingale under the null, so by Ville's inequality
``P(Lambda ever >= 1/alpha) <= alpha``: reject the first time it crosses. The
always-valid p-value is ``min(1, 1/Lambda)`` and the confidence sequence, the
effects not rejected, is ``d +- sqrt(s^2 (s^2 + tau^2) / tau^2 * (2 log(1/alpha) +
log(1 + tau^2 / s^2)))``; ``s^2`` is the plug-in variance of the user-level
estimate (the asymptotic confidence sequence of Waudby-Smith et al., 2023).

**The mixing parameter** ``tau`` sets when the test is most sensitive: the
interval is narrowest when ``tau^2 = r* s^2``, ``r*`` minimising
``(1 + 1/r)(2 log(1/alpha) + log(1 + r))`` (:func:`optimal_mixing_ratio`, 8.2 at
alpha 0.05: the interval is then 1.55 times the fixed-horizon one). The report
tunes it for the experiment's planned size: ``tau = sqrt(r*) sigma /
sqrt(n_planned)``, ``sigma^2 = s^2 n_now`` the per-user variance of the
difference, so ``tau`` is a fixed multiple of the metric's per-user spread,
chosen before the data (:func:`mixing_sd`). Any ``tau`` keeps the guarantee;
a poor one only costs power.

**The threshold.** Ville's ``1/alpha`` holds for a test that may run for ever,
and is therefore conservative for one that stops: with the mixture tuned for the
planned size and a look every 1% of it, an A/A test crosses 20 before the planned
size in about 1.4% of experiments, not 5%. An experiment has a planned size
(:mod:`plan`), so the live view uses the threshold ``c`` that a null path crosses
before the planned size with probability exactly ``alpha`` under continuous
monitoring (:func:`horizon_log_threshold`: 8.45 at alpha 0.05, from 20,000
simulated Brownian paths, the way group-sequential designs set their
boundaries). The guarantee then holds for every look up to the planned size;
past it, read the fixed-horizon result. ``horizon=False`` keeps Ville's
threshold; ``shoprank experiment calibrate`` measures both.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from scipy import optimize

ALPHA = 0.05
HORIZON_STEPS = 400
"""Looks per planned size in the null simulation of :func:`horizon_log_threshold` (continuous monitoring
within the resolution any page refresh achieves)."""
NULL_PATHS = 20_000
NULL_SEED = 18
PLANNED_USERS_PER_ARM = 1_000
"""The report's tuning size where no plan says otherwise (:func:`shoprank.experiment.plan.readout_planned_size`)."""


@dataclass(frozen=True)
class PlannedSize:
    """The users per arm the always-valid test is tuned for and the experiment stops at, and where the number came
    from (the readout shows both)."""

    users_per_arm: int
    source: str


UNPLANNED = PlannedSize(PLANNED_USERS_PER_ARM, f"the default {PLANNED_USERS_PER_ARM:,}")


@lru_cache(maxsize=16)
def optimal_mixing_ratio(alpha: float = ALPHA) -> float:
    """``tau^2 / s^2`` at which the confidence sequence is narrowest (about 8.2 at alpha 0.05)."""
    def squared_width(ratio: float) -> float:
        return (1 + 1 / ratio) * (2 * math.log(1 / alpha) + math.log1p(ratio))

    return float(optimize.minimize_scalar(squared_width, bounds=(0.01, 1e4), method="bounded").x)


def mixing_sd(standard_error: float, users_control: int, users_treatment: int,
              planned_users_per_arm: int = PLANNED_USERS_PER_ARM, alpha: float = ALPHA) -> float:
    """``tau`` tuned for ``planned_users_per_arm``: the standard error scaled from now to the planned size."""
    if users_control <= 0 or users_treatment <= 0 or planned_users_per_arm <= 0:
        raise ValueError("needs users in both arms and a positive planned size")
    users_now = 2 / (1 / users_control + 1 / users_treatment)
    return math.sqrt(optimal_mixing_ratio(alpha) * standard_error**2 * users_now / planned_users_per_arm)


@lru_cache(maxsize=16)
def _null_maxima(alpha: float) -> np.ndarray:
    """Sorted maxima of ``log Lambda`` over [0, planned size] of simulated null paths (a fixed seed: reproducible).

    Under the null, with the mixture tuned for the planned size, ``log Lambda`` at information fraction ``f``
    is ``-log(1 + r f) / 2 + r f / (1 + r f) * W(f)^2 / (2 f)`` for a Brownian motion ``W``: it depends on
    nothing but ``alpha`` (through ``r = optimal_mixing_ratio(alpha)``), so one simulation serves every metric.
    """
    ratio = optimal_mixing_ratio(alpha)
    rng = np.random.default_rng(NULL_SEED)
    fraction = np.arange(1, HORIZON_STEPS + 1) / HORIZON_STEPS
    shrink = ratio * fraction / (1 + ratio * fraction)
    maxima = []
    for _ in range(NULL_PATHS // 2_000):
        walk = np.cumsum(rng.standard_normal((2_000, HORIZON_STEPS)), axis=1) / math.sqrt(HORIZON_STEPS)
        log_ratio = -0.5 * np.log1p(ratio * fraction) + shrink * walk**2 / (2 * fraction)
        maxima.append(log_ratio.max(axis=1))
    return np.sort(np.concatenate(maxima))


def horizon_log_threshold(alpha: float = ALPHA) -> float:
    """``log c``: a null path crosses ``Lambda = c`` before the planned size with probability ``alpha``."""
    return float(np.quantile(_null_maxima(alpha), 1 - alpha))


def horizon_p_value(log_likelihood_ratio: float, alpha: float = ALPHA) -> float:
    """Share of null paths whose ``Lambda`` reaches this value before the planned size (valid at any look)."""
    maxima = _null_maxima(alpha)
    above = len(maxima) - int(np.searchsorted(maxima, log_likelihood_ratio, side="left"))
    return (above + 1) / (len(maxima) + 1)


@dataclass(frozen=True)
class AlwaysValid:
    """The mSPRT's state at one look."""

    log_likelihood_ratio: float
    p_value: float
    """Valid at any look, however many looks there were (up to the planned size with ``horizon``)."""
    low: float
    high: float
    """The confidence sequence at this look."""
    reject: bool
    """``Lambda >= c``: the effect is not 0, at level ``alpha``, whenever this is first seen."""
    mixing_sd: float
    log_threshold: float
    """``log c``: ``log(1/alpha)`` (Ville, any horizon) or :func:`horizon_log_threshold`."""

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


def always_valid(difference: float, standard_error: float, tau: float, alpha: float = ALPHA, *,
                 horizon: bool = True) -> AlwaysValid:
    """The mixture likelihood ratio of ``theta = 0`` for an estimate ``difference ~ N(theta, standard_error^2)``.

    ``horizon=True``: the threshold of an experiment that stops at its planned size (``tau`` must be tuned
    for it, :func:`mixing_sd`); ``False``: Ville's ``1/alpha``, valid with no end at all, and conservative
    for any finite one.
    """
    if standard_error <= 0 or tau <= 0:
        raise ValueError(f"standard error and tau must be positive, got {standard_error} and {tau}")
    s2, t2 = standard_error**2, tau**2
    log_ratio = 0.5 * math.log(s2 / (s2 + t2)) + t2 * difference**2 / (2 * s2 * (s2 + t2))
    log_threshold = horizon_log_threshold(alpha) if horizon else math.log(1 / alpha)
    p_value = horizon_p_value(log_ratio, alpha) if horizon else min(1.0, math.exp(-log_ratio))
    half = math.sqrt(s2 * (s2 + t2) / t2 * (2 * log_threshold + math.log1p(t2 / s2)))
    return AlwaysValid(log_ratio, p_value, difference - half, difference + half, log_ratio >= log_threshold, tau,
                       log_threshold)
