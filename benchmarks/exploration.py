"""A fair first chance for new products: exploration slots measured on the simulated shop.

    .venv/bin/python benchmarks/exploration.py --config demo            # the demo run (runs/demo), ranked
    .venv/bin/python benchmarks/exploration.py --config demo --set run.root=/elsewhere --visits 3000

Shoppers of the run's simulated shop (:class:`shoprank.data.synthetic.ShopSimulator`) arrive one visit at a time,
each a search (the shop's ``search_fraction``, a query of their intent) or a recommendation, answered by the run's
variant B (fine-tuned encoder and ranker, the run's diversity) in process on the request path Serve's replica runs
(:func:`shoprank.recsys.answer.answer_many`). After ``--put-after`` of the visits, ``--new-products`` products are
put into the live catalogue (:meth:`VariantPipeline.apply_catalogue`, the catalogue change log's path): half
appealing (hidden quality +1.5), half dull (-1.5), which the ranker cannot tell apart (it has no behaviour on
either). The simulator's shoppers click on what they are shown; clicks, carts and purchases go back to the
variant as live events and the impressions and clicks to the arm's exposure counts
(:class:`shoprank.recsys.explore.ExposureCounts`).

Arms, with common random numbers (each visit's shopper, query and examination and click draws are the same in
every arm, so the arms differ only by what they showed): no exploration (the offline path), the config's
recommendation slots (``serve.explore``, search off), and the same with one search slot too. Reported over the
visits after the put: impressions and clicks of the new products (appealing and dull), the share of new products
shown at least once, CTR of every item and of the items the ranker placed (not explored), and NDCG@10 per visit
(search: the simulator's graded relevance, exponential gain; recommendation: each product's click probability
when examined, linear gain; the ideal over the whole listed catalogue) with its 95% bootstrap interval and the
paired difference against no exploration. The search NDCG of the arm without search slots moves a little too:
its shoppers clicked explored products, and those clicks are in their histories. Nothing is judged; times are not
measured.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from shoprank.config import Config, ExploreConfig, load_config  # noqa: E402
from shoprank.data.synthetic import PRODUCT_CHUNK, ShopModel, ShopSimulator, product_id, render_products  # noqa: E402
from shoprank.privacy import serving_pseudonyms  # noqa: E402
from shoprank.recsys.answer import VariantPipeline, answer_many  # noqa: E402
from shoprank.recsys.booster import load_ranker  # noqa: E402
from shoprank.recsys.context import load_context  # noqa: E402
from shoprank.recsys.diversity import Diversity  # noqa: E402
from shoprank.recsys.explore import Exploration, ExposureCounts  # noqa: E402
from shoprank.recsys.messages import Asked, LiveEvent  # noqa: E402
from shoprank.recsys.metrics import bootstrap_mean, ndcg_at_k  # noqa: E402
from shoprank.store.events import CatalogueChange  # noqa: E402
from shoprank.store.run import Run  # noqa: E402

K = 10
APPEALING, DULL = 1.5, -1.5
"""The new products' hidden quality (the shop draws N(0, 1)): a 3-unit gap is 1.5 in every shopper's click logit."""
VISIT_GAP_S = 60.0
"""Data-clock time between two visits."""
NO_EXPLORATION = "no exploration"
log = logging.getLogger("bench")


@dataclass
class Arm:
    """One way of answering, with what it has seen: its shoppers' live events and its exposure counts."""

    name: str
    exploration: Exploration | None
    counts: ExposureCounts
    live: dict[str, list[LiveEvent]] = field(default_factory=dict)
    visits: list[dict[str, Any]] = field(default_factory=list)


def arms_of(config: Config, pipeline: VariantPipeline) -> list[Arm]:
    """No exploration; ``serve.explore`` on recommendations only; the same with search slots (one where the config
    has none)."""
    recommend = config.serve.explore.model_copy(update={"search_slots": 0})
    search = config.serve.explore.model_copy(update={"search_slots": max(config.serve.explore.search_slots, 1)})
    arms = [Arm(NO_EXPLORATION, None, ExposureCounts())]
    for name, explore in (("recommendation slots", recommend), ("recommendation + search slots", search)):
        ExploreConfig.model_validate(explore.model_dump())  # model_copy does not validate: positions for every slot
        counts = ExposureCounts()
        arms.append(Arm(name, Exploration(explore, pipeline.context, counts), counts))
    return arms


def new_product_changes(model: ShopModel, start: int, put_at_s: float) -> list[CatalogueChange]:
    """The put of every product numbered from ``start`` on, as the catalogue change log holds it (record rows)."""
    table = render_products(model.catalog, start, len(model.catalog))
    changes = []
    for seq, row in enumerate(table.to_pylist(), start=1):
        row["attributes"] = dict(row["attributes"] or [])
        changes.append(CatalogueChange(seq, "put", row["product_id"], row, put_at_s))
    return changes


def visit_gains(simulator: ShopSimulator, user: str, query: str | None, listed: list[str]) -> dict[str, float]:
    """Each listed product's gain for NDCG: graded relevance for a query, P(click | examined) otherwise."""
    grades = simulator.relevance(query, listed) if query is not None else None
    if grades is not None:
        return dict(zip(listed, map(float, grades)))
    return dict(zip(listed, simulator.click_probabilities(user, listed).tolist()))


