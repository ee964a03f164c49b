"""What the encoder reads, free of PyTorch: a product's text and the length of a query.

Apart from :mod:`shoprank.encoder.model` because the processes that only need a text (the ranking
context's BM25 in a feature actor, the tests' tiny tokenizer) should not import PyTorch and
transformers for it: about 7 s of CPU in each such process on a small machine.
"""

from __future__ import annotations

import pyarrow as pa

from shoprank.config import EncoderConfig

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
