"""User-level A/B statistics against SciPy, statsmodels, a user-level bootstrap and simulations of known effects."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from scipy import stats
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

from shoprank.config import load_config
from shoprank.data.synthetic import ShopModel
from shoprank.experiment import calibrate as calibration
from shoprank.experiment.plan import minimum_detectable_effect, plan, power, users_per_arm
from shoprank.experiment.readout import headline_markdown, user_level_markdown
from shoprank.experiment.report import ab_report, run_pre_period
from shoprank.experiment.report_model import ABReport
from shoprank.experiment.sequential import PlannedSize, always_valid, horizon_log_threshold, mixing_sd
from shoprank.experiment.userstats import (
    UserTotals, compare_means, cuped, cuped_ratio, delta_ratio, linearize, metric_effects, welch,
)
from shoprank.store.events import Impression, SqliteEventStore


def _sessions(rng: np.random.Generator, users: int, ctr: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Per-user impressions and clicks with user-level heterogeneity: clicks of one user are correlated."""
    impressions = rng.integers(1, 40, size=users)
    propensity = rng.beta(2, 2 / ctr - 2, size=users)
    return rng.binomial(impressions, propensity).astype(float), impressions.astype(float)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_welch_matches_scipy_and_statsmodels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.exponential(3.0, 150), rng.exponential(3.5, 90) + rng.normal(0, 2, 90)
    effect = welch("revenue_per_user", a, b)
    reference = stats.ttest_ind(b, a, equal_var=False)
    assert effect.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    interval = reference.confidence_interval(0.95)
    assert (effect.low, effect.high) == (pytest.approx(interval.low), pytest.approx(interval.high))
    means = CompareMeans(DescrStatsW(b), DescrStatsW(a))
    low, high = means.tconfint_diff(alpha=0.05, usevar="unequal")
    assert (effect.low, effect.high) == (pytest.approx(low), pytest.approx(high))
    assert effect.p_value == pytest.approx(means.ttest_ind(usevar="unequal")[1])
    assert effect.difference == pytest.approx(b.mean() - a.mean())


def test_missing_figures_say_why_instead_of_dividing_by_zero() -> None:
    assert welch("x", [], [1.0, 2.0]).missing.startswith("needs at least 2 users")
    flat = welch("x", [0.0, 0.0, 0.0], [0.0, 0.0])
    assert flat.difference == 0.0 and flat.p_value is None and "no variation" in flat.missing
    zero_control = welch("x", [0.0, 0.0, 0.0], [0.0, 1.0, 1.0])
    assert zero_control.p_value is not None and zero_control.relative is None
    assert "control value is 0" in zero_control.missing
    no_impressions = delta_ratio("ctr", [0, 0], [0, 0], [1, 2], [3, 4])
    assert no_impressions.p_value is None and "denominator" in no_impressions.missing
    assert linearize([], []) is None
    no_history = cuped("x", [1.0, 0.0, 1.0], [0, 0, 0], [0.0, 0.0, 1.0], [0, 0, 0])
    assert no_history.p_value == pytest.approx(welch("x", [1.0, 0.0, 1.0], [0.0, 0.0, 1.0]).p_value)
    assert "pre-experiment" in no_history.missing


def test_linearised_ratio_has_the_ratio_as_mean_and_the_delta_method_variance() -> None:
    clicks, impressions = _sessions(np.random.default_rng(3), 500)
    values = linearize(clicks, impressions)
    ratio = clicks.sum() / impressions.sum()
    assert values.mean() == pytest.approx(ratio)
    mean_n, mean_d = clicks.mean(), impressions.mean()
    covariance = np.cov(clicks, impressions)
    delta_variance = (covariance[0, 0] / mean_d**2 - 2 * mean_n * covariance[0, 1] / mean_d**3
                      + mean_n**2 * covariance[1, 1] / mean_d**4) / len(clicks)
    assert values.var(ddof=1) / len(values) == pytest.approx(delta_variance)


