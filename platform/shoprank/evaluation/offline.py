"""The offline evaluation: four systems on the test split, for search and for recommendation.

The ``evaluate`` stage's body (its place in the pipeline: :mod:`shoprank.stages`).
Outputs, under the run: ``evaluation/offline.json``, ``offline.md`` and
``offline.png``: popularity, zero-shot retrieval, fine-tuned retrieval and fine-tuned
retrieval + ranker, scored by NDCG@10, Recall@10, MRR and catalogue coverage.

The zero-shot system is the dense source of retrieval alone (:func:`dense_top_k`), over the
pretrained encoder's catalogue embeddings that the embed stage wrote
(``embeddings/zero_shot_products``, the files variant A serves): the evaluation embeds no
product (only the test queries, with the pretrained encoder), and builds neither the other
candidate sources nor the features of a system that has no ranker.
The ranker's row is Serve's answer itself (:func:`served_top_k`): each test request goes through
:func:`shoprank.recsys.answer.answer_many`, the function a variant replica calls, so history, exclusions
(``policy.exclude``), candidate sources, features, booster, ties and the diversity cut
(``policy.diversity``) cannot differ between the figure and what ``/recommend`` shows.
What is relevant to a request is :func:`shoprank.ranker.dataset.relevance`, the
function the ranker's labels come from: the two can never disagree on what a good
answer was. Every system's top 10 is cut the way Serve cuts an answer, after the
diversity re-ranking (:mod:`shoprank.recsys.diversity`), so the figures are those of the lists a
shopper would see. Its strength (``policy.diversity.strength: auto``) is chosen here first, per task,
on the validation split (:func:`choose_diversity`) and recorded in the run for Serve. Beside NDCG@10,
each system's row gives the distinct brands and category leaves of its top 10 (mean per request),
and each task the ranker's (B's) per-request NDCG@10 difference to the zero-shot retrieval (A's) with
its 95% bootstrap interval. Last, the categorisation's top-1 and top-3 accuracy on the products held out of the
category loss (:mod:`shoprank.evaluation.categories`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from shoprank.config import Config
from shoprank.data.io import read_table
from shoprank.evaluation.categories import categorisation_figures
from shoprank.recsys.metrics import bootstrap_mean, catalog_coverage, mean_metrics, ndcg_at_k
from shoprank.recsys.context import ExclusionDecision, load_context
from shoprank.ranker.dataset import GRADES, build_requests, judgments, relevance
from shoprank.recsys.diversity import STRENGTHS, TASKS, DiverseTop, Diversity, DiversityDecision
from shoprank.ranker.stages import embed_queries
from shoprank.ranker.train import read_features
from shoprank.recsys.answer import Ranking, Retrieval, Retrieved, answer_many
from shoprank.recsys.booster import load_ranker
from shoprank.recsys.messages import Asked
from shoprank.recsys.retrieval import retrieve
from shoprank.store.run import Run, StageRecord

K = 10
ANSWERED_TOGETHER = 256
"""Requests ranked in one :func:`~shoprank.recsys.answer.answer_many` call (one booster call, bounded memory)."""


def top_k_of(frame: pd.DataFrame, score: str, mask: pd.Series | None = None,
             pick: DiverseTop | None = None) -> dict[str, list[str]]:
    """Each request's ``K`` products by ``score`` among the rows in ``mask`` (ties: product id), after ``pick``'s
    diversity re-ranking when given."""
    rows = frame if mask is None else frame[mask]
    rows = rows.sort_values(["request_id", score, "product_id"], ascending=[True, False, True])
    return {r: _cut(r, g["product_id"].tolist(), g[score].to_numpy(), pick)
            for r, g in rows.groupby("request_id", sort=False)}


def _cut(request_id: str, ordered: list[str], scores: Sequence[float], pick: DiverseTop | None) -> list[str]:
    return pick.top(request_id, ordered, scores, K) if pick is not None else ordered[:K]


def diverse_top(diversity: Diversity, run: Run, requests: pd.DataFrame) -> DiverseTop:
    """``diversity`` over ``run``'s catalogue, for ``requests``."""
    products = read_table(run, "data", "products", columns=["product_id", "brand", "category"])
    searches = requests[requests["kind"] == "search"]
    return DiverseTop(diversity, products, dict(zip(searches["request_id"], searches["query"])))