def run_visits(args: argparse.Namespace, config: Config) -> dict[str, Any]:
    run = Run.for_config(config)
    shop = config.source.synthetic
    if config.source.kind != "synthetic":
        raise SystemExit(f"{run.uri()}: source.kind is {config.source.kind}; the measurement needs the simulated shop")
    started = time.monotonic()
    context = load_context(config, run, runtime=args.runtime)
    pipeline = VariantPipeline(context, "ranker", load_ranker(run.local_path("ranker", "model")),
                               Diversity.of(config, run))
    load_s = time.monotonic() - started
    base = ShopModel.build(shop)
    start = len(base.catalog)
    if start != len(context.catalogue.stats.product_ids):
        raise SystemExit(f"{run.uri()} holds {len(context.catalogue.stats.product_ids)} products, its config's "
                         f"shop {start}: pass the run's config")
    half = args.new_products // 2
    quality = np.array([APPEALING] * half + [DULL] * (args.new_products - half))
    model = base.with_new_products(quality)
    simulator = ShopSimulator(shop, model)
    new_ids = [product_id(i) for i in range(start, len(model.catalog))]
    is_new = set(new_ids)
    appealing = set(new_ids[:half])
    pseudonyms = serving_pseudonyms(config, [run.uri()])
    arms = arms_of(config, pipeline)
    activity = model.users.activity / model.users.activity.sum()
    users = simulator.user_ids
    put_visit = int(args.visits * args.put_after)
    clock_s = max(float(h.ts_s[-1]) for h in context.events.histories.values() if len(h)) + 3_600.0
    all_ids = [product_id(i) for i in range(start)]
    identical_before_put = True
    for visit in range(args.visits):
        now_s = clock_s + visit * VISIT_GAP_S
        if visit == put_visit:
            applied = pipeline.apply_catalogue(new_product_changes(model, start, now_s))
            log.info("visit %d: %s put live", visit, applied)
        if visit and visit % max(args.visits // 10, 1) == 0:
            log.info("visit %d of %d, %.0f s", visit, args.visits, time.monotonic() - started)
        rng = np.random.default_rng([args.seed, visit])
        user = users[int(rng.choice(len(users), p=activity))]
        query = simulator.query_for(user, rng) if rng.random() < shop.search_fraction else None
        shopper = pseudonyms.of(user)
        vectors = dict(zip([query], context.encode_queries([query]))) if query is not None else {}
        listed = all_ids + (new_ids if visit >= put_visit else [])
        gains = visit_gains(simulator, user, query, listed)
        answers = []
        for arm in arms:
            asked = Asked(shopper, list(arm.live.get(shopper, ())), query, K, now_s, request_id=f"visit-{visit}")
            items = answer_many(pipeline.retrieval, pipeline.ranking, [asked], vectors, arm.exploration)[0].items
            answers.append([item.product_id for item in items])
            outcome = simulator.respond(user, [item.product_id for item in items], np.random.default_rng(
                [args.seed, visit, 1]), query)
            clicked = set(outcome.clicked)
            for kind, products in (("click", outcome.clicked), ("add_to_cart", outcome.added_to_cart),
                                   ("purchase", outcome.purchased)):
                arm.live.setdefault(shopper, []).extend((p, kind, now_s) for p in products)
            arm.counts.add({item.product_id: 1 for item in items}, {p: 1 for p in clicked})
            if visit >= put_visit:
                arm.visits.append({
                    "task": "search" if query is not None else "recommend",
                    "ndcg": ndcg_at_k([item.product_id for item in items], gains, K,
                                      gain="exponential" if query is not None else "linear"),
                    "shown": len(items), "clicks": len(clicked),
                    "explored": sum(item.explored for item in items),
                    "explored_clicks": sum(item.explored and item.product_id in clicked for item in items),
                    "new_shown": [item.product_id for item in items if item.product_id in is_new],
                    "new_clicked": [p for p in clicked if p in is_new],
                })
        if visit < put_visit and any(a != answers[0] for a in answers[1:]):
            identical_before_put = False
    return {"arms": arms, "new_ids": new_ids, "appealing": appealing, "put_visit": put_visit,
            "identical_before_put": identical_before_put, "load_s": load_s, "run": run.uri()}


def arm_figures(arm: Arm, baseline: Arm, new_ids: list[str], appealing: set[str]) -> dict[str, Any]:
    visits = arm.visits
    shown = [p for v in visits for p in v["new_shown"]]
    clicked = [p for v in visits for p in v["new_clicked"]]
    impressions = sum(v["shown"] for v in visits)
    clicks = sum(v["clicks"] for v in visits)
    placed = impressions - sum(v["explored"] for v in visits)
    placed_clicks = clicks - sum(v["explored_clicks"] for v in visits)
    figures: dict[str, Any] = {
        "new_impressions": {"appealing": sum(p in appealing for p in shown),
                            "dull": sum(p not in appealing for p in shown)},
        "new_clicks": {"appealing": sum(p in appealing for p in clicked),
                       "dull": sum(p not in appealing for p in clicked)},
        "new_shown_at_least_once": len(set(shown)) / len(new_ids),
        "ctr": clicks / impressions if impressions else 0.0,
        "ctr_not_explored": placed_clicks / placed if placed else 0.0,
        "explored_share": 1.0 - placed / impressions if impressions else 0.0,
    }
    for task in ("search", "recommend"):
        mine = np.array([v["ndcg"] for v in visits if v["task"] == task])
        theirs = np.array([v["ndcg"] for v in baseline.visits if v["task"] == task])
        if not len(mine):
            continue
        figures[f"ndcg@10_{task}"] = bootstrap_mean(mine)
        figures[f"ndcg@10_{task}_minus_none"] = bootstrap_mean(mine - theirs)
        figures[f"visits_{task}"] = int(len(mine))
        shown = sum(v["shown"] for v in visits if v["task"] == task)
        figures[f"explored_share_{task}"] = sum(v["explored"] for v in visits if v["task"] == task) / shown
    return figures


def report(args: argparse.Namespace, config: Config, outcome: dict[str, Any], machine: dict[str, Any]) -> dict:
    arms: list[Arm] = outcome["arms"]
    figures = {arm.name: arm_figures(arm, arms[0], outcome["new_ids"], outcome["appealing"]) for arm in arms}
    explore = config.serve.explore
    rule = "=" * 118
    print(f"\n{rule}\nshoprank exploration: new products' first chance on the simulated shop "
          f"({machine['cpus']} CPUs, {machine['memory_gib']} GiB; in process, no Ray)")
    print(f"run {outcome['run']} (variant B: fine-tuned encoder + ranker), {args.visits} visits, {args.new_products} "
          f"new products put after visit {outcome['put_visit']} (half quality {APPEALING:+}, half {DULL:+}), seed "
          f"{args.seed}")
    print(f"serve.explore: recommendation slots at {explore.positions[:explore.recommend_slots]}, max_impressions "
          f"{explore.max_impressions}, prior_impressions {explore.prior_impressions}; the third arm adds search slots "
          f"at {explore.positions[:max(explore.search_slots, 1)]}; figures over the visits after the put\n{rule}")
    print(f"{'arm':<31} {'new impr. app/dull':>18} {'new clicks app/dull':>19} {'new shown':>9} {'CTR':>7} "
          f"{'CTR ranked':>10} {'NDCG@10 search':>15} {'NDCG@10 recommend':>18}")
    for name, f in figures.items():
        def ndcg(task: str) -> str:
            return f"{f[f'ndcg@10_{task}'][0]:.4f}" if f"ndcg@10_{task}" in f else "-"
        print(f"{name:<31} {f['new_impressions']['appealing']:>8}/{f['new_impressions']['dull']:<9} "
              f"{f['new_clicks']['appealing']:>9}/{f['new_clicks']['dull']:<9} {f['new_shown_at_least_once']:>9.0%} "
              f"{f['ctr']:>7.4f} {f['ctr_not_explored']:>10.4f} {ndcg('search'):>15} {ndcg('recommend'):>18}")
    print()
    for name, f in list(figures.items())[1:]:
        for task in ("search", "recommend"):
            if f"ndcg@10_{task}_minus_none" in f:
                mean, low, high = f[f"ndcg@10_{task}_minus_none"]
                print(f"{name}, NDCG@10 {task} minus no exploration: {mean:+.4f} [{low:+.4f}, {high:+.4f}] "
                      f"({f[f'visits_{task}']} visits)")
    print(f"answers before the put identical in every arm: {outcome['identical_before_put']}")
    print()
    return common.round_floats({
        "benchmark": "exploration", "run": outcome["run"], "visits": args.visits, "new_products": args.new_products,
        "put_after_visit": outcome["put_visit"], "seed": args.seed, "explore": explore.model_dump(),
        "identical_before_put": outcome["identical_before_put"], "context_load_s": outcome["load_s"],
        "arms": figures, "machine": machine,
    })


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config", default="demo", help="the ranked run's config (preset name or file)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--visits", type=int, default=2000, help="shopper visits, each answered by every arm")
    parser.add_argument("--new-products", type=int, default=40, help="products put live (half appealing)")
    parser.add_argument("--put-after", type=float, default=0.2, help="share of the visits before the put")
    parser.add_argument("--runtime", default="torch", choices=["torch", "onnx", "onnx-int8"],
                        help="the query and product encoder's runtime")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the JSON line to this file")
    args = parser.parse_args()
    if args.new_products < 2 or args.new_products > PRODUCT_CHUNK:
        parser.error(f"--new-products: 2 to {PRODUCT_CHUNK}")
    common.setup_logging()
    config = load_config(args.config, args.set)
    machine = common.machine()

    def benchmark(_: Path) -> dict[str, Any]:
        return report(args, config, run_visits(args, config), machine)

    return common.run_benchmark(benchmark, None, "exploration-", args.json)  # writes nothing: a scratch folder


if __name__ == "__main__":
    raise SystemExit(main())
