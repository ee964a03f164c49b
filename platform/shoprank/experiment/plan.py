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
fixed-horizon interval at the size it is tuned for, so the same power needs about
its square times the users.

**The effect to plan for** may come from the offline evaluation of the run
(:func:`predicted_effect`): the relative NDCG@10 change of B (fine-tuned retrieval +
ranker) over A (the zero-shot encoder), averaged over the tasks by their share of
traffic, times :data:`PASS_THROUGH`, the share of an offline change that reached the
decision metric online when it was last measured (docs/experiments.md argues it).

**An A/B/n experiment** (``arms`` variants: one control, ``arms - 1`` treatments) compares
each treatment with the control, and the report adjusts those ``arms - 1`` p-values with
Holm's step-down procedure. A plan cannot know which comparison Holm will test at which
level, so it sizes each for Holm's worst case, the first step: Bonferroni's ``alpha /
(arms - 1)`` (:func:`comparison_alpha`); every arm needs those users, the total is
``arms`` times them.

**A simulated shop may be smaller than the plan** (:func:`simulation_size`): its
shoppers come back over days instead, which the report counts as sessions, never as
more users; the size says so and what power the shop's shoppers give.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scipy import optimize, stats

from shoprank.errors import ShopRankError
from shoprank.experiment.sequential import PLANNED_USERS_PER_ARM, UNPLANNED, PlannedSize, optimal_mixing_ratio

if TYPE_CHECKING:
    from shoprank.config import Config, ServeConfig
    from shoprank.store.run import Run

CONTROL_SYSTEM = "retrieval (zero-shot encoder)"
"""Variant A's row of the offline evaluation (``serve.variants``' baseline: the zero-shot encoder's retrieval)."""
TREATMENT_SYSTEM = "fine-tuned retrieval + ranker"
"""Variant B's row: the trained run's full answer path."""
PASS_THROUGH = 0.18
"""The share of the offline relative NDCG@10 change expected on conversion per user online: the lower of the demo's
two measurements, so a plan errs towards more shoppers. Issue 37's readout: offline +12.4% (search +37.1%,
recommendation -12.4%, half the traffic each), online +6.6% (0.53 of it); 2026-12-07's (ca2ec71, 243 shoppers):
offline +73.0% (search +47.2%, recommendation +98.8%), online +13.1% (0.64 to 0.73 conversion per user, 0.18 of
it). The share falls as the offline gain grows (conversion per user cannot double when two thirds of visitors
already buy), and a plan on 0.5 there planned 101 shoppers per arm for +36.5%, reached its size underpowered and
kept A. A shop replaces it with its own once it has run an experiment."""
DEMO_CONVERSION_PER_USER = 0.54
"""Variant A's conversion per user in the demo's 2,000-shopper simulation (issue 37's readout): the baseline of a
conversion plan when none is given."""
SEARCH_SHARE = 0.5
"""The share of page views that are searches in ``shoprank simulate`` (the rest ask for recommendations)."""
MAX_VISITS = 7
"""A simulated shopper comes back on at most this many days (a week): the configs' ``serve.simulated_days`` covers
it."""


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
    arms: int = 2
    """Variants of the experiment (control included); ``alpha`` is each comparison's: the family's alpha over
    ``arms - 1`` (:func:`comparison_alpha`)."""

    @property
    def total_users(self) -> int:
        """Every arm's users together."""
        return self.users_per_arm * self.arms

    @property
    def sequential_users_per_arm(self) -> int:
        """About the users per arm the always-valid test needs for the same power: its interval is
        ``sequential_width_factor`` times wider, and a width shrinks as the square root of the users."""
        return math.ceil(self.users_per_arm * self.sequential_width_factor ** 2)


@dataclass(frozen=True)
class PredictedEffect:
    """The relative effect on the decision metric that the offline evaluation predicts, and how it was reached."""

    relative_effect: float
    ndcg_change: dict[str, float]
    """Task -> B's relative NDCG@10 change over A."""
    shares: dict[str, float]
    """Task -> its share of traffic (over the tasks with figures)."""
    pass_through: float
    left_out: dict[str, str]
    """Task -> why its figures predict nothing (A scores 0 there: no relative change)."""

    def explain(self) -> str:
        tasks = ", ".join(f"{task} {change:+.1%} ({self.shares[task]:.0%} of traffic)"
                          for task, change in self.ndcg_change.items())
        left_out = "".join(f"; {task} left out: {why}" for task, why in self.left_out.items())
        return (f"predicted effect {self.relative_effect:+.2%}: B's NDCG@10 over A's offline, {tasks}, "
                f"times {self.pass_through:g} (the share of an offline change that reached the decision metric "
                f"online, docs/experiments.md){left_out}")


