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
answer was. Every system's top 10 is cut the way Serve cuts an answer, under the
diversity rule (:mod:`shoprank.recsys.diversity`: at most ``policy.diversity.max_per_brand`` of a
brand, and on recommendations ``policy.diversity.max_per_category`` of a category leaf), so the
figures are those of the lists a shopper would see.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from shoprank.config import Config
from shoprank.data.io import read_table
from shoprank.recsys.metrics import catalog_coverage, mean_metrics
from shoprank.recsys.context import ExclusionDecision, load_context
from shoprank.ranker.dataset import GRADES, build_requests, judgments, relevance
from shoprank.recsys.diversity import DiverseTop, Diversity
from shoprank.ranker.stages import embed_queries
from shoprank.ranker.train import read_features
from shoprank.recsys.answer import Ranking, Retrieval, answer_many
from shoprank.recsys.booster import load_ranker
from shoprank.recsys.messages import Asked
from shoprank.recsys.retrieval import retrieve
from shoprank.store.run import Run, StageRecord

K = 10
ANSWERED_TOGETHER = 256
"""Requests ranked in one :func:`~shoprank.recsys.answer.answer_many` call (one booster call, bounded memory)."""


def top_k_of(frame: pd.DataFrame, score: str, mask: pd.Series | None = None,
             pick: DiverseTop | None = None) -> dict[str, list[str]]:
    """Each request's ``K`` products by ``score`` among the rows in ``mask`` (ties: product id), under ``pick``'s
    diversity rule when given."""
    rows = frame if mask is None else frame[mask]
    rows = rows.sort_values(["request_id", score, "product_id"], ascending=[True, False, True])
    return {r: _cut(r, g["product_id"].tolist(), pick) for r, g in rows.groupby("request_id", sort=False)}


def _cut(request_id: str, ordered: list[str], pick: DiverseTop | None) -> list[str]:
    return pick.top(request_id, ordered, K) if pick is not None else ordered[:K]


def diverse_top(config: Config, run: Run, requests: pd.DataFrame) -> DiverseTop:
    """The diversity rule of ``config`` over ``run``'s catalogue, for ``requests``."""
    products = read_table(run, "data", "products", columns=["product_id", "brand", "category"])
    searches = requests[requests["kind"] == "search"]
    return DiverseTop(Diversity.of(config), products, dict(zip(searches["request_id"], searches["query"])))


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
            ranked[request.request_id] = _cut(request.request_id, [ids[candidates.rows[i]] for i in order], pick)
    return ranked


def served_top_k(config: Config, run: Run, requests: pd.DataFrame, k: int = K) -> dict[str, list[str]]:
    """Each request's top ``k`` as Serve's ranker variant answers it: :func:`~shoprank.recsys.answer.answer_many`,
    the function a variant replica calls, over the run's context and ranker, for the request's user at its time.

    The history is the run's events of the user strictly before the request (``ts_s``), with no live event: what a
    replica holds of a shopper who sent none since the run's data. Retrieval, exclusions, features, booster, ties
    and the diversity cut are Serve's own code, not a copy: asked for a time after the run's last event (Serve's
    clock), this gives ``/recommend``'s list, which a test checks over HTTP.
    """
    context = load_context(config, run, encoder=False)
    ranking = Ranking.served(config, context.catalogue.stats, "ranker", load_ranker(run.local_path("ranker", "model")))
    queries = requests["query"].dropna().unique().tolist()
    vectors = dict(zip(queries, embed_queries(config, run, queries, zero_shot=False)))
    asked = [Asked(r.user_id if isinstance(r.user_id, str) else None, [], r.query if isinstance(r.query, str) else None,
                   k, float(r.ts_s)) for r in requests.itertuples(index=False)]
    retrieval = Retrieval(context)
    ranked: dict[str, list[str]] = {}
    for start in range(0, len(asked), ANSWERED_TOGETHER):
        batch = asked[start:start + ANSWERED_TOGETHER]
        ids = requests["request_id"].iloc[start:start + ANSWERED_TOGETHER]
        for request_id, answered in zip(ids, answer_many(retrieval, ranking, batch, vectors)):
            ranked[request_id] = [item.product_id for item in answered.items]
    return ranked


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


