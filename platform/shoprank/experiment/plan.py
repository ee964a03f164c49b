"""Planning an experiment: users needed for a minimum detectable effect, or the effect a size can detect.

For a per-user metric with standard deviation ``sigma`` (per user, the same in
both arms), a two-sided test at level ``alpha`` of a difference ``delta`` between
arms of ``n`` and ``ratio * n`` users has power::

    P(Z > z_{1-alpha/2} - delta / se) + P(Z < -z_{1-alpha/2} - delta / se),
    se = sigma sqrt(1/n + 1/(ratio n))

(both tails, as statsmodels' ``NormalIndPower`` counts them). :func:`users_per_arm`
solves it for ``n``, :func:`minimum_detectable_effect` for ``delta``. A
conversion rate ``p`` has ``sigma = sqrt(p (1 - p))``. Ratio metrics plan with
the standard deviation of their linearised per-user values
(:func:`shoprank.experiment.userstats.linearize`).

The always-valid test (:mod:`sequential`) pays for watching continuously with a
wider interval: :func:`sequential_width_factor` says how much wider than the
fixed-horizon interval at the size it is tuned for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import optimize, stats

from shoprank.experiment.sequential import optimal_mixing_ratio


@dataclass(frozen=True)
class Plan:
    """What ``shoprank experiment plan`` answers."""

    baseline: float
    sigma: float
    alpha: float
    power: float
    users_per_arm: int
    minimum_detectable_effect: float
    """Absolute, in the metric's units."""
    relative_effect: float | None
    """``minimum_detectable_effect / baseline`` (None for a baseline of 0)."""
    sequential_width_factor: float


def power(delta: float, sigma: float, users: float, alpha: float = 0.05, ratio: float = 1.0) -> float:
    """Power of the two-sided test of a difference ``delta`` with ``users`` in control and ``ratio * users``."""
    if sigma <= 0 or users <= 0 or ratio <= 0:
        raise ValueError("sigma, users and ratio must be positive")
    se = sigma * math.sqrt(1 / users + 1 / (ratio * users))
    z = stats.norm.ppf(1 - alpha / 2)
    shift = abs(delta) / se
    return float(stats.norm.sf(z - shift) + stats.norm.cdf(-z - shift))


def users_per_arm(delta: float, sigma: float, alpha: float = 0.05, target_power: float = 0.8,
                  ratio: float = 1.0) -> int:
    """The smallest control arm (treatment ``ratio`` times it) reaching ``target_power`` for ``delta``."""
    if delta == 0:
        raise ValueError("no sample size detects an effect of 0")
    if not alpha < target_power < 1:
        raise ValueError(f"power must be between alpha ({alpha}) and 1, got {target_power}")
    exact = optimize.brentq(lambda n: power(delta, sigma, n, alpha, ratio) - target_power, 1e-6, 1e12)
    return max(2, math.ceil(exact))


def minimum_detectable_effect(sigma: float, users: int, alpha: float = 0.05, target_power: float = 0.8,
                              ratio: float = 1.0) -> float:
    """The smallest absolute difference detected with ``target_power`` by arms of ``users`` and ``ratio * users``."""
    if not alpha < target_power < 1:
        raise ValueError(f"power must be between alpha ({alpha}) and 1, got {target_power}")
    se = sigma * math.sqrt(1 / users + 1 / (ratio * users))
    return float(optimize.brentq(lambda d: power(d, sigma, users, alpha, ratio) - target_power, 0.0, 20 * se))


def sequential_width_factor(alpha: float = 0.05) -> float:
    """The always-valid interval's width over the fixed-horizon one, at the size its mixture is tuned for."""
    ratio = optimal_mixing_ratio(alpha)
    return math.sqrt((1 + 1 / ratio) * (2 * math.log(1 / alpha) + math.log1p(ratio))) / stats.norm.ppf(1 - alpha / 2)


def binary_sigma(rate: float) -> float:
    """Per-user standard deviation of a yes/no metric (did the user buy) with this rate."""
    if not 0 < rate < 1:
        raise ValueError(f"a rate must be strictly between 0 and 1, got {rate}")
    return math.sqrt(rate * (1 - rate))


def plan(baseline: float, sigma: float, *, relative_effect: float | None = None, users: int | None = None,
         alpha: float = 0.05, target_power: float = 0.8) -> Plan:
    """Users per arm for ``relative_effect`` (a share of ``baseline``), or the effect ``users`` per arm detect."""
    if (relative_effect is None) == (users is None):
        raise ValueError("give either a relative effect to detect or a number of users per arm")
    if relative_effect is not None:
        delta = relative_effect * baseline
        n = users_per_arm(delta, sigma, alpha, target_power)
    else:
        assert users is not None
        n = users
        delta = minimum_detectable_effect(sigma, n, alpha, target_power)
    return Plan(baseline, sigma, alpha, target_power, n, abs(delta), abs(delta) / baseline if baseline else None,
                sequential_width_factor(alpha))