@dataclass(frozen=True)
class SimulationSize:
    """How many simulated shoppers, each visiting how many days, a plan asks of a simulated shop."""

    needed: int
    """Shoppers the plan needs, every arm together, with the margin that makes each arm reach its planned size
    (:func:`shoppers_for`)."""
    shop_users: int
    shoppers: int
    visits: int
    """Visits per shopper, a simulated day apart."""
    power_reached: float
    """The plan's power for its effect at the shoppers simulated."""

    @property
    def reaches_plan(self) -> bool:
        return self.shoppers >= self.needed

    def explain(self) -> str:
        if self.reaches_plan:
            return (f"simulation: {self.shoppers:,} shoppers, {self.visits} visit(s) each (the plan's "
                    f"{self.needed:,}; the simulated shop has {self.shop_users:,})")
        return (f"simulation: all {self.shoppers:,} shoppers of the simulated shop, each on {self.visits} days "
                f"({self.shoppers * self.visits:,} visits). It stops short of the plan: the plan needs "
                f"{self.needed:,} shoppers and the shop has {self.shop_users:,}; the user-level test counts "
                f"shoppers, not visits, so the extra visits make each shopper's figure steadier but add no user, "
                f"and its power for the planned effect is {self.power_reached:.0%}, not the plan's. A simulated shop "
                f"of {self.needed:,} shoppers (source.synthetic.num_users) would reach it.")


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


def comparison_alpha(alpha: float, arms: int) -> float:
    """Each comparison's level in an experiment of ``arms`` variants whose ``arms - 1`` treatment-against-control
    p-values the report adjusts with Holm's procedure at family level ``alpha``: its worst case, the smallest
    p-value tested at Bonferroni's ``alpha / (arms - 1)``."""
    if arms < 2:
        raise ValueError(f"an experiment has at least 2 arms (a control and a treatment), got {arms}")
    return alpha / (arms - 1)


def plan(baseline: float, sigma: float, *, relative_effect: float | None = None, users: int | None = None,
         alpha: float = 0.05, target_power: float = 0.8, arms: int = 2) -> Plan:
    """Users per arm for ``relative_effect`` (a share of ``baseline``), or the effect ``users`` per arm detect; with
    ``arms`` variants, each comparison at :func:`comparison_alpha` (``alpha`` is the family's)."""
    if (relative_effect is None) == (users is None):
        raise ValueError("give either a relative effect to detect or a number of users per arm")
    alpha = comparison_alpha(alpha, arms)
    if relative_effect is not None:
        delta = relative_effect * baseline
        n = users_per_arm(delta, sigma, alpha, target_power)
    else:
        assert users is not None
        n = users
        delta = minimum_detectable_effect(sigma, n, alpha, target_power)
    return Plan(baseline, sigma, alpha, target_power, n, abs(delta), abs(delta) / baseline if baseline else None,
                sequential_width_factor(alpha), arms)


def evaluation_table(run: "Run") -> dict[str, dict[str, dict[str, float]]]:
    """The run's offline figures (task -> system -> metric), or a clear error when it has none."""
    table = run.manifest().get("stages", {}).get("evaluate", {}).get("metrics", {}).get("table")
    if not table:
        raise ShopRankError(f"the run {run.uri()} has no offline evaluation (its evaluate stage has not run): run the "
                            "pipeline to its evaluate stage, or give the effect to plan for with --mde")
    return table