def _score(ranked: dict[str, list[str]], qrels: dict[str, dict[str, int]], catalogue_size: int) -> dict[str, float]:
    runs = {r: ranked.get(r, []) for r in qrels}
    metrics = mean_metrics(runs, qrels, k=K)
    metrics["coverage"] = catalog_coverage(runs.values(), catalogue_size, k=K)
    metrics["requests"] = len(runs)
    return metrics


def evaluate_offline(config: Config, run: Run, record: StageRecord) -> None:
    """The evaluation table of the four systems on the test split (see the module docstring)."""
    requests = build_requests(config, run)
    requests = requests[requests["split"] == "test"]
    tuned = read_features(run, "test")
    pick = diverse_top(config, run, requests)
    zero_shot = dense_top_k(config, run, requests, zero_shot=True, pick=pick)
    served = served_top_k(config, run, requests)
    qrels = qrels_of(requests, judgments(run))
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
    coverage = shoppers_covered(run, requests, qrels)
    missing: dict[str, str] = {}
    for kind in ("search", "recommend"):
        kind_qrels = {r: rel for r, rel in qrels.items() if kinds.get(r) == kind}
        if kind_qrels:
            table[kind] = {name: _score(system(kind), kind_qrels, catalogue_size) for name, system in systems.items()}
        else:
            missing[kind] = NO_FIGURES[kind]
            record.notes.append(f"{kind}: no figures, {NO_FIGURES[kind]}")
    exclusion = ExclusionDecision.load(run)
    with run.local_output("evaluation") as directory:
        write_evaluation(directory, table, missing, coverage, exclusion)
    for kind, rows in table.items():
        record.metrics[f"{kind}/ranker_ndcg_gain_over_retrieval"] = round(
            rows["fine-tuned retrieval + ranker"]["ndcg@10"] - rows["retrieval (fine-tuned encoder)"]["ndcg@10"], 4
        )
    record.metrics["table"] = table
    record.metrics["recommend/shoppers"] = coverage
    record.metrics["exclude_purchased"] = exclusion.exclude_purchased


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


def write_evaluation(directory: Path, table: dict[str, dict[str, dict[str, Any]]], missing: dict[str, str],
                     coverage: dict[str, int], exclusion: ExclusionDecision) -> None:
    """``offline.json``, ``offline.md`` (one table, what its systems are, the shoppers the recommendation figures
    cover, why a task has no figures, and the repeat purchases with the exclusion they decided) and
    ``offline.png`` (NDCG@10 bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    policy = {"exclude_purchased": exclusion.exclude_purchased, "setting": exclusion.setting,
              "reason": exclusion.reason, "repeat_share": exclusion.shares}
    (directory / "offline.json").write_text(json.dumps(
        {**table, "no_figures": missing, "recommend_shoppers": coverage, "policy": policy}, indent=2))
    columns = ["ndcg@10", "recall@10", "mrr", "coverage", "requests"]
    lines = ["| task | system | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for kind, rows in table.items():
        for name, metrics in rows.items():
            cells = [f"{metrics[c]:.4f}" if c != "requests" else str(metrics[c]) for c in columns]
            lines.append(f"| {kind} | {name} | " + " | ".join(cells) + " |")
    lines += ["", "Systems (test split, NDCG@10 over requests with a relevant product):"]
    lines += [f"- {name}: {meaning}" for name, meaning in SYSTEMS.items()]
    lines += [f"- {kind}: no figures, {reason}" for kind, reason in missing.items()]
    lines += ["", f"Recommendation figures cover {coverage['covered']} of the {coverage['held_out']} shoppers with "
              "held-out engagements (a click, cart or purchase in the test split)."]
    shares = "; ".join(f"{split} {s['repeat_share']:.1%} of {s['purchases']}" for split, s in exclusion.shares.items())
    lines += ["", f"Repeat purchases (products the shopper had bought before): {shares}. Recommendations "
              f"{'leave out' if exclusion.exclude_purchased else 'keep'} bought products "
              f"(policy.exclude.purchased {exclusion.setting}: {exclusion.reason})."]
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
