"""Training and evaluation examples for the encoder, built from a run's tables.

Kept free of Ray (like :mod:`shoprank.encoder.objectives`) so the Ray Train worker,
the plain PyTorch baselines in ``benchmarks/`` and a GPU machine without Ray all
build exactly the same examples and score them with exactly the same evaluation.

* **query -> product rows**: each training query's exact matches (grade 3, from
  judgments and from purchases after a search), at most
  ``max_positives_per_query``, each with ``hard_negatives`` labelled negatives of
  that query drawn from ``hard_negative_labels`` (any product when it has none);
* **co-engagement rows**: the most frequent "viewed/bought together" pairs, then
  **sequence rows**: each pair of consecutive engagements (clicks, carts, purchases)
  of one user's training history, so a shop with behaviour but no search log still
  teaches the encoder which products go together for one shopper;
* **evaluation data**: the whole catalogue, the split's judged queries with their
  graded labels (queries without any relevant product are left out), and the
  split's shoppers with a training history, each with what they engaged with next.

Which figure checkpoints and sweeps compare (``ndcg@k``) follows the data: search
over judged queries when the split has any, else next engagements from the user
vector (:func:`shoprank.encoder.users.user_embedding`, as recommendations use it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from sklearn.metrics import f1_score
from torch import nn

from shoprank.config import EncoderConfig
from shoprank.data.schema import ENGAGEMENT_TYPES
from shoprank.encoder.model import TextEncoder, encode
from shoprank.encoder.text import QUERY_MAX_LENGTH, product_texts
from shoprank.encoder.users import user_embedding
from shoprank.recsys.metrics import mean_metrics

CATEGORY_HOLDOUT = 0.1
"""Share of products (by a hash of their id) held out of the category loss to score it."""


def _unit(key: str, salt: str) -> float:
    return int.from_bytes(hashlib.blake2b(f"{salt}:{key}".encode(), digest_size=8).digest(), "big") / 2**64


def category_holdout(product_ids: list[str]) -> np.ndarray:
    """True for the products held out of the category loss (stable per id)."""
    return np.array([_unit(p, "category-holdout") < CATEGORY_HOLDOUT for p in product_ids])


@dataclass
class EvalData:
    """What rank 0 needs to evaluate: the catalogue, validation queries and their labels."""

    product_ids: list[str]
    product_texts: list[str]
    category_labels: list[int | None]
    """Each product's category label; None for a product without a category (left out of the category loss)."""
    holdout: list[bool]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    user_histories: dict[str, tuple[list[int], list[str], list[float]]]
    """User -> (catalogue rows, event types, ages in days at the split's start) of the training history."""
    user_qrels: dict[str, dict[str, int]]
    """User -> product -> best engagement grade in the split."""


ENGAGEMENT_GRADES = {"click": 1, "add_to_cart": 2, "purchase": 3}
NEXT_ITEMS = "next_items"
"""Prefix of the next-engagement figures in :func:`evaluate`'s result."""
DAY_S = 86_400.0


def _next_engagements(
    events: pa.Table, histories: pa.Table, row_of: dict[str, int], split: str
) -> tuple[dict[str, tuple[list[int], list[str], list[float]]], dict[str, dict[str, int]]]:
    """Shoppers with a training history and an engagement in ``split``: histories and what came next."""
    engaged = events.filter(pc.and_(pc.equal(events.column("split"), split),
                                    pc.is_in(events.column("event_type"), pa.array(sorted(ENGAGEMENT_TYPES)))))
    qrels: dict[str, dict[str, int]] = {}
    for user, product, kind in zip(engaged.column("user_id").to_pylist(), engaged.column("product_id").to_pylist(),
                                   engaged.column("event_type").to_pylist()):
        grade = ENGAGEMENT_GRADES.get(kind, 0)
        if grade and product in row_of:
            qrels.setdefault(user, {})[product] = max(grade, qrels.get(user, {}).get(product, 0))
    start_s = (pc.min(engaged.column("ts")).value / 1e6) if engaged.num_rows else 0.0
    out: dict[str, tuple[list[int], list[str], list[float]]] = {}
    for history in histories.to_pylist():
        if history["user_id"] not in qrels:
            continue
        keep = [i for i, p in enumerate(history["product_ids"]) if p in row_of]
        if keep:
            out[history["user_id"]] = (
                [row_of[history["product_ids"][i]] for i in keep], [history["event_types"][i] for i in keep],
                [max(0.0, start_s - history["ts"][i].timestamp()) / DAY_S for i in keep],
            )
    return out, {u: rel for u, rel in qrels.items() if u in out}