def predicted_effect(table: Mapping[str, Mapping[str, Mapping[str, float]]], search_share: float = SEARCH_SHARE,
                     pass_through: float = PASS_THROUGH) -> PredictedEffect:
    """:func:`predicted_effect_of` A's and B's rows (:data:`CONTROL_SYSTEM`, :data:`TREATMENT_SYSTEM`) of the
    offline ``table`` (task -> system -> metric); a task the traffic asks for with figures but without both rows
    is an error."""
    weights = {"search": search_share, "recommend": 1 - search_share}
    ndcg: dict[str, dict[str, float]] = {CONTROL_SYSTEM: {}, TREATMENT_SYSTEM: {}}
    for task, rows in table.items():
        if not rows or not weights.get(task):
            continue
        missing = [system for system in ndcg if system not in rows]
        if missing:
            raise ShopRankError(f"the offline evaluation's {task} figures have no {' and no '.join(missing)} row")
        for system in ndcg:
            ndcg[system][task] = rows[system]["ndcg@10"]
    return predicted_effect_of(ndcg[CONTROL_SYSTEM], ndcg[TREATMENT_SYSTEM], search_share, pass_through)


def predicted_effect_of(control: Mapping[str, float], treatment: Mapping[str, float],
                        search_share: float = SEARCH_SHARE, pass_through: float = PASS_THROUGH) -> PredictedEffect:
    """The relative effect on the decision metric that A's and B's offline NDCG@10 (task -> figure; a task in only
    one of them has no figures) predict for B over A (module docstring): each task's relative NDCG@10 change,
    weighted by its share of traffic (``search_share`` of searches; a task without figures, or where A scores 0,
    leaves the others' shares to add to 1), times ``pass_through``."""
    if not 0 <= search_share <= 1:
        raise ShopRankError(f"--search-share is a share of traffic between 0 and 1, got {search_share}")
    if not 0 < pass_through <= 1:
        raise ShopRankError(f"--pass-through is a share between 0 (excluded) and 1, got {pass_through}")
    weights = {"search": search_share, "recommend": 1 - search_share}
    changes: dict[str, float] = {}
    left_out: dict[str, str] = {}
    for task, weight in weights.items():
        if task not in control or task not in treatment or weight == 0:
            continue
        if control[task] <= 0:
            left_out[task] = f"A's offline NDCG@10 is {control[task]:g}, no relative change to predict from"
            continue
        changes[task] = treatment[task] / control[task] - 1
    if not changes:
        why = "".join(f"; {task}: {reason}" for task, reason in left_out.items())
        with_figures = [task for task in control if task in treatment]
        raise ShopRankError("the offline evaluation has no figures to predict from for the tasks the traffic asks "
                            f"for (search share {search_share:g}; tasks with figures: {', '.join(with_figures) or 'none'}"
                            f"{why})")
    total = sum(weights[task] for task in changes)
    shares = {task: weights[task] / total for task in changes}
    relative = pass_through * sum(shares[task] * change for task, change in changes.items())
    if relative == 0:
        raise ShopRankError("the offline evaluation predicts no difference between B and A: give the effect to plan "
                            "for with --mde")
    return PredictedEffect(relative, changes, shares, pass_through, left_out)


def conversion_plan(effect: PredictedEffect, arms: int = 2) -> Plan:
    """The plan for ``effect`` on conversion per user at the demo's baseline (:data:`DEMO_CONVERSION_PER_USER`),
    with ``arms`` variants: what ``shoprank experiment plan`` prints by default, ``shoprank simulate`` sends and the
    readout stops at."""
    return plan(DEMO_CONVERSION_PER_USER, binary_sigma(DEMO_CONVERSION_PER_USER),
                relative_effect=effect.relative_effect, arms=arms)


ARMS_REACHED = 0.99
"""How sure :func:`shoppers_for` makes that every arm reaches its planned size."""


def shoppers_for(users_per_arm: int, arms: int = 2, sure: float = ARMS_REACHED) -> int:
    """The shoppers to send so that every one of ``arms`` equal arms gets ``users_per_arm`` or more with
    probability about ``sure``: the assignment hashes each shopper on its own, so an arm's count is binomial
    (690 shoppers for 345 per arm split 349/341 in the demo), and a simulation of exactly the planned total leaves
    an arm short of the planned size about half the time."""
    z = stats.norm.ppf(1 - (1 - sure) / arms)  # a union bound over the arms
    share = 1 / arms
    total = users_per_arm * arms
    while total * share - z * math.sqrt(total * share * (1 - share)) < users_per_arm:
        total += 1
    return total


