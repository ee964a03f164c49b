"""Ingest's prediction of the categories a catalogue lacks: the ingest stage's second step
(:func:`fill_missing_categories`, after :func:`shoprank.data.ingest.ingest`; here, beside the encoder it embeds
with, because the data package sits below the encoder's).

A catalogue with gaps is what shops bring: a product without a category gets none of the category features,
sources or diversity. The ingest stage gives each such product the category
its ``source.categories.neighbours`` nearest labelled products vote for (:class:`~shoprank.encoder.categories.
Neighbours`): no head is trained for this run yet, so the vote is over the vectors of a pretrained encoder
(``source.categories.model``, the packaged MiniLM by default), each product's text as the encoder reads the
catalogue (:func:`~shoprank.encoder.text.product_texts` of the product as preprocess normalises it).

What it writes: the filled category in ``data/records/products`` and one row per predicted product in
``data/records/category_predictions`` (``product_id``, ``category``, ``votes``: the winning category's share of
the votes), which the preprocess stage turns into the ``category_predicted`` column of ``data/products``
(answers show it too). A predicted category gets no ``category_label``: the category head never trains or is
measured on a guess. With nothing missing it reads one column and embeds nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from shoprank.config import Config
from shoprank.data.catalogue import normalised_products
from shoprank.data.ingest import PREDICTION_SCHEMA, PREDICTIONS, RECORDS, replace_records
from shoprank.data.io import read_table, write_table
from shoprank.encoder.categories import Neighbours
from shoprank.encoder.text import product_texts
from shoprank.errors import ConfigError
from shoprank.store.run import Run, StageRecord

log = logging.getLogger(__name__)

EMBED_PAGE = 512
"""Product texts embedded between two progress lines."""


@dataclass
class Filled:
    """What :func:`fill_categories` did: the products (filled), the predictions, and what the stage record says."""

    products: pa.Table
    predictions: pa.Table
    metrics: dict[str, float | int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def text_identity(config: Config) -> dict[str, object]:
    """The settings outside ``source`` that the fill's texts read (the encoder's product fields and lengths, the
    preprocess stage's description cut): part of the ingest stage's identity, so a change to how the catalogue is
    read predicts again."""
    return {"category_text": {"product_fields": config.encoder.product_fields,
                              "description_chars": config.encoder.description_chars,
                              "max_length": config.encoder.max_length,
                              "preprocess_description_chars": config.preprocess.description_chars}}


def pretrained_embedder(model: str) -> "object":
    """The pretrained encoder ``model`` in PyTorch (:class:`~shoprank.encoder.runtime.TorchEmbedder`)."""
    from shoprank.encoder.model import TextEncoder, load_backbone
    from shoprank.encoder.runtime import TorchEmbedder

    try:
        backbone, tokenizer = load_backbone(model)
    except ConfigError as exc:
        raise ConfigError(f"source.categories.model: {exc}") from None
    encoder = TextEncoder(backbone)
    encoder.eval()
    return TorchEmbedder(encoder, tokenizer)


def embed_with_progress(embedder: object, texts: list[str], max_length: int) -> np.ndarray:
    """``texts`` embedded a page at a time, a log line per page (a large catalogue takes minutes on a CPU)."""
    pages = []
    started = time.perf_counter()
    for start in range(0, len(texts), EMBED_PAGE):
        pages.append(embedder.embed(texts[start: start + EMBED_PAGE], max_length))  # type: ignore[attr-defined]
        done = min(start + EMBED_PAGE, len(texts))
        log.info("[ingest] categories: embedded %d/%d products (%.0f/s)", done, len(texts),
                 done / max(time.perf_counter() - started, 1e-9))
    return np.concatenate(pages) if pages else np.zeros((0, 0), np.float32)


def fill_categories(config: Config, products: pa.Table) -> Filled:
    """``products`` (record rows) with each missing category predicted (see the module docstring)."""
    settings = config.source.categories
    missing = products.column("category").null_count
    filled = Filled(products, PREDICTION_SCHEMA.empty_table(), {"products_without_category": missing})
    if not missing:
        return filled
    if not settings.fill:
        filled.notes.append(f"{missing} of {products.num_rows} products have no category, left missing "
                            "(source.categories.fill is off)")
        return filled
    if missing == products.num_rows:
        filled.notes.append("no product has a category: no category to predict the missing ones from; left missing")
        filled.metrics["categories_left_missing"] = missing
        return filled
    started = time.perf_counter()
    log.info("[ingest] categories: %d of %d products have none; predicting them from their %d nearest labelled "
             "products (%s)", missing, products.num_rows, settings.neighbours, settings.model)
    texts = product_texts(normalised_products(products, {}, config.preprocess.description_chars), config.encoder)
    vectors = embed_with_progress(pretrained_embedder(settings.model), texts, config.encoder.max_length)
    categories = products.column("category").to_pylist()
    labelled = np.array([c is not None for c in categories])
    voted = Neighbours(vectors[labelled], [c for c in categories if c is not None], settings.neighbours).top(
        vectors[~labelled], 1)
    unlabelled = np.flatnonzero(~labelled)
    for row, best in zip(unlabelled, voted):
        categories[row] = best[0][0]
    ids = products.column("product_id").take(pa.array(unlabelled)).to_pylist()
    filled.products = products.set_column(products.schema.get_field_index("category"), "category",
                                          pa.array(categories, pa.string()))
    filled.predictions = pa.table({"product_id": ids, "category": [best[0][0] for best in voted],
                                   "votes": [best[0][1] for best in voted]}, schema=PREDICTION_SCHEMA)
    seconds = time.perf_counter() - started
    filled.metrics.update({"categories_predicted": len(ids), "categories_predicted_s": round(seconds, 3)})
    filled.notes.append(f"{len(ids)} of {products.num_rows} products had no category: each got the category of "
                        f"its {settings.neighbours} nearest labelled products' vote (category_predicted)")
    log.info("[ingest] categories: %d predicted in %.1fs", len(ids), seconds)
    return filled


def fill_missing_categories(config: Config, run: Run, record: StageRecord) -> None:
    """The ingest stage's step after the records are written: the products without a category get a predicted one
    (:func:`fill_categories`), listed in ``data/records/category_predictions``; with none missing, one column is
    read and nothing else done."""
    started = time.perf_counter()
    missing = read_table(run, *RECORDS, "products", columns=["category"]).column("category").null_count
    filled = fill_categories(config, read_table(run, *RECORDS, "products")) if missing else None
    if filled is not None and filled.predictions.num_rows:
        replace_records(run, filled.products, "products")
    write_table(run, filled.predictions if filled is not None else PREDICTION_SCHEMA.empty_table(), *PREDICTIONS)
    record.metrics.update(filled.metrics if filled is not None else {"products_without_category": 0})
    record.notes.extend(filled.notes if filled is not None else [])
    record.timings["categories_s"] = round(time.perf_counter() - started, 3)