def test_delta_method_interval_agrees_with_a_user_level_bootstrap() -> None:
    rng = np.random.default_rng(4)
    clicks_a, impressions_a = _sessions(rng, 400)
    clicks_b, impressions_b = _sessions(rng, 400, ctr=0.12)
    effect = delta_ratio("ctr", clicks_a, impressions_a, clicks_b, impressions_b)
    draws = 2_000
    pick_a = rng.integers(0, 400, size=(draws, 400))
    pick_b = rng.integers(0, 400, size=(draws, 400))
    boot = (clicks_b[pick_b].sum(1) / impressions_b[pick_b].sum(1)
            - clicks_a[pick_a].sum(1) / impressions_a[pick_a].sum(1))
    assert effect.standard_error == pytest.approx(boot.std(ddof=1), rel=0.08)
    low, high = np.quantile(boot, [0.025, 0.975])
    width = effect.high - effect.low
    assert effect.low == pytest.approx(low, abs=0.08 * width) and effect.high == pytest.approx(high, abs=0.08 * width)
    # the per-impression interval ignores that a user's impressions move together: far too narrow here
    pooled = (clicks_a.sum() + clicks_b.sum()) / (impressions_a.sum() + impressions_b.sum())
    naive_se = math.sqrt(pooled * (1 - pooled) * (1 / impressions_a.sum() + 1 / impressions_b.sum()))
    assert naive_se < 0.8 * effect.standard_error


def test_delta_method_intervals_cover_the_true_difference() -> None:
    """Coverage over repeated A/A draws of correlated per-user data: the delta-method interval holds 95%."""
    rng = np.random.default_rng(5)
    covered = 0
    runs = 400
    for _ in range(runs):
        a, b = _sessions(rng, 300), _sessions(rng, 300)
        effect = delta_ratio("ctr", a[0], a[1], b[0], b[1])
        covered += effect.low <= 0.0 <= effect.high
    assert 0.92 <= covered / runs <= 0.98


def _cuped_experiment(rng: np.random.Generator, users: int, effect: float) -> tuple[np.ndarray, ...]:
    """Users with a lasting propensity: history and outcome share it; treatment adds ``effect``."""
    propensity = rng.gamma(2.0, 1.0, size=users)
    before = rng.poisson(propensity).astype(float)
    treated = rng.random(users) < 0.5
    after = rng.poisson(propensity).astype(float) + effect * treated
    return after[~treated], before[~treated], after[treated], before[treated]


def test_cuped_is_unbiased_and_narrower_on_a_known_effect() -> None:
    rng = np.random.default_rng(6)
    true_effect = 0.3
    plain, adjusted, covered = [], [], 0
    for _ in range(300):
        y_a, x_a, y_b, x_b = _cuped_experiment(rng, 400, true_effect)
        before_after = welch("m", y_a, y_b)
        result = cuped("m", y_a, x_a, y_b, x_b)
        plain.append((before_after.difference, before_after.high - before_after.low))
        adjusted.append((result.difference, result.high - result.low, result.variance_reduction))
        covered += result.low <= true_effect <= result.high
    plain_estimates, plain_widths = np.array(plain).T
    estimates, widths, reductions = np.array(adjusted).T
    assert estimates.mean() == pytest.approx(true_effect, abs=3 * estimates.std() / math.sqrt(len(estimates)))
    assert widths.mean() < 0.9 * plain_widths.mean()
    assert estimates.std() < plain_estimates.std()
    # variance reduction = corr(history, outcome)^2 = (var(propensity) / var(outcome))^2 = (2 / 4)^2 here
    assert reductions.mean() == pytest.approx(0.25, abs=0.04)
    assert 0.92 <= covered / 300 <= 0.98


def _shoppers_with_a_past(rng: np.random.Generator, users: int, effect: float) -> tuple[Any, ...]:
    """Shoppers with a lasting propensity to buy on a visit: their pre-period sessions (a few to a few dozen) and
    one visit in the experiment share it; treatment adds ``effect`` to the visit's chance of a purchase."""
    propensity = rng.beta(1.0, 2.0, size=users)
    sessions = rng.poisson(rng.gamma(2.0, 8.0, size=users)).astype(float)
    converted = rng.binomial(sessions.astype(int), propensity).astype(float)
    treated = rng.random(users) < 0.5
    bought = (rng.random(users) < propensity + effect * treated).astype(float)
    return propensity, sessions, converted, treated, bought