def simulation_size(result: Plan, shop_users: int, arms: int | None = None,
                    max_visits: int = MAX_VISITS) -> SimulationSize:
    """The simulation ``result`` asks of a shop of ``shop_users``: its planned shoppers (:func:`shoppers_for`: users
    per arm x ``arms``, the plan's by default, and the margin that makes every arm reach it) when the shop has them,
    else every shopper, coming back on as many days as the plan has shoppers per shopper (at most ``max_visits``)."""
    arms = result.arms if arms is None else arms
    needed = shoppers_for(result.users_per_arm, arms)
    shoppers = min(needed, shop_users)
    reached = power(result.minimum_detectable_effect, result.sigma, shoppers / arms, result.alpha)
    visits = min(max_visits, math.ceil(needed / shoppers))
    return SimulationSize(needed, shop_users, shoppers, visits, reached)


def readout_planned_size(serve: "ServeConfig", offline: Mapping[str, Mapping[str, Any]], control: str | None = None,
                         treatment: str | None = None) -> PlannedSize:
    """``serve.planned_users_per_arm``, or else the plan ``shoprank experiment plan`` prints for the served
    variants: the effect their offline NDCG@10 (``offline``: variant -> :func:`offline_figures
    <shoprank.serving.variants.offline_figures>`) predicts on conversion per user, at the demo's baseline; so the
    demo's readout stops where its default simulation does. ``control``: serve.control's variant unless given;
    the treatments: ``treatment``, or every other variant of ``serve.variants``; with several, the smallest effect a
    treatment's figures predict, each comparison at Bonferroni's level over them (:func:`comparison_alpha`). Where
    no plan can be made (another decision metric, no offline figures), :data:`~shoprank.experiment.sequential.
    PLANNED_USERS_PER_ARM`, saying why."""
    if serve.planned_users_per_arm is not None:
        return PlannedSize(serve.planned_users_per_arm, "serve.planned_users_per_arm")
    fallback = f"{UNPLANNED.source}: set serve.planned_users_per_arm to your plan's users per arm"
    if serve.decision_metric != "conversion_per_user":
        return PlannedSize(PLANNED_USERS_PER_ARM, f"{fallback} (shoprank experiment plan --metric "
                                                  f"{serve.decision_metric} --baseline ... --std ...)")
    control = control if control is not None else serve.control_variant
    treatments = [treatment] if treatment is not None else (serve.treatments or ["B"])
    figures = {name: (offline.get(name) or {}).get("ndcg@10") or {} for name in (control, *treatments)}
    effects: dict[str, PredictedEffect] = {}
    problems: list[str] = []
    for name in treatments:
        try:
            effects[name] = predicted_effect_of(figures[control], figures[name])
        except ShopRankError as exc:
            problems.append(f"{name}: {exc}" if len(treatments) > 1 else str(exc))
    try:
        if not effects:
            raise ShopRankError("; ".join(problems))
        smallest = min(effects, key=lambda name: abs(effects[name].relative_effect))
        effect = effects[smallest]
        result = conversion_plan(effect, arms=len(treatments) + 1)
    except (ShopRankError, ValueError) as exc:
        return PlannedSize(PLANNED_USERS_PER_ARM, f"{fallback} (no plan from the variants' offline figures: {exc})")
    arms = "" if len(treatments) == 1 else (
        f", the smallest predicted of {len(treatments)} treatments, each compared at alpha {result.alpha:.3g} "
        f"(Holm's worst case over {len(treatments)} comparisons)"
        + (f"; {'; '.join(problems)}" if problems else ""))
    return PlannedSize(result.users_per_arm, f"shoprank experiment plan: {effect.relative_effect:+.1%} predicted "
                                             f"by {smallest}'s offline NDCG@10 over {control}'s{arms}, at the demo's "
                                             f"conversion per user {DEMO_CONVERSION_PER_USER:g}; set "
                                             "serve.planned_users_per_arm to your own plan")


def planned_simulation(config: "Config") -> tuple[Plan, PredictedEffect, SimulationSize]:
    """The plan of the experiment on ``config``'s simulated shop (the effect its run's offline evaluation predicts
    on conversion per user, at the demo's baseline) and the simulation it asks for: what ``shoprank simulate`` and
    the page's simulate control send unless told otherwise."""
    from shoprank.store.run import Run

    effect = predicted_effect(evaluation_table(Run.for_config(config)))
    result = conversion_plan(effect, arms=max(2, len(config.serve.variants)))
    return result, effect, simulation_size(result, config.source.synthetic.num_users)