def dense_top_k(config: Config, run: Run, requests: pd.DataFrame, *, zero_shot: bool,
                pick: DiverseTop | None = None) -> dict[str, list[str]]:
    """Each request's ``K`` products of the dense source of :func:`~shoprank.recsys.retrieval.retrieve`, by cosine
    (ties: product id), with the run's fine-tuned encoder or the pretrained one (``zero_shot``), under ``pick``'s
    diversity rule when given.

    Retrieval itself (``dense_only``), without the other sources and the features of every candidate: the same
    lists as the dense rows of :func:`~shoprank.ranker.stages.feature_rows` ranked by ``cosine`` (a test compares
    them), in the driver. The demo's zero-shot rows took a pool of feature actors about 45 s.
    """
    context = load_context(config, run, zero_shot=zero_shot, encoder=False)
    ids = context.catalogue.stats.product_ids
    queries = requests["query"].dropna().unique().tolist()
    query_vectors = dict(zip(queries, embed_queries(config, run, queries, zero_shot=zero_shot)))
    ranked: dict[str, list[str]] = {}
    for request in requests.itertuples(index=False):
        query = request.query if isinstance(request.query, str) else None
        history = context.events.history(request.user_id, float(request.ts_s), config.features.history_events)
        candidates = retrieve(context, history, query, query_vectors.get(query), float(request.ts_s), dense_only=True)
        if len(candidates.rows):
            order = sorted(range(len(candidates.rows)), key=lambda i: (-candidates.cosine[i], ids[candidates.rows[i]]))
            ranked[request.request_id] = _cut(request.request_id, [ids[candidates.rows[i]] for i in order],
                                              candidates.cosine[order], pick)
    return ranked


class ServedAnswers:
    """Serve's ranker variant over a run, as a variant replica holds it: the run's context and booster, loaded
    once and asked for every split the evaluate stage needs (the validation split under each trial strength, then
    the test split)."""

    def __init__(self, config: Config, run: Run) -> None:
        self.config, self.run = config, run
        self.context = load_context(config, run, encoder=False)
        self.retrieval = Retrieval(self.context)
        self.booster = load_ranker(run.local_path("ranker", "model"))

    def ranking(self, diversity: Diversity | None = None) -> Ranking:
        """Serve's ranking under ``diversity`` (default: the run's, :meth:`Diversity.of`, as Serve reads it)."""
        return Ranking.served(self.config, self.context.catalogue.stats, "ranker", self.booster,
                              diversity if diversity is not None else Diversity.of(self.config, self.run),
                              self.context.catalogue.listing)

    def asked(self, requests: pd.DataFrame, k: int) -> tuple[list[Asked], dict[str, Any]]:
        """Each request as Serve is asked it (its user at its time, no live event), and the queries' vectors."""
        queries = requests["query"].dropna().unique().tolist()
        vectors = dict(zip(queries, embed_queries(self.config, self.run, queries, zero_shot=False)))
        asked = [Asked(r.user_id if isinstance(r.user_id, str) else None, [],
                       r.query if isinstance(r.query, str) else None, k, float(r.ts_s))
                 for r in requests.itertuples(index=False)]
        return asked, vectors

    def top_k(self, requests: pd.DataFrame, k: int = K, diversity: Diversity | None = None) -> dict[str, list[str]]:
        """Each request's top ``k``: :func:`served_top_k`."""
        ranking = self.ranking(diversity)
        asked, vectors = self.asked(requests, k)
        ranked: dict[str, list[str]] = {}
        for start in range(0, len(asked), ANSWERED_TOGETHER):
            batch = asked[start:start + ANSWERED_TOGETHER]
            ids = requests["request_id"].iloc[start:start + ANSWERED_TOGETHER]
            for request_id, answered in zip(ids, answer_many(self.retrieval, ranking, batch, vectors)):
                ranked[request_id] = [item.product_id for item in answered.items]
        return ranked

    def tops_under(self, requests: pd.DataFrame, trials: list[Diversity]) -> list[dict[str, list[str]]]:
        """:meth:`top_k` under each of ``trials``, the candidates retrieved and scored once
        (:meth:`~shoprank.recsys.answer.Ranking.tops_under`)."""
        ranking = self.ranking(trials[0])
        asked, vectors = self.asked(requests, K)
        ranked: list[dict[str, list[str]]] = [{} for _ in trials]
        for start in range(0, len(asked), ANSWERED_TOGETHER):
            retrieved: list[Retrieved] = [
                self.retrieval.retrieve(a.user_id, a.live, a.query,
                                        vectors.get(a.query) if a.query is not None else None, a.now_s)
                for a in asked[start:start + ANSWERED_TOGETHER]]
            ids = requests["request_id"].iloc[start:start + ANSWERED_TOGETHER]
            for found, tops in zip(ranked, ranking.tops_under(retrieved, K, trials)):
                found.update(zip(ids, tops))
        return ranked


