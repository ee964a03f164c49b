"""Product categorisation, free of Ray, PyTorch and FAISS: which categories of the run's tree a product's vector
belongs to, with probabilities (the encoder's category head, or its vectors' nearest labelled products).

Two ways, one shape of answer (per vector, the ``k`` most likely categories, most likely first, each with its
probability):

* :class:`CategoryHead`: the fine-tuned encoder's category head (``logits = weight @ v + bias``, trained as an
  auxiliary loss beside retrieval, written by the encoder stage as ``encoder/model/head.npz``), its logits put
  through a softmax over the run's whole tree;
* :class:`Neighbours`: the categories of the ``k`` nearest labelled products (cosine over unit vectors), each
  category's probability its share of the votes (ties: the larger summed similarity, then the name). What a run
  without a head answers with, and what ingest fills a catalogue's missing categories with before any head is
  trained (:mod:`shoprank.encoder.fill`).

:func:`product_text` makes the text a title and a description are embedded as: the product as the preprocess
stage normalises it (:func:`shoprank.data.catalogue.normalised_products`), read by the encoder as the catalogue is
(:func:`shoprank.encoder.text.product_texts`), with no category, brand or attributes, which is what a product
without a category is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from shoprank.config import Config
from shoprank.data.catalogue import normalised_products, products_table
from shoprank.encoder.text import product_texts

Method = Literal["head", "neighbours"]
Ranked = list[tuple[str, float]]
"""A product's categories, most likely first, each with its probability."""


def product_text(title: str, description: str | None, config: Config) -> str:
    """What the encoder reads for a product of ``title`` and ``description`` alone (see the module docstring)."""
    table = products_table([{"product_id": "-", "title": title.strip(),
                             "description": (description or "").strip() or None, "price": 0.0}])
    return product_texts(normalised_products(table, {}, config.preprocess.description_chars), config.encoder)[0]


class Categoriser(Protocol):
    """Vectors (rows, unit length) in, each row's ``k`` most likely categories out."""

    method: Method

    def top(self, vectors: np.ndarray, k: int) -> list[Ranked]: ...


@dataclass(frozen=True)
class CategoryHead:
    """The fine-tuned encoder's category head as numpy (see the module docstring). Called on vectors, it is the
    live catalogue's :data:`~shoprank.recsys.live.Categorise`: each product's most likely category."""

    weight: np.ndarray
    bias: np.ndarray
    categories: list[str]
    method: Method = "head"

    @classmethod
    def load(cls, path: Path) -> "CategoryHead":
        with np.load(path) as saved:
            return cls(saved["weight"], saved["bias"], saved["categories"].tolist())

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        """Softmax of the head's logits: one row per vector, one column per category of :attr:`categories`."""
        logits = vectors.astype(np.float32) @ self.weight.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        odds = np.exp(logits)
        return odds / odds.sum(axis=1, keepdims=True)

    def top(self, vectors: np.ndarray, k: int) -> list[Ranked]:
        if not self.categories:
            return [[] for _ in range(len(vectors))]
        found = self.probabilities(vectors)
        order = np.argsort(-found, axis=1, kind="stable")[:, :k]
        return [[(self.categories[c], float(row[c])) for c in best] for row, best in zip(found, order)]

    def __call__(self, vectors: np.ndarray) -> list[str | None]:
        if not self.categories:
            return [None] * len(vectors)
        labels = np.argmax(vectors.astype(np.float32) @ self.weight.T + self.bias, axis=1)
        return [self.categories[i] for i in labels]


BLOCK = 1024
"""Query rows compared with every labelled product at once: bounds the similarity matrix (1024 x catalogue)."""


@dataclass(frozen=True)
class Neighbours:
    """Votes of the ``neighbours`` nearest labelled products (see the module docstring). ``vectors``: the labelled
    products' (unit rows), ``categories`` each one's category."""

    vectors: np.ndarray
    categories: Sequence[str]
    neighbours: int = 10
    method: Method = "neighbours"

    def top(self, vectors: np.ndarray, k: int) -> list[Ranked]:
        if not len(self.categories):
            return [[] for _ in range(len(vectors))]
        names, codes = np.unique(np.asarray(self.categories, dtype=object).astype(str), return_inverse=True)
        voters = min(self.neighbours, len(codes))
        out: list[Ranked] = []
        for start in range(0, len(vectors), BLOCK):
            similarity = vectors[start: start + BLOCK].astype(np.float32) @ self.vectors.astype(np.float32).T
            nearest = np.argpartition(-similarity, voters - 1, axis=1)[:, :voters]
            for row, chosen in zip(similarity, nearest):
                votes = np.bincount(codes[chosen], minlength=len(names))
                weight = np.bincount(codes[chosen], weights=row[chosen], minlength=len(names))
                ranked = sorted(np.flatnonzero(votes), key=lambda c: (-votes[c], -weight[c], names[c]))[:k]
                out.append([(str(names[c]), float(votes[c]) / voters) for c in ranked])
        return out


HEAD_ROW, NEIGHBOURS_ROW = "head", "neighbours (fine-tuned encoder)"
"""The evaluation's rows (:mod:`shoprank.evaluation.categories`) that :func:`chosen_method` compares."""


def chosen_method(asked: str, has_head: bool, figures: dict[str, dict[str, float]]) -> tuple[Method, str | None]:
    """How ``/categorize`` answers for ``asked`` (``serve.categorize_method``), a variant with or without a category
    head, and its run's categorisation figures (the evaluate stage's rows; empty: none): the method, and why it is
    not the head, when it is not."""
    if not has_head:
        return "neighbours", ("no category head for this variant's run (head.npz: its encoder is not fine-tuned, or "
                              "it was exported without one): the nearest labelled products vote")
    if asked == "head":
        return "head", None
    head, neighbours = figures.get(HEAD_ROW, {}).get("top1"), figures.get(NEIGHBOURS_ROW, {}).get("top1")
    if asked == "neighbours":
        return "neighbours", "serve.categorize_method is neighbours: the nearest labelled products vote"
    if head is not None and neighbours is not None and neighbours > head:
        return "neighbours", (f"the run's evaluation measured the nearest labelled products ahead of the category "
                              f"head on the held-out products (top-1 {neighbours:.4f} against {head:.4f}; "
                              "serve.categorize_method auto): they vote")
    return "head", None


def top_accuracy(predicted: Sequence[Ranked], truth: Sequence[str], ks: Sequence[int] = (1, 3)) -> dict[str, float]:
    """Share of products whose true category is among the first ``k`` predicted, for each ``k``
    (``top1``, ``top3``...); none without a product."""
    if not truth:
        return {}
    return {f"top{k}": round(float(np.mean([t in [c for c, _ in p[:k]] for p, t in zip(predicted, truth)])), 4)
            for k in ks}
