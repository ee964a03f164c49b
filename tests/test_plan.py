"""Sizing an experiment: the plan's maths, the effect the offline evaluation predicts, the simulation a plan asks of
the simulated shop, and ``shoprank experiment plan``; then simulated shoppers who come back over days, through the
real app, each visit a session of the A/B report."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from statsmodels.stats.power import NormalIndPower

from conftest import App, shoprank, tiny_config
from shoprank.config import Config
from shoprank.data.synthetic import ShopSimulator
from shoprank.errors import ShopRankError
from shoprank.experiment.plan import (CONTROL_SYSTEM, DEMO_CONVERSION_PER_USER, PASS_THROUGH, TREATMENT_SYSTEM,
                                      binary_sigma, evaluation_table, plan, planned_simulation, power,
                                      predicted_effect, readout_planned_size, sequential_width_factor,
                                      shoppers_for, simulation_size)
from shoprank.store.run import MANIFEST, Run
from shoprank.webui.simulate import simulate

ISSUE_37_DEMO = {
    "search": {"popularity": {"ndcg@10": 0.1863}, CONTROL_SYSTEM: {"ndcg@10": 0.2152},
               "retrieval (fine-tuned encoder)": {"ndcg@10": 0.2666}, TREATMENT_SYSTEM: {"ndcg@10": 0.2951}},
    "recommend": {"popularity": {"ndcg@10": 0.0272}, CONTROL_SYSTEM: {"ndcg@10": 0.0282},
                  "retrieval (fine-tuned encoder)": {"ndcg@10": 0.0242}, TREATMENT_SYSTEM: {"ndcg@10": 0.0247}},
}
"""The demo's offline NDCG@10 that issue 37 quotes (B loses recommendation, wins search)."""



def evaluated_run(root: Path, table: dict[str, Any]) -> Run:
    """The tiny preset's run under ``root`` with ``table`` as its evaluate stage's figures (its manifest's)."""
    config = tiny_config(root)
    run = Run.for_config(config)
    run.write_json({"run_id": run.name, "stages": {"evaluate": {"metrics": {"table": table}}}}, MANIFEST)
    return run


def test_the_issue_37_figures_plan_3070_per_arm_and_the_sequential_size_is_the_width_squared() -> None:
    result = plan(DEMO_CONVERSION_PER_USER, binary_sigma(DEMO_CONVERSION_PER_USER), relative_effect=0.066)
    assert result.users_per_arm == 3_070  # issue 37: conversion per user 0.54, +6.6%
    reference = NormalIndPower().solve_power(effect_size=0.066 * 0.54 / binary_sigma(0.54), alpha=0.05, power=0.8)
    assert result.users_per_arm == math.ceil(reference)
    factor = sequential_width_factor(0.05)
    assert 1.2 < factor < 2.0 and result.sequential_users_per_arm == math.ceil(3_070 * factor ** 2)


def test_the_predicted_effect_weighs_each_tasks_ndcg_change_by_its_traffic_and_the_pass_through() -> None:
    effect = predicted_effect(ISSUE_37_DEMO)
    search, recommend = 0.2951 / 0.2152 - 1, 0.0247 / 0.0282 - 1
    assert effect.ndcg_change == pytest.approx({"search": search, "recommend": recommend})
    assert effect.relative_effect == pytest.approx(PASS_THROUGH * (search + recommend) / 2)
    # the pass-through is the lower of the demo's two measurements (offline +12.4%, online +6.6%; +73.0%, +13.1%)
    assert effect.relative_effect < 0.066 and PASS_THROUGH * 0.730 == pytest.approx(0.131, abs=0.001)
    only_search = predicted_effect(ISSUE_37_DEMO, search_share=1.0, pass_through=1.0)
    assert only_search.relative_effect == pytest.approx(search) and only_search.shares == {"search": 1.0}
    judged_only = predicted_effect({"search": ISSUE_37_DEMO["search"]})  # no recommendation figures
    assert judged_only.shares == {"search": 1.0} and judged_only.relative_effect == pytest.approx(PASS_THROUGH * search)
    assert "search +37.1% (50% of traffic)" in effect.explain()
    zero_for_a = {**ISSUE_37_DEMO, "search": {CONTROL_SYSTEM: {"ndcg@10": 0.0}, TREATMENT_SYSTEM: {"ndcg@10": 0.1}}}
    recommend_only = predicted_effect(zero_for_a)  # no relative change from 0: the other task decides, and says so
    assert recommend_only.shares == {"recommend": 1.0} and "search left out" in recommend_only.explain()


