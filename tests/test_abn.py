"""Issue 40, part 4, must hold: a three-arm experiment on the tiny preset assigns, reports with Holm-adjusted
p-values and passes the sample-ratio test.

The ranked tiny run serves three variants: ``A`` its zero-shot retrieval baseline, ``B`` the hybrid (fine-tuned
encoder, every source, the XGBoost ranker) and ``C`` the collaborative strategy (the item-item model alone),
registered from B's run with ``shoprank variants register`` (nothing trained). Simulated shoppers go through the
router (never forced) and the report compares B and C with the control A. The Ray-free strategy tests are
``test_strategies.py``; the Holm and sample-ratio maths ``test_experiment.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from ray import serve

from conftest import App, deploy_app
from shoprank.cli import main
from shoprank.config import Config
from shoprank.data.synthetic import ShopSimulator
from shoprank.experiment.stats import SRM_ALPHA, holm
from shoprank.serving.variants import register_variants
from shoprank.store.run import Run
from shoprank.webui.simulate import simulate

SPLIT = {"A": 1.0, "B": 1.0, "C": 1.0}
SHOPPERS = 90


@pytest.fixture(scope="module")
def three_arms(ranked: tuple[Config, Run], serve_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    """The ranked tiny run deployed with three variants, C registered through the command a user runs."""
    config, run = ranked
    register_variants(config, run)  # A and B, as deploy_app does, so that C can be registered from B
    assert main(["variants", "register", "C", "--from-alias", "B", "--strategy", "collaborative", "--config", "tiny",
                 "--set", f"run.root={config.run.root}", "--set", f"run.name={run.name}"]) == 0
    served = deploy_app(ranked, serve_port, str(tmp_path_factory.mktemp("abn") / "events.sqlite"), "shoprank-abn",
                        "/abn", "serve.variants={A: A, B: B, C: C}", "serve.split={A: 1, B: 1, C: 1}")
    yield served
    served.http.close()
    serve.delete(served.name)


def test_a_three_arm_experiment_assigns_reports_with_holm_and_passes_the_sample_ratio_test(three_arms: App) -> None:
    app = three_arms
    variants = app.http.get("/variants").json()
    assert variants["control"] == "A" and variants["split"] == SPLIT
    assert {name: (v["encoder"], v["strategy"]) for name, v in variants["variants"].items()} == {
        "A": ("zero_shot", "retrieval"), "B": ("fine_tuned", "ranker"), "C": ("fine_tuned", "collaborative")}
    assert variants["variants"]["C"]["model"]["trees"] == 0  # no ranker loaded: the item-item model alone

    # the simulation drives every arm through the router (never forced)
    traffic = simulate(app.url, app.keys["client"], ShopSimulator(app.config.source.synthetic), SHOPPERS,
                       concurrency=4, seed=40)
    assert traffic.errors == [] and sum(traffic.arms.values()) == SHOPPERS
    assert set(traffic.arms) == {"A", "B", "C"} and min(traffic.arms.values()) >= SHOPPERS // 6, traffic.arms
    # sticky: the same shopper is answered by the same arm, request after request, search or recommendation
    for user, arm in list(traffic.arm_of.items())[:12]:
        for body, path in (({"user_id": user, "k": 5}, "/recommend"),
                           ({"user_id": user, "k": 5, "query": "shoes"}, "/search"),
                           ({"user_id": user, "k": 3}, "/recommend")):
            answer = app.post(path, body)
            assert answer.status_code == 200 and answer.json()["variant"] == arm and not answer.json()["forced"]

    # C answers from the item-item model: its terms alone, no encoder similarity
    forced = app.post("/recommend", {"user_id": next(iter(traffic.arm_of)), "k": 5, "variant": "C"}).json()
    assert forced["items"] and all(set(item["contributions"]) <= {"cf_score", "bm25", "popularity"}
                                   for item in forced["items"])

    report = app.report_once(lambda r: sum(v["users"] for v in r["variants"].values()) >= SHOPPERS)
    ratio = report["sample_ratio"]
    # a shopper counts once an answer showed them something (an empty answer is no impression)
    assert ratio["expected_share"] == SPLIT and sum(ratio["observed"].values()) >= 0.9 * SHOPPERS, ratio
    assert all(ratio["observed"][arm] <= traffic.arms[arm] for arm in SPLIT), (ratio, traffic.arms)
    assert ratio["p_value"] > SRM_ALPHA and not ratio["mismatch"], ratio
    compared = report["comparisons"]
    assert (compared["control"], compared["treatments"], compared["correction"]) == ("A", ["B", "C"], "holm")
    checked = 0
    for metric in compared["arms"]["B"]["metrics"]:
        entries = {arm: compared["arms"][arm]["metrics"][metric] for arm in ("B", "C")}
        if any("missing" in entry for entry in entries.values()):
            continue
        raw = {arm: entry[entry["estimate"]]["p_value"] for arm, entry in entries.items()}
        adjusted = {arm: entry["holm"]["p_value"] for arm, entry in entries.items()}
        assert adjusted == pytest.approx(holm(raw)), metric
        if None in raw.values():
            continue
        assert all(adjusted[arm] >= raw[arm] for arm in raw), metric
        first, second = sorted(raw, key=raw.get)
        assert adjusted[first] <= adjusted[second], metric  # Holm's step-down: monotone in the raw p-values
        assert adjusted[first] == pytest.approx(min(1.0, 2 * raw[first])), metric  # the first step: x (m = 2)
        checked += 1
    assert checked >= 3, compared["arms"]["B"]["metrics"].keys()
    verdict = report["user_level"]["verdict"]  # the experiment's verdict, read from the Holm-adjusted tests
    assert verdict == compared["verdict"] and verdict["decision"] in ("ship B", "ship C", "keep A", "keep running")
    assert "comparisons with A" in verdict["rule"], verdict
    offline: dict[str, Any] = report["offline"]
    assert offline["C"]["system"] is None and offline["C"]["note"].startswith("no offline figure")
    # the readout's planned size: B's predicted effect (C has no offline figure) at alpha split over two comparisons
    assert "the smallest predicted of 2 treatments" in report["user_level"]["planned_size_from"], \
        report["user_level"]["planned_size_from"]