def _totals(**fields: np.ndarray) -> UserTotals:
    size = len(next(iter(fields.values())))
    return UserTotals(**{name: fields.get(name, np.zeros(size)) for name in UserTotals.__dataclass_fields__})


def _arm(totals: UserTotals, members: np.ndarray) -> UserTotals:
    return UserTotals(*(getattr(totals, name)[members] for name in UserTotals.__dataclass_fields__))


def test_cuped_from_the_pre_period_is_unbiased_and_cuts_variance_on_a_planted_effect() -> None:
    """Conversion per user, the covariate the share of each shopper's pre-period sessions that bought (a fifth have
    no pre-period): over repeats the mean CUPED estimate is the planted effect, its interval holds 95% and is
    narrower; the variance cut is what corr(covariate, outcome)^2 predicts."""
    rng = np.random.default_rng(11)
    planted, repeats, users = 0.05, 300, 800
    plain, adjusted, covered = [], [], 0
    for _ in range(repeats):
        _, sessions, converted, treated, bought = _shoppers_with_a_past(rng, users, planted)
        newcomers = rng.random(users) < 0.2  # no pre-period: their covariate sits at the mean
        sessions[newcomers] = converted[newcomers] = 0.0
        after = _totals(purchases=bought, sessions=np.ones(users), converted_sessions=bought)
        before = _totals(sessions=sessions, converted_sessions=converted)
        fixed, cut = metric_effects("conversion_per_user", _arm(after, ~treated), _arm(after, treated),
                                    _arm(before, ~treated), _arm(before, treated))
        plain.append((fixed.difference, fixed.high - fixed.low))
        adjusted.append((cut.difference, cut.high - cut.low, cut.variance_reduction))
        covered += cut.low <= planted <= cut.high
    plain_estimates, plain_widths = np.array(plain).T
    estimates, widths, reductions = np.array(adjusted).T
    assert estimates.mean() == pytest.approx(planted, abs=3 * estimates.std() / math.sqrt(repeats))
    assert 0.92 <= covered / repeats <= 0.98
    assert reductions.min() > 0.03 and reductions.mean() > 0.1 and widths.mean() < 0.95 * plain_widths.mean()
    assert estimates.std() < plain_estimates.std()