@pytest.mark.parametrize("table,message", [
    ({}, "no figures to predict from"),
    ({"search": {CONTROL_SYSTEM: {"ndcg@10": 0.2}}}, f"no {TREATMENT_SYSTEM} row"),
    ({"search": {CONTROL_SYSTEM: {"ndcg@10": 0.0}, TREATMENT_SYSTEM: {"ndcg@10": 0.1}}},
     "search: A's offline NDCG@10 is 0, no relative change"),
    ({"search": {CONTROL_SYSTEM: {"ndcg@10": 0.2}, TREATMENT_SYSTEM: {"ndcg@10": 0.2}}}, "predicts no difference"),
])
def test_an_evaluation_that_predicts_nothing_says_why(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ShopRankError, match=re.escape(message)):
        predicted_effect(table)


def test_a_run_without_an_evaluation_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ShopRankError, match="has no offline evaluation.*--mde"):
        evaluation_table(Run.for_config(tiny_config(tmp_path)))
    assert evaluation_table(evaluated_run(tmp_path, ISSUE_37_DEMO)) == ISSUE_37_DEMO


@pytest.mark.parametrize("per_arm,arms", [(345, 2), (3_070, 2), (40, 3)])
def test_the_simulation_sends_enough_shoppers_that_every_arm_reaches_the_planned_size(per_arm: int,
                                                                                      arms: int) -> None:
    """The assignment hashes each shopper alone, so an arm's count is binomial: exactly the planned total leaves an
    arm short about half the time (the demo's 690 split 349/341 for 345 per arm), :func:`shoppers_for` about 1 in
    100 times."""
    rng = np.random.default_rng(37)

    def short_share(total: int) -> float:
        counts = rng.multinomial(total, [1 / arms] * arms, size=20_000)
        return float((counts.min(axis=1) < per_arm).mean())

    total = shoppers_for(per_arm, arms)
    assert short_share(per_arm * arms) > 0.4
    assert short_share(total) < 0.015 and short_share(total - 10) > short_share(total)
    assert total < per_arm * arms * 1.2 + 40  # a margin, not a second experiment


def test_a_shop_smaller_than_the_plan_sends_every_shopper_over_days_and_says_it_stops_short() -> None:
    result = plan(0.54, binary_sigma(0.54), relative_effect=0.066)
    short = simulation_size(result, 2_000)
    assert (short.needed, short.shoppers, short.visits) == (shoppers_for(3_070), 2_000, 4) == (6_346, 2_000, 4)
    assert short.power_reached == pytest.approx(power(result.minimum_detectable_effect, result.sigma, 1_000))
    assert 0.3 < short.power_reached < 0.4 and not short.reaches_plan
    assert "needs 6,346 shoppers and the shop has 2,000" in short.explain()
    assert "power for the planned effect is 36%" in short.explain()
    enough = simulation_size(result, 50_000)
    assert (enough.shoppers, enough.visits, enough.reaches_plan) == (6_346, 1, True)
    assert enough.power_reached > 0.8
    tiny_shop = simulation_size(result, 120)
    assert tiny_shop.visits == 7  # a week at most, however small the shop


def test_the_readouts_planned_size_is_the_plan_for_the_served_variants_figures() -> None:
    """Unset, ``serve.planned_users_per_arm`` is the plan ``shoprank experiment plan`` prints for the served
    variants' offline NDCG@10 (so the demo's readout stops where its default simulation does); set, it is the shop's
    own; where no plan can be made, the default 1,000 and why."""
    serve = tiny_config("/tmp/unused").serve
    offline = {name: {"ndcg@10": {task: rows[system]["ndcg@10"] for task, rows in ISSUE_37_DEMO.items()}}
               for name, system in (("A", CONTROL_SYSTEM), ("B", TREATMENT_SYSTEM))}
    planned = readout_planned_size(serve, offline)
    expected = plan(0.54, binary_sigma(0.54), relative_effect=predicted_effect(ISSUE_37_DEMO).relative_effect)
    assert planned.users_per_arm == expected.users_per_arm and "+2.2% predicted" in planned.source
    own = readout_planned_size(serve.model_copy(update={"planned_users_per_arm": 500}), offline)
    assert (own.users_per_arm, own.source) == (500, "serve.planned_users_per_arm")
    revenue = readout_planned_size(serve.model_copy(update={"decision_metric": "revenue_per_user"}), offline)
    assert revenue.users_per_arm == 1_000 and "--metric revenue_per_user --baseline" in revenue.source
    unevaluated = readout_planned_size(serve, {"A": {"ndcg@10": {}}, "B": {"ndcg@10": {}}})
    assert unevaluated.users_per_arm == 1_000 and "no figures to predict from" in unevaluated.source