def served_top_k(config: Config, run: Run, requests: pd.DataFrame, k: int = K,
                 diversity: Diversity | None = None) -> dict[str, list[str]]:
    """Each request's top ``k`` as Serve's ranker variant answers it: :func:`~shoprank.recsys.answer.answer_many`,
    the function a variant replica calls, over the run's context and ranker, for the request's user at its time.

    The history is the run's events of the user strictly before the request (``ts_s``), with no live event: what a
    replica holds of a shopper who sent none since the run's data. Retrieval, exclusions, features, booster, ties
    and the diversity re-ranking are Serve's own code, not a copy: asked for a time after the run's last event
    (Serve's clock), this gives ``/recommend``'s list, which a test checks over HTTP. ``diversity``: the
    re-ranking's strength (default: the run's, :meth:`Diversity.of`, as Serve reads it).
    """
    return ServedAnswers(config, run).top_k(requests, k, diversity)


def choose_diversity(config: Config, answers: ServedAnswers, requests: pd.DataFrame,
                     judged: dict[str, dict[str, int]]) -> DiversityDecision:
    """The re-ranking's strength per task (``policy.diversity.strength: auto``): each of :data:`STRENGTHS` on the
    validation split's requests through Serve's ranking, and per task the strongest whose NDCG@10 is at least
    ``1 - ndcg_tolerance`` times strength 0's (the undiversified list). A fixed strength is recorded as set."""
    setting = config.policy.diversity
    tolerance = setting.ndcg_tolerance
    if setting.strength != "auto":
        return DiversityDecision(dict.fromkeys(TASKS, float(setting.strength)), tolerance, {},
                                 dict.fromkeys(TASKS, "set in policy.diversity.strength"))
    validation = requests[requests["split"] == "validation"]
    qrels = qrels_of(validation, judged)
    base = Diversity.of(config)
    trials = [base.at(strength) for strength in STRENGTHS]
    pick = diverse_top(base, answers.run, validation)
    tops = answers.tops_under(validation, trials) if len(validation) else [{} for _ in trials]
    kinds = dict(zip(validation["request_id"], validation["kind"]))
    strength: dict[str, float] = {}
    scored: dict[str, list[dict[str, float]]] = {}
    reason: dict[str, str] = {}
    for kind in TASKS:
        kind_qrels = {r: rel for r, rel in qrels.items() if kinds.get(r) == kind}
        if not kind_qrels:
            strength[kind], reason[kind] = 0.0, "no validation request with a relevant product: none"
            continue
        scored[kind] = [{"strength": s, **_diversity_figures(top, kind_qrels, pick)} for s, top in zip(STRENGTHS, tops)]
        floor = (1 - tolerance) * scored[kind][0]["ndcg@10"]
        kept = [row for row in scored[kind] if row["ndcg@10"] >= floor]
        strength[kind] = max(row["strength"] for row in kept)
        chosen = next(row for row in kept if row["strength"] == strength[kind])
        reason[kind] = (f"validation NDCG@10 {chosen['ndcg@10']:.4f} against {scored[kind][0]['ndcg@10']:.4f} "
                        f"undiversified (tolerance {tolerance:.1%}); brands in the top 10 "
                        f"{chosen['brands@10']:.2f} against {scored[kind][0]['brands@10']:.2f}")
    return DiversityDecision(strength, tolerance, scored, reason)


