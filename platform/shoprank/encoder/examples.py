"""Training and evaluation examples for the encoder, built from a run's tables.

Kept free of Ray (like :mod:`shoprank.encoder.objectives`) so the Ray Train worker,
the plain PyTorch baselines in ``benchmarks/`` and a GPU machine without Ray all
build exactly the same examples and score them with exactly the same evaluation.

* **query -> product rows**: each training query's exact matches (grade 3, from
  judgments and from purchases after a search), at most
  ``max_positives_per_query``, each with ``hard_negatives`` labelled negatives of
  that query drawn from ``hard_negative_labels`` (any product when it has none);
* **co-engagement rows**: the most frequent "viewed/bought together" pairs;
* **evaluation data**: the whole catalogue, and the split's judged queries with
  their graded labels (queries without any relevant product are left out).
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
from shoprank.encoder.model import QUERY_MAX_LENGTH, TextEncoder, encode, load_tokenizer, product_texts, tokenize
from shoprank.evaluation.metrics import mean_metrics

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
    category_labels: list[int]
    holdout: list[bool]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


def eval_data(products: pa.Table, query_pairs: pa.Table, config: EncoderConfig, split: str) -> EvalData:
    """The catalogue and ``split``'s judged queries (graded labels), ready for :func:`evaluate`."""
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
    return EvalData(
        product_ids=ids,
        product_texts=product_texts(products, config),
        category_labels=products.column("category_label").to_pylist(),
        holdout=category_holdout(ids).tolist(),
        queries={q: q for q in qrels},
        qrels=qrels,
    )


def training_tables(
    products: pa.Table, query_pairs: pa.Table, coengagement: pa.Table, config: EncoderConfig
) -> tuple[pa.Table, pa.Table]:
    """(query-product rows, co-engagement rows) as text, shuffled by the seed, ready to tokenize."""
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
            rows["category"].append(-1 if held[product] else label_of[product])
            rows["negatives"].append([text_of[p] for p in picks])
    order = rng.permutation(len(rows["query"]))
    qp = pa.table({k: [v[i] for i in order] for k, v in rows.items()})
    co = coengagement.sort_by([("sessions", "descending"), ("product_a", "ascending")])
    co = co.slice(0, train.max_coengagement_pairs)
    co = co.take(pa.array(rng.permutation(co.num_rows)))  # frequent pairs spread over every batch
    co_text = pa.table(
        {
            "anchor": [text_of[p] for p in co.column("product_a").to_pylist()],
            "other": [text_of[p] for p in co.column("product_b").to_pylist()],
        }
    )
    return qp, co_text


class Tokenize:
    """Token ids of a batch of examples; a Ray Data callable class (tokenizer loaded once per actor)."""

    def __init__(self, model: str, max_length: int) -> None:
        self.tokenizer = load_tokenizer(model)
        self.max_length = max_length

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if "query" in batch:
            q = tokenize(self.tokenizer, list(batch["query"]), QUERY_MAX_LENGTH)
            p = tokenize(self.tokenizer, list(batch["positive"]), self.max_length)
            negatives = [list(n) for n in batch["negatives"]]
            width = len(negatives[0]) if negatives else 0
            out.update(q_ids=q["input_ids"], q_mask=q["attention_mask"], p_ids=p["input_ids"],
                       p_mask=p["attention_mask"], category=batch["category"].astype(np.int64))
            if width:
                flat = tokenize(self.tokenizer, [t for n in negatives for t in n], self.max_length)
                shape = (len(negatives), width, self.max_length)
                out.update(n_ids=flat["input_ids"].reshape(shape), n_mask=flat["attention_mask"].reshape(shape))
        else:
            a = tokenize(self.tokenizer, list(batch["anchor"]), self.max_length)
            b = tokenize(self.tokenizer, list(batch["other"]), self.max_length)
            out.update(a_ids=a["input_ids"], a_mask=a["attention_mask"], b_ids=b["input_ids"], b_mask=b["attention_mask"])
        return out


def evaluate(
    encoder: TextEncoder, head: nn.Module | None, tokenizer: Any, data: EvalData, max_length: int, k: int,
    device: torch.device | str,
) -> dict[str, float]:
    """Query -> product retrieval over the whole catalogue, and category accuracy / macro-F1."""
    products = encode(encoder, tokenizer, data.product_texts, max_length, device=device)
    query_texts = list(data.queries.values())
    queries = encode(encoder, tokenizer, query_texts, QUERY_MAX_LENGTH, device=device)
    scores = queries @ products.T
    top = np.argsort(-scores, axis=1)[:, :k]
    ranked = {q: [data.product_ids[i] for i in row] for q, row in zip(data.queries, top)}
    metrics = mean_metrics(ranked, data.qrels, k=k)
    if head is not None:
        held = np.flatnonzero(np.array(data.holdout))
        with torch.no_grad():
            logits = head(torch.from_numpy(products[held]).to(device)).float().cpu().numpy()
        predicted = logits.argmax(axis=1)
        truth = np.array(data.category_labels)[held]
        metrics["category_accuracy"] = float((predicted == truth).mean()) if len(held) else 0.0
        metrics["category_macro_f1"] = float(f1_score(truth, predicted, average="macro")) if len(held) else 0.0
    return metrics