@pytest.mark.parametrize("arms", [2, 3, 5])
def test_an_n_arm_plan_splits_alpha_by_bonferroni_over_the_comparisons(arms: int) -> None:
    """Issue 40: each of the ``arms - 1`` comparisons with the control sized at alpha / (arms - 1), Holm's worst case
    (statsmodels' NormalIndPower at that level gives the same size); every arm needs those users."""
    result = plan(0.54, binary_sigma(0.54), relative_effect=0.066, arms=arms)
    reference = NormalIndPower().solve_power(effect_size=0.066 * 0.54 / binary_sigma(0.54), alpha=0.05 / (arms - 1),
                                             power=0.8)
    assert result.users_per_arm == math.ceil(reference) and result.alpha == pytest.approx(0.05 / (arms - 1))
    assert result.total_users == arms * result.users_per_arm and result.arms == arms
    assert simulation_size(result, 100_000).needed == shoppers_for(result.users_per_arm, arms)
    with pytest.raises(ValueError, match="at least 2 arms"):
        plan(0.54, binary_sigma(0.54), relative_effect=0.066, arms=1)


def test_the_plan_command_sizes_an_n_arm_test_and_prints_the_total(capsys: pytest.CaptureFixture[str]) -> None:
    status, out = shoprank(["experiment", "plan", "--baseline", "0.54", "--mde", "0.066", "--arms", "3"], capsys)
    expected = plan(0.54, binary_sigma(0.54), relative_effect=0.066, arms=3)
    assert status == 0, out
    assert "alpha 0.025 per comparison (two-sided): 0.05 split by Bonferroni over the 2 comparisons" in out
    assert f"users per arm: {expected.users_per_arm:,} (all 3 arms: {3 * expected.users_per_arm:,})" in out
    assert f"total: {3 * expected.users_per_arm:,} users" in out
    status, out = shoprank(["experiment", "plan", "--baseline", "0.54", "--mde", "0.066", "--arms", "1"], capsys)
    assert status == 2 and "--arms 1: an experiment has at least 2 arms" in out, out


def test_the_readouts_planned_size_over_three_variants_plans_the_smallest_effect_at_the_split_alpha() -> None:
    serve = tiny_config("/tmp/unused", "serve.variants={A: A, B: B, C: C}", "serve.split={A: 1, B: 1, C: 1}").serve
    demo = {name: {"ndcg@10": {task: rows[system]["ndcg@10"] for task, rows in ISSUE_37_DEMO.items()}}
            for name, system in (("A", CONTROL_SYSTEM), ("B", TREATMENT_SYSTEM))}
    offline = {**demo, "C": {"ndcg@10": {"search": 0.5, "recommend": 0.05}}}
    planned = readout_planned_size(serve, offline)
    expected = plan(0.54, binary_sigma(0.54), relative_effect=predicted_effect(ISSUE_37_DEMO).relative_effect,
                    arms=3)
    assert planned.users_per_arm == expected.users_per_arm and "by B's offline NDCG@10 over A's" in planned.source
    assert "the smallest predicted of 2 treatments" in planned.source
    without_c = readout_planned_size(serve, {**demo, "C": {"ndcg@10": {}}})  # a collaborative arm: no figure
    assert without_c.users_per_arm == expected.users_per_arm and "C: the offline evaluation has no figures" in \
        without_c.source


def test_the_plan_command_reads_the_runs_predicted_effect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    evaluated_run(tmp_path, ISSUE_37_DEMO)
    status, out = shoprank(["experiment", "plan", "--config", "tiny", "--set", f"run.root={tmp_path}"], capsys)
    assert status == 0, out
    expected = plan(0.54, binary_sigma(0.54), relative_effect=predicted_effect(ISSUE_37_DEMO).relative_effect)
    assert "decision metric: conversion_per_user" in out and "predicted effect +2.22%" in out
    assert f"users per arm: {expected.users_per_arm:,}" in out
    assert f"about {expected.sequential_users_per_arm:,} users per arm" in out
    assert "It stops short of the plan" in out and "the shop has 120" in out  # the tiny shop's 120 shoppers
    config = tiny_config(tmp_path)
    assert planned_simulation(config)[2] == simulation_size(expected, 120)


