"""The categorisation's figures: top-1 and top-3 accuracy on the products held out of the category loss.

Part of the ``evaluate`` stage (:func:`shoprank.evaluation.offline.evaluate_offline`). The products measured are
those :func:`~shoprank.encoder.examples.category_holdout` kept out of the category head's training whose category
is the catalogue's own (not ingest's prediction). Each is embedded as a listing without a category is, its title
and description and brand and attributes as the encoder reads the catalogue but no category
(:func:`~shoprank.encoder.text.product_texts` with the category left out), so the figure is what ``/categorize``
and a product put without a category get, not a reading of the category off the text. Rows:

* ``head``: the fine-tuned encoder's category head (``head.npz``), softmax over the tree: ``/categorize``;
* ``head, category in the text``: the same head over the catalogue's own vectors, whose text holds the category
  (what the encoder stage's ``validation/category_accuracy`` measures), for comparison only;
* ``neighbours (fine-tuned encoder)``: the ``source.categories.neighbours`` nearest training products with a
  category, by the run's product vectors: ``/categorize`` where a run has no head;
* ``neighbours (pretrained encoder)``: the same over the pretrained encoder's vectors: what ingest fills a missing
  category with (only where ``source.categories.model`` is ``encoder.model``, whose vectors the run holds);
* ``most frequent categories``: the training products' most frequent categories, whatever the product.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from shoprank.config import Config
from shoprank.data.io import read_table
from shoprank.encoder.examples import category_holdout
from shoprank.encoder.index import PRODUCT_EMBEDDINGS, ZERO_SHOT_PRODUCTS, embedding_matrix
from shoprank.encoder.runtime import load_embedder
from shoprank.encoder.text import CATEGORY_HEAD, product_texts
from shoprank.encoder.categories import CategoryHead, Neighbours, Ranked, top_accuracy
from shoprank.store.run import Run

log = logging.getLogger(__name__)

KS = (1, 3)


def without_category(products: pa.Table) -> pa.Table:
    """``products`` (the run's normalised rows) as listings without a category."""
    index = products.schema.get_field_index("category")
    return products.set_column(index, "category", pa.nulls(products.num_rows, pa.string()))


def categorisation_figures(config: Config, run: Run) -> dict[str, Any]:
    """``{"held_out": n, "rows": {row: {"top1", "top3"}}, "notes": [...]}`` (see the module docstring)."""
    products = read_table(run, "data", "products")
    ids = products.column("product_id").to_pylist()
    categories = products.column("category").to_pylist()
    labelled = np.array([label is not None for label in products.column("category_label").to_pylist()])
    held = category_holdout(ids) & labelled
    training = ~category_holdout(ids) & labelled
    figures: dict[str, Any] = {"held_out": int(held.sum()), "rows": {}, "notes": []}
    if not held.any() or not training.any():
        figures["notes"].append("no categorisation figures: no held-out product, or no training product, has a "
                                "category of its own")
        return figures
    rows = np.flatnonzero(held)
    truth = [categories[i] for i in rows]
    texts = product_texts(without_category(products.take(pa.array(rows))), config.encoder)
    pool = [categories[i] for i in np.flatnonzero(training)]
    k = config.source.categories.neighbours
    found: dict[str, list[Ranked]] = {}
    fine_tuned = load_embedder(config, run, zero_shot=False).embed(texts, config.encoder.max_length)
    catalogue = embedding_matrix(read_table(run, *PRODUCT_EMBEDDINGS), ids)
    if run.exists(*CATEGORY_HEAD):
        head = CategoryHead.load(run.local_path(*CATEGORY_HEAD))
        found["head"] = head.top(fine_tuned, max(KS))
        found["head, category in the text"] = head.top(catalogue[rows], max(KS))
    else:
        figures["notes"].append("the run has no category head (head.npz): no head rows")
    found["neighbours (fine-tuned encoder)"] = Neighbours(catalogue[training], pool, k).top(fine_tuned, max(KS))
    if config.source.categories.model == config.encoder.model:
        pretrained = load_embedder(config, run, zero_shot=True).embed(texts, config.encoder.max_length)
        zero_shot = embedding_matrix(read_table(run, *ZERO_SHOT_PRODUCTS), ids)
        found["neighbours (pretrained encoder)"] = Neighbours(zero_shot[training], pool, k).top(pretrained, max(KS))
    else:
        figures["notes"].append("source.categories.model is not encoder.model: ingest's neighbours (pretrained "
                                "encoder) are not measured here")
    common = [(c, n / len(pool)) for c, n in Counter(pool).most_common(max(KS))]
    found["most frequent categories"] = [common] * len(rows)
    figures["rows"] = {name: top_accuracy(ranked, truth, KS) for name, ranked in found.items()}
    log.info("categorisation on %d held-out products: %s", len(rows), figures["rows"])
    return figures