def eval_data(
    products: pa.Table, query_pairs: pa.Table, config: EncoderConfig, split: str,
    events: pa.Table | None = None, histories: pa.Table | None = None,
) -> EvalData:
    """The catalogue, ``split``'s judged queries (graded labels) and, given ``events`` (with ``split``) and the
    training ``histories``, its shoppers' next engagements; ready for :func:`evaluate`."""
    judged = query_pairs.filter(
        pc.and_(pc.equal(query_pairs.column("split"), split), pc.equal(query_pairs.column("source"), "judgment"))
    )
    qrels: dict[str, dict[str, int]] = {}
    for query, product, label in zip(
        judged.column("query").to_pylist(), judged.column("product_id").to_pylist(), judged.column("label").to_pylist()
    ):
        qrels.setdefault(query, {})[product] = max(label, qrels.get(query, {}).get(product, 0))
    qrels = {q: rel for q, rel in qrels.items() if any(v > 0 for v in rel.values())}
    ids = products.column("product_id").to_pylist()
    user_histories, user_qrels = (
        _next_engagements(events, histories, {p: i for i, p in enumerate(ids)}, split)
        if events is not None and histories is not None else ({}, {})
    )
    return EvalData(
        product_ids=ids,
        product_texts=product_texts(products, config),
        category_labels=products.column("category_label").to_pylist(),
        holdout=category_holdout(ids).tolist(),
        queries={q: q for q in qrels},
        qrels=qrels,
        user_histories=user_histories,
        user_qrels=user_qrels,
    )


def sequence_pairs(histories: pa.Table) -> pa.Table:
    """(product_a, product_b, sessions) of consecutive engagements in each user's history, counted over users."""
    counts: dict[tuple[str, str], int] = {}
    for products, kinds in zip(histories.column("product_ids").to_pylist(), histories.column("event_types").to_pylist()):
        engaged = [p for p, kind in zip(products, kinds) if kind in ENGAGEMENT_TYPES]
        for a, b in zip(engaged, engaged[1:]):
            if a != b:
                key = (min(a, b), max(a, b))
                counts[key] = counts.get(key, 0) + 1
    return pa.table({"product_a": pa.array([a for a, _ in counts], pa.string()),
                     "product_b": pa.array([b for _, b in counts], pa.string()),
                     "sessions": pa.array(list(counts.values()), pa.int64())})


def training_tables(
    products: pa.Table, query_pairs: pa.Table, coengagement: pa.Table, config: EncoderConfig,
    histories: pa.Table | None = None,
) -> tuple[pa.Table, pa.Table]:
    """(query-product rows, product-pair rows: co-engagement, then user sequences) as text, shuffled by the seed,
    ready to tokenize; each kind of pair keeps its ``max_coengagement_pairs`` most frequent."""
    train = config.train
    rng = np.random.default_rng(train.seed)
    ids = products.column("product_id").to_pylist()
    text_of = dict(zip(ids, product_texts(products, config)))
    label_of = dict(zip(ids, products.column("category_label").to_pylist()))
    held = dict(zip(ids, category_holdout(ids)))
    pairs = query_pairs.filter(pc.equal(query_pairs.column("split"), "train")).to_pylist()
    negative_labels = set(train.hard_negative_labels)
    positives: dict[str, list[str]] = {}
    negatives: dict[str, list[str]] = {}
    for row in pairs:
        if row["label"] == 3:
            positives.setdefault(row["query"], []).append(row["product_id"])
        elif row["source"] == "judgment" and row["label"] in negative_labels:
            negatives.setdefault(row["query"], []).append(row["product_id"])
    rows: dict[str, list[Any]] = {"query": [], "positive": [], "category": [], "negatives": []}
    for query in sorted(positives):
        chosen = list(dict.fromkeys(positives[query]))
        rng.shuffle(chosen)
        for product in chosen[: train.max_positives_per_query]:
            pool = negatives.get(query) or ids
            picks = [pool[int(i)] for i in rng.integers(0, len(pool), train.hard_negatives)]
            rows["query"].append(query)
            rows["positive"].append(text_of[product])
            label = label_of[product]
            rows["category"].append(-1 if held[product] or label is None else label)
            rows["negatives"].append([text_of[p] for p in picks])
    order = rng.permutation(len(rows["query"]))
    qp = pa.table({k: [v[i] for i in order] for k, v in rows.items()})
    kinds = [coengagement.select(["product_a", "product_b", "sessions"])]
    if histories is not None:
        kinds.append(sequence_pairs(histories))
    co = pa.concat_tables(
        [kind.sort_by([("sessions", "descending"), ("product_a", "ascending"), ("product_b", "ascending")])
         .slice(0, train.max_coengagement_pairs) for kind in kinds]
    )
    co = co.take(pa.array(rng.permutation(co.num_rows)))  # frequent pairs spread over every batch
    co_text = pa.table(
        {
            "anchor": [text_of[p] for p in co.column("product_a").to_pylist()],
            "other": [text_of[p] for p in co.column("product_b").to_pylist()],
        }
    )
    return qp, co_text