@pytest.mark.parametrize("argv,message", [
    (["--config", "tiny", "--set", "run.root={root}"], "has no offline evaluation"),
    (["--metric", "revenue_per_user", "--mde", "0.1"], "needs --baseline and --std"),
    (["--metric", "clicks", "--mde", "0.1"], "none of the readout's user-level metrics"),
    (["--mde", "0.1", "--users", "10"], "not allowed with argument"),
    (["--baseline", "1.5", "--mde", "0.1"], "cannot plan: a rate must be strictly between 0 and 1"),
    (["--mde", "0.1", "--power", "1.2"], "cannot plan: power must be between"),
])
def test_the_plan_command_refuses_what_it_cannot_plan(argv: list[str], message: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    status, out = shoprank(["experiment", "plan", *(a.format(root=tmp_path) for a in argv)], capsys)
    assert status == 2 and message in out and "Traceback" not in out, out


def test_the_plan_command_still_sizes_a_given_effect(capsys: pytest.CaptureFixture[str]) -> None:
    status, out = shoprank(["experiment", "plan", "--baseline", "0.54", "--mde", "0.066"], capsys)
    assert status == 0 and "users per arm: 3,070 (both arms: 6,140)" in out, out
    status, out = shoprank(["experiment", "plan", "--metric", "revenue_per_user", "--baseline", "12.5", "--std", "30",
                            "--users", "1000"], capsys)
    assert status == 0 and "minimum detectable effect: 3.759 (30.07% of the baseline)" in out, out


def test_the_apps_readout_stops_at_the_size_shoprank_simulate_sends_by_default(app: App) -> None:
    """One plan for the simulation and the readout: the app's planned size is ``planned_simulation``'s users per arm,
    and the simulation it sends by default reaches it in each arm."""
    result, _, size = planned_simulation(app.config)
    section = app.http.get("/ab/report").json()["user_level"]
    assert section["planned_users_per_arm"] == result.users_per_arm
    assert section["planned_size_from"].startswith("shoprank experiment plan: ")
    assert size.needed == shoppers_for(result.users_per_arm) > 2 * result.users_per_arm


def test_returning_shoppers_come_back_on_later_days_each_visit_a_session_of_the_report(app: App) -> None:
    """Three visits of each of six shoppers, a simulated day apart, through the real app in seconds of wall time:
    the report counts each visit as a session (a gap over 30 minutes between them), which it could not when every
    visit landed in the same minutes of the app's clock."""
    simulator = ShopSimulator(app.config.source.synthetic)
    before = app.http.get("/ab/report").json()["user_level"]["variants"]
    clock = app.http.get("/healthz").json()["clock"]
    traffic = simulate(app.url, app.keys["client"], simulator, 6, visits=3, concurrency=3, seed=37)
    assert (traffic.shoppers, traffic.visits, traffic.errors) == (6, 18, []) and traffic.requests >= 18

    def sessions_of(report: dict[str, Any]) -> int:
        return sum(report["user_level"]["variants"][v]["sessions"] - before.get(v, {}).get("sessions", 0)
                   for v in ("A", "B"))

    report = app.report_once(lambda report: sessions_of(report) >= 18)
    assert sessions_of(report) == 18  # six shoppers x three visits, each visit one session
    assert max(point["ts"] for point in report["timeline"]) > clock + 2 * 86_400, "the third visits, two days on"


def test_visits_dated_past_serve_simulated_days_are_refused_naming_the_setting(app: App) -> None:
    far = app.post("/recommend", {"user_id": "U000001", "k": 3, "ts": "2999-01-01T00:00:00Z"})
    assert far.status_code == 422 and far.json()["detail"][0]["loc"] == ["body", "ts"], far.text
    assert "serve.simulated_days" in far.text


def test_the_trained_tiny_run_plans_from_its_own_evaluation(ranked: tuple[Config, Run]) -> None:
    config, run = ranked
    table = evaluation_table(run)
    result, effect, size = planned_simulation(config)
    assert effect == predicted_effect(table) and set(effect.ndcg_change) <= {"search", "recommend"}
    assert size == simulation_size(result, config.source.synthetic.num_users)
    assert size.visits + 1 <= config.serve.simulated_days  # the preset lets the app take every planned visit


def test_shoprank_simulate_sends_returning_shoppers_and_says_what_it_sent(app: App,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    settings = ["--config", "tiny", "--set", f"run.root={app.config.run.root}", "--serve-url", app.url]
    status, out = shoprank(["simulate", *settings, "--users", "3", "--visits", "2", "--seed", "8"], capsys)
    assert status == 0 and "3 shoppers, 6 visits" in out and "failed" not in out, out
    status, out = shoprank(["simulate", *settings, "--set", "serve.simulated_days=2", "--users", "3", "--visits", "2"],
                           capsys)
    assert status == 2 and "need serve.simulated_days of at least 3" in out, out
    status, out = shoprank(["simulate", *settings, "--users", "100000"], capsys)
    assert status == 2 and "the simulated shop has 120 shoppers" in out and "Traceback" not in out, out


def test_the_pages_simulate_control_defaults_to_the_planned_size() -> None:
    import gradio as gr

    from shoprank.webui.page import build_page

    size = simulation_size(plan(0.54, binary_sigma(0.54), relative_effect=0.066), 2_000)
    page = build_page("http://127.0.0.1:9", {"client": "c", "admin": "a"}, planned=size)
    numbers = {block.label: block.value for block in page.blocks.values() if isinstance(block, gr.Number)}
    assert numbers == {"Simulated shoppers": 2_000, "Visits each (a day apart)": 4}
    notes = [block.value for block in page.blocks.values() if isinstance(block, gr.Markdown)]
    assert any("needs 6,346 shoppers and the shop has 2,000" in (note or "") for note in notes)