def test_report_takes_each_shoppers_pre_period_from_the_runs_log_and_the_live_store(tmp_path: Path) -> None:
    """The run's event log (its last 90 days: older sessions left out) and the live store's events between the log's
    end and the start, joined by pseudonym: the report counts the shoppers with a pre-period, cuts the variance of
    conversion per user, keeps the planted effect inside the CUPED interval, and its headline and verdict read that
    same estimate."""
    rng = np.random.default_rng(12)
    users, planted = 1200, 0.08
    _, sessions, converted, treated, bought = _shoppers_with_a_past(rng, users, planted)
    log_end = dt.datetime(2026, 2, 20, tzinfo=dt.timezone.utc)
    start = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
    rows: list[dict[str, Any]] = []
    for u in range(users):
        user = f"pseudo-{u:04d}"
        for s in range(int(sessions[u])):
            ts = log_end - dt.timedelta(days=float(rng.uniform(0, 80)))
            rows.append({"user_id": user, "session_id": f"{user}-{s}", "product_id": "P1", "ts": ts,
                         "event_type": "purchase" if s < converted[u] else "view", "quantity": None})
        if u % 2:  # an old purchase, before the pre-period: left out
            rows.append({"user_id": user, "session_id": f"{user}-old", "product_id": "P1", "event_type": "purchase",
                         "ts": log_end - dt.timedelta(days=200), "quantity": None})
    run_log = pa.Table.from_pylist(rows, schema=pa.schema([
        ("user_id", pa.string()), ("session_id", pa.string()), ("product_id", pa.string()),
        ("event_type", pa.string()), ("ts", pa.timestamp("us", tz="UTC")), ("quantity", pa.int32())]))
    pre_period = run_pre_period(run_log, {"P1": 20.0}, days=90.0)
    assert pre_period.until <= log_end and pre_period.since == pre_period.until - dt.timedelta(days=90)
    store = SqliteEventStore(tmp_path / "events.db")
    newcomers = [u for u in range(users) if sessions[u] == 0][:10]
    store.append([{"event_id": f"live-{u}", "user_id": f"pseudo-{u:04d}", "session_id": f"live-{u}",
                   "product_id": "P1", "event_type": "view", "ts": start - dt.timedelta(days=2)} for u in newcomers])
    impressions, events = [], []
    for u in range(users):
        user, request, ts = f"pseudo-{u:04d}", f"R{u}", start + dt.timedelta(seconds=u)
        impressions.append(Impression(request, user, "B" if treated[u] else "A", "P1", 1, ts))
        if bought[u]:
            events.append({"event_id": f"e{u}", "user_id": user, "session_id": f"S{u}", "product_id": "P1",
                           "event_type": "purchase", "ts": ts, "request_id": request})
    store.log_impressions(impressions)
    store.append(events)
    report = documented(ab_report(store, {"A": 0.5, "B": 0.5}, prices={"P1": 20.0}, pre_period=pre_period))
    section = report["user_level"]
    assert section["users_with_history"] == int((sessions > 0).sum()) + len(newcomers)
    assert "the run's event log" in section["pre_period"] and section["decision_metric"] == "conversion_per_user"
    conversion = section["metrics"]["conversion_per_user"]
    fixed, adjusted = conversion["fixed_horizon"], conversion["cuped"]
    assert conversion["estimate"] == "cuped" and adjusted["variance_reduction"] > 0.05
    assert adjusted["low"] <= planted <= adjusted["high"]
    assert adjusted["high"] - adjusted["low"] < fixed["high"] - fixed["low"]
    assert section["metrics"]["revenue_per_user"]["cuped"]["variance_reduction"] > 0.05
    assert "(CUPED-adjusted)" in section["verdict"]["rule"]
    headline = headline_markdown(report)
    assert headline.startswith(f"**Verdict: {section['verdict']['decision']}**")
    assert f"B - A {adjusted['difference']:+.4g} [{adjusted['low']:.4g}, {adjusted['high']:.4g}]" in headline
    assert f"{section['users_with_history']} shoppers with a pre-period" in headline
    alone = documented(ab_report(store, {"A": 0.5, "B": 0.5}, prices={"P1": 20.0}))["user_level"]
    assert alone["users_with_history"] == len(newcomers)  # without the run's log: the live store's few alone


def test_cuped_on_a_ratio_metric_narrows_its_delta_interval() -> None:
    rng = np.random.default_rng(7)
    users = 600
    taste = rng.beta(2, 14, size=users)
    views_before, views_after = rng.integers(5, 30, users), rng.integers(5, 30, users)
    clicks_before, clicks_after = rng.binomial(views_before, taste), rng.binomial(views_after, taste)
    arm = rng.random(users) < 0.5
    plain = delta_ratio("ctr", clicks_after[~arm], views_after[~arm], clicks_after[arm], views_after[arm])
    adjusted = cuped_ratio("ctr", clicks_after[~arm], views_after[~arm], clicks_before[~arm], views_before[~arm],
                           clicks_after[arm], views_after[arm], clicks_before[arm], views_before[arm])
    assert adjusted.method == "delta+cuped" and adjusted.variance_reduction > 0.2
    assert adjusted.standard_error < plain.standard_error