def evaluate(
    encoder: TextEncoder, head: nn.Module | None, tokenizer: Any, data: EvalData, max_length: int, k: int,
    device: torch.device | str, products: np.ndarray | None = None,
) -> dict[str, float]:
    """Query -> product retrieval over the whole catalogue, next engagements from the user vector (``next_items/``),
    and category accuracy / macro-F1; ``ndcg@k`` is the search figure, or the next-items one without judged queries
    (see the module docstring). A figure with nothing to average over is left out, never a mean of nothing.

    ``products``: the catalogue already embedded by ``encoder`` (the training loop keeps those vectors)."""
    if products is None:
        products = encode(encoder, tokenizer, data.product_texts, max_length, device=device)
    metrics: dict[str, float] = {}
    if data.qrels:
        queries = encode(encoder, tokenizer, list(data.queries.values()), QUERY_MAX_LENGTH, device=device)
        metrics.update(mean_metrics(top_k(queries, products, data.product_ids, list(data.queries), k), data.qrels, k=k))
    if data.user_qrels:
        users = list(data.user_qrels)
        empty = np.zeros(products.shape[1], np.float32)
        vectors = np.stack([_or(user_embedding(products[rows], kinds, ages, HALF_LIFE_DAYS), empty)
                            for rows, kinds, ages in (data.user_histories[u] for u in users)])
        found = mean_metrics(top_k(vectors, products, data.product_ids, users, k), data.user_qrels, k=k)
        metrics.update({f"{NEXT_ITEMS}/{name}": value for name, value in found.items()})
        metrics.setdefault(f"ndcg@{k}", found[f"ndcg@{k}"])
    labelled = np.array([label is not None for label in data.category_labels], dtype=bool)
    if head is not None and (held := np.flatnonzero(np.array(data.holdout, dtype=bool) & labelled)).size:
        with torch.no_grad():
            logits = head(torch.from_numpy(products[held]).to(device)).float().cpu().numpy()
        predicted = logits.argmax(axis=1)
        truth = np.array(data.category_labels)[held].astype(np.int64)
        metrics["category_accuracy"] = float((predicted == truth).mean())
        metrics["category_macro_f1"] = float(f1_score(truth, predicted, average="macro"))
    return metrics


HALF_LIFE_DAYS = 7.0
"""Recency half-life of the user vectors in the next-items evaluation (``embed.user_half_life_days``'s default)."""


def _or(vector: np.ndarray | None, default: np.ndarray) -> np.ndarray:
    return default if vector is None else vector


def top_k(vectors: np.ndarray, products: np.ndarray, product_ids: list[str], keys: list[str], k: int) -> dict[str, list[str]]:
    """Each key's ``k`` products of highest inner product with its vector."""
    top = np.argsort(-(vectors @ products.T), axis=1)[:, :k]
    return {key: [product_ids[i] for i in row] for key, row in zip(keys, top)}