def _diversity_figures(ranked: dict[str, list[str]], qrels: dict[str, dict[str, int]],
                       pick: DiverseTop) -> dict[str, float]:
    """Mean NDCG@10 of ``ranked`` over ``qrels``' requests and the mean distinct brands and categories of its lists."""
    lists = [ranked.get(r, []) for r in qrels]
    distinct = [pick.distinct(shown) for shown in lists] or [(0, 0)]
    return {"ndcg@10": mean_metrics(dict(zip(qrels, lists)), qrels, k=K)["ndcg@10"],
            "brands@10": sum(b for b, _ in distinct) / len(distinct),
            "categories@10": sum(c for _, c in distinct) / len(distinct)}


def qrels_of(requests: pd.DataFrame, judged: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """What was relevant to each request (:func:`~shoprank.ranker.dataset.relevance`, grade above 0);
    requests with nothing relevant are left out."""
    out = {}
    for request in requests.itertuples(index=False):
        query = request.query if isinstance(request.query, str) else None
        graded = relevance(query, request.engaged_ids, request.engaged_grades, judged)
        out[request.request_id] = {p: int(v) for p, v in graded.items() if v > 0}
    return {r: rel for r, rel in out.items() if rel}


def shoppers_covered(run: Run, requests: pd.DataFrame, qrels: dict[str, dict[str, int]]) -> dict[str, int]:
    """How many shoppers the recommendation figures cover (a test request with something relevant) of the shoppers
    with held-out engagements (a click, cart or purchase in the test split)."""
    events = read_table(run, "data", "events", columns=["user_id", "event_type", "split"]).to_pandas()
    held_out = events[(events["split"] == "test") & events["event_type"].isin(list(GRADES))]
    recommended = requests[(requests["kind"] == "recommend") & requests["request_id"].isin(qrels.keys())]
    return {"covered": int(recommended["user_id"].nunique()), "held_out": int(held_out["user_id"].nunique())}


def _score(ranked: dict[str, list[str]], qrels: dict[str, dict[str, int]], catalogue_size: int,
           pick: DiverseTop) -> dict[str, float]:
    runs = {r: ranked.get(r, []) for r in qrels}
    metrics = mean_metrics(runs, qrels, k=K)
    figures = _diversity_figures(runs, qrels, pick)
    metrics["brands@10"], metrics["categories@10"] = figures["brands@10"], figures["categories@10"]
    metrics["coverage"] = catalog_coverage(runs.values(), catalogue_size, k=K)
    metrics["requests"] = len(runs)
    return metrics


def paired_difference(system: dict[str, list[str]], other: dict[str, list[str]],
                      qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    """Mean per-request NDCG@10 of ``system`` minus ``other`` over ``qrels``' requests, with its 95% bootstrap
    interval."""
    delta = [ndcg_at_k(system.get(r, []), rel, K) - ndcg_at_k(other.get(r, []), rel, K) for r, rel in qrels.items()]
    mean, low, high = bootstrap_mean(delta)
    return {"ndcg@10": mean, "low": low, "high": high}


def evaluate_offline(config: Config, run: Run, record: StageRecord) -> None:
    """The evaluation table of the four systems on the test split, after choosing the diversity re-ranking's
    strength on the validation split (see the module docstring)."""
    every_split = build_requests(config, run)
    judged = judgments(run)
    answers = ServedAnswers(config, run)  # one context and booster for the validation trials and the test lists
    decision = choose_diversity(config, answers, every_split, judged)
    decision.save(run)
    diversity = Diversity.of(config, run)  # the decision read back as Serve reads it
    requests = every_split[every_split["split"] == "test"]
    tuned = read_features(run, "test")
    pick = diverse_top(diversity, run, requests)
    zero_shot = dense_top_k(config, run, requests, zero_shot=True, pick=pick)
    served = answers.top_k(requests, diversity=diversity)
    qrels = qrels_of(requests, judged)
    catalogue_size = int(run.manifest()["stages"]["embed"]["rows"]["products"])
    kinds = dict(zip(requests["request_id"], requests["kind"]))
    systems = {
        "popularity": lambda kind: top_k_of(tuned, "popularity", tuned["from_lexical"] == 1, pick)
        if kind == "search" else top_k_of(tuned, "popularity", tuned["from_popular"] == 1, pick),
        "retrieval (zero-shot encoder)": lambda kind: zero_shot,
        "retrieval (fine-tuned encoder)": lambda kind: top_k_of(tuned, "cosine", tuned["from_dense"] == 1, pick),
        "fine-tuned retrieval + ranker": lambda kind: served,
    }
    table: dict[str, dict[str, dict[str, float]]] = {}
    differences: dict[str, dict[str, float]] = {}
    coverage = shoppers_covered(run, requests, qrels)
    missing: dict[str, str] = {}
    for kind in TASKS:
        kind_qrels = {r: rel for r, rel in qrels.items() if kinds.get(r) == kind}
        if kind_qrels:
            table[kind] = {name: _score(system(kind), kind_qrels, catalogue_size, pick)
                           for name, system in systems.items()}
            differences[kind] = paired_difference(served, zero_shot, kind_qrels)
        else:
            missing[kind] = NO_FIGURES[kind]
            record.notes.append(f"{kind}: no figures, {NO_FIGURES[kind]}")
    exclusion = ExclusionDecision.load(run)
    categories = categorisation_figures(config, run)
    record.notes.extend(categories["notes"])
    with run.local_output("evaluation") as directory:
        write_evaluation(directory, table, differences, missing, coverage, exclusion, decision, categories)
    for kind, rows in table.items():
        record.metrics[f"{kind}/ranker_ndcg_gain_over_retrieval"] = round(
            rows["fine-tuned retrieval + ranker"]["ndcg@10"] - rows["retrieval (fine-tuned encoder)"]["ndcg@10"], 4
        )
    record.metrics["table"] = table
    record.metrics["b_minus_a"] = differences
    record.metrics["diversity_strength"] = decision.strength
    record.metrics["recommend/shoppers"] = coverage
    record.metrics["exclude_purchased"] = exclusion.exclude_purchased
    record.metrics["categories"] = {key: categories[key] for key in ("held_out", "rows")}


SYSTEMS = {
    "popularity": "the most engaged products before the cut-off (search: among BM25's candidates; "
                  "recommendation: the popular and trending candidates)",
    "retrieval (zero-shot encoder)": "the pretrained encoder's nearest products to the query or the user vector",
    "retrieval (fine-tuned encoder)": "the fine-tuned encoder's nearest products",
    "fine-tuned retrieval + ranker": "every candidate source of the fine-tuned run, ordered by the XGBoost ranker: "
                                     "Serve's own answer path (answer_many) for the request's user at its time",
}
"""What each row of the evaluation compares, written under its table."""
NO_FIGURES = {
    "search": "the test split has no search request with a relevant product (no judged query, no search with an "
              "engagement)",
    "recommend": "the test split has no browsing session with an engagement (no behaviour events)",
}


def write_evaluation(directory: Path, table: dict[str, dict[str, dict[str, Any]]],
                     differences: dict[str, dict[str, float]], missing: dict[str, str], coverage: dict[str, int],
                     exclusion: ExclusionDecision, diversity: DiversityDecision,
                     categories: dict[str, Any] | None = None) -> None:
    """``offline.json``, ``offline.md`` (one table, B - A with its interval, what the systems are, the shoppers the
    recommendation figures cover, why a task has no figures, the repeat purchases with the exclusion they decided,
    and the diversity strength with the validation figures it was chosen on) and ``offline.png`` (NDCG@10 bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    policy = {"exclude_purchased": exclusion.exclude_purchased, "setting": exclusion.setting,
              "reason": exclusion.reason, "repeat_share": exclusion.shares}
    (directory / "offline.json").write_text(json.dumps(
        {**table, "b_minus_a": differences, "no_figures": missing, "recommend_shoppers": coverage, "policy": policy,
         "diversity": diversity.as_dict(), "categories": categories or {}}, indent=2))
    columns = ["ndcg@10", "brands@10", "categories@10", "recall@10", "mrr", "coverage", "requests"]
    lines = ["| task | system | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for kind, rows in table.items():
        for name, metrics in rows.items():
            cells = [str(metrics[c]) if c == "requests" else f"{metrics[c]:.2f}" if c in ("brands@10", "categories@10")
                     else f"{metrics[c]:.4f}" for c in columns]
            lines.append(f"| {kind} | {name} | " + " | ".join(cells) + " |")
    lines += [""] + [f"B - A, {kind}: NDCG@10 {d['ndcg@10']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] (ranker minus "
                     "zero-shot retrieval, per-request differences, 95% bootstrap interval)"
                     for kind, d in differences.items()]
    lines += ["", "Systems (test split, NDCG@10 over requests with a relevant product; brands@10 and categories@10: "
              "distinct brands and category leaves in the top 10, mean per request):"]
    lines += [f"- {name}: {meaning}" for name, meaning in SYSTEMS.items()]
    lines += [f"- {kind}: no figures, {reason}" for kind, reason in missing.items()]
    lines += ["", f"Recommendation figures cover {coverage['covered']} of the {coverage['held_out']} shoppers with "
              "held-out engagements (a click, cart or purchase in the test split)."]
    shares = "; ".join(f"{split} {s['repeat_share']:.1%} of {s['purchases']}" for split, s in exclusion.shares.items())
    lines += ["", f"Repeat purchases (products the shopper had bought before): {shares}. Recommendations "
              f"{'leave out' if exclusion.exclude_purchased else 'keep'} bought products "
              f"(policy.exclude.purchased {exclusion.setting}: {exclusion.reason})."]
    lines += ["", "Diversity re-ranking (maximal marginal relevance; every system's list): " + "; ".join(
        f"{kind} strength {strength:g} ({diversity.reason[kind]})" for kind, strength in diversity.strength.items())
        + "."]
    if categories and categories["rows"]:
        lines += ["", f"Categorisation, on the {categories['held_out']} products held out of the category loss, each "
                  "embedded without its category (what /categorize and a product put without one get):", "",
                  "| categoriser | top-1 | top-3 |", "|---|---|---|"]
        lines += [f"| {name} | {row['top1']:.4f} | {row['top3']:.4f} |" for name, row in categories["rows"].items()]
    (directory / "offline.md").write_text("\n".join(lines) + "\n")
    figure, axes = plt.subplots(1, max(1, len(table)), figsize=(6 * max(1, len(table)), 4), squeeze=False)
    for axis, (kind, rows) in zip(axes[0], table.items()):
        names = list(rows)
        axis.barh(names, [rows[n]["ndcg@10"] for n in names], color=["#999", "#9bd", "#48c", "#d62"][: len(names)])
        axis.set_title(f"{kind}: NDCG@10 on the test split")
        axis.invert_yaxis()
    figure.tight_layout()
    figure.savefig(directory / "offline.png", dpi=100)
    plt.close(figure)