def test_sequential_test_holds_alpha_under_continuous_peeking() -> None:
    """A/A streams of per-user conversions, the mSPRT read after every 10 users per arm: about 5% ever reject."""
    rng = np.random.default_rng(8)
    experiments, users, look = 250, 400, 10
    rejected = ever_naive = 0
    for _ in range(experiments):
        a = (rng.random(users) < 0.3).astype(float)
        b = (rng.random(users) < 0.3).astype(float)
        crossed = naive = False
        for n in range(look, users + 1, look):
            effect = compare_means("conversion", a[:n], b[:n], normal=True)
            if effect.standard_error is None:
                continue
            tau = mixing_sd(effect.standard_error, n, n, planned_users_per_arm=users)
            crossed |= always_valid(effect.difference, effect.standard_error, tau).reject
            naive |= effect.p_value < 0.05
        rejected += crossed
        ever_naive += naive
    assert 0.02 <= rejected / experiments <= 0.08
    assert ever_naive / experiments > 0.15  # the fixed-horizon p-value, watched, is not a 5% test


def test_always_valid_interval_is_where_the_test_does_not_reject() -> None:
    result = always_valid(0.04, 0.01, 0.02)
    assert result.reject == (not result.low <= 0.0 <= result.high)
    edge = always_valid((result.high - result.low) / 2, 0.01, 0.02)  # an estimate a half-width from 0: on the edge
    assert edge.log_likelihood_ratio == pytest.approx(edge.log_threshold)
    ville = always_valid(0.04, 0.01, 0.02, horizon=False)
    assert ville.log_threshold == pytest.approx(math.log(20)) and ville.log_threshold > horizon_log_threshold()
    assert ville.high - ville.low > result.high - result.low


@pytest.mark.parametrize("effect_size,ratio", [(0.1, 1.0), (0.25, 1.0), (0.2, 2.0)])
def test_plan_matches_statsmodels_power(effect_size: float, ratio: float) -> None:
    reference = NormalIndPower().solve_power(effect_size=effect_size, alpha=0.05, power=0.8, ratio=ratio)
    assert users_per_arm(effect_size, 1.0, ratio=ratio) == math.ceil(reference)
    assert power(effect_size, 1.0, 500, ratio=ratio) == pytest.approx(
        NormalIndPower().power(effect_size, 500, 0.05, ratio=ratio))
    detectable = minimum_detectable_effect(1.0, 800, ratio=ratio)
    assert detectable == pytest.approx(NormalIndPower().solve_power(nobs1=800, alpha=0.05, power=0.8, ratio=ratio),
                                       rel=1e-5)
    conversion = plan(0.2, 0.4, relative_effect=0.1)
    assert conversion.minimum_detectable_effect == pytest.approx(0.02) and conversion.users_per_arm > 6_000
    with pytest.raises(ValueError, match="either"):
        plan(0.2, 0.4)


def documented(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` after checking it against the shape ``GET /ab/report`` documents (with the two fields the app
    adds), which forbids any field it does not name."""
    ABReport.model_validate({**report, "experiment": "default", "impressions_dropped": 0})
    return report


def test_report_user_level_section(tmp_path: Path) -> None:
    """Users with history before the start, sessions split by a gap, revenue from prices; the old keys stay."""
    store = SqliteEventStore(tmp_path / "events.db")
    start = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
    rng = np.random.default_rng(9)
    impressions, events, prices = [], [], {f"P{p}": 10.0 + p for p in range(5)}
    for u in range(60):
        user, variant = f"U{u}", "AB"[u % 2]
        keen = u % 3 == 0
        events.append({"event_id": f"h{u}", "user_id": user, "session_id": f"old-{u}", "product_id": "P1",
                       "event_type": "purchase" if keen else "view", "ts": start - dt.timedelta(days=3)})
        for visit in range(2):
            request = f"R{u}-{visit}"
            ts = start + dt.timedelta(hours=3 * visit, minutes=u)
            impressions += [Impression(request, user, variant, f"P{p}", p + 1, ts) for p in range(5)]
            if rng.random() < (0.6 if keen else 0.2) + (0.1 if variant == "B" else 0.0):
                events += [{"event_id": f"{request}-{k}", "user_id": user, "session_id": f"S{request}",
                            "product_id": "P2", "event_type": k, "ts": ts, "request_id": request,
                            "quantity": 3 if k == "purchase" and variant == "B" else None}
                           for k in ("click", "add_to_cart", "purchase")]
    store.log_impressions(impressions)
    store.append(events)
    report = ab_report(store, {"A": 0.5, "B": 0.5}, prices=prices, planned=PlannedSize(30, "a test"))
    assert {"variants", "lift", "sample_ratio", "side_by_side", "timeline"} <= set(report)
    documented(report)
    section = report["user_level"]
    assert section["experiment_start"] == start.isoformat() and section["users_with_history"] == 60
    a = section["variants"]["A"]
    assert a["users"] == 30 and a["sessions"] == 60  # two visits 3 hours apart: two sessions each
    purchases = report["variants"]["A"]["purchases"]
    assert a["revenue"] == pytest.approx(12.0 * purchases) and a["funnel_users"]["shown"] == 30
    # B's purchases name a quantity of 3, stored with them: three times the price each
    assert section["variants"]["B"]["revenue"] == pytest.approx(36.0 * report["variants"]["B"]["purchases"])
    conversion = section["metrics"]["conversion_per_user"]
    assert conversion["fixed_horizon"]["method"] == "welch" and conversion["always_valid"] is not None
    assert conversion["cuped"]["variance_reduction"] > 0.05  # buying before predicts buying again here
    assert section["metrics"]["ctr"]["fixed_horizon"]["method"] == "delta"
    assert section["past_planned_size"] and section["verdict"]["decision"] in ("ship B", "keep A")
    unpriced = documented(ab_report(store, {"A": 0.5, "B": 0.5}))["user_level"]
    assert unpriced["metrics"]["revenue_per_user"] == {"missing": "no product prices were given to the report"}
    assert unpriced["variants"]["A"]["revenue"] is None and unpriced["verdict"]["decision"] == "keep running"


def test_empty_store_report_has_a_user_level_section(tmp_path: Path) -> None:
    section = documented(ab_report(SqliteEventStore(tmp_path / "events.db"), {"A": 0.5, "B": 0.5}))["user_level"]
    assert section["variants"]["A"]["users"] == 0 and section["experiment_start"] is None
    assert section["metrics"]["ctr"]["fixed_horizon"]["missing"] and section["verdict"]["decision"] == "keep running"


def test_calibration_on_the_simulated_shop_is_fast_and_finds_the_better_arm() -> None:
    """A few experiments on the tiny shop: every test runs, the re-ranked arm converts more."""
    model = ShopModel.build(load_config("tiny", []).source.synthetic)
    result = calibration.calibrate(model, experiments=6, shoppers=240, look_every=40, pages_per_user=3)
    assert set(result.false_positives) == {key for key, _, _ in calibration.TESTS}
    assert result.ab_conversion_difference > 0 and result.seconds_per_experiment < 1.0
    assert "| user-level Welch, conversion per user | end |" in result.table()


def test_readout_markdown_shows_every_metric_and_the_verdict(tmp_path: Path) -> None:
    store = SqliteEventStore(tmp_path / "events.db")
    t0 = dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc)
    store.log_impressions([Impression(f"R{u}", f"U{u}", "AB"[u % 2], "P1", 1, t0) for u in range(40)])
    store.append([{"event_id": f"b{u}", "user_id": f"U{u}", "session_id": f"S{u}", "product_id": "P1",
                   "event_type": "purchase", "ts": t0, "request_id": f"R{u}"} for u in range(0, 40, 3)])
    report = ab_report(store, {"A": 0.5, "B": 0.5}, prices={"P1": 25.0})
    text = user_level_markdown(report["user_level"])
    assert "| conversion_per_user (welch) |" in text and "| ctr (delta) |" in text and "| A | 20 |" in text
    headline = headline_markdown(report)
    assert headline.startswith("**Verdict: keep running**") and "**Decision metric: conversion per user**" in headline
    assert "not CUPED-adjusted" in headline and "**Sample ratio:** users A 20, B 20" in headline
    unpriced = user_level_markdown(ab_report(store, {"A": 0.5, "B": 0.5})["user_level"])
    assert "revenue_per_user: no product prices were given to the report" in unpriced
