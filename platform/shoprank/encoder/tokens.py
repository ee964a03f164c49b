"""Token ids, free of PyTorch: the tokenizer of a model (from its ``tokenizer.json``) and the Ray Data callable that
tokenizes the encoder's training examples.

Apart from :mod:`shoprank.encoder.model` because the processes that only tokenize (Ray Data's tokenizing tasks, a
Serve replica running the encoder in ONNX Runtime) need neither PyTorch nor transformers' models: importing them
is about 5 s of CPU per process on a small machine.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shoprank.encoder.text import QUERY_MAX_LENGTH, resolve_model


def fast_tokenizer(name: str) -> Any:
    """The model's tokenizer from its ``tokenizer.json`` (``PreTrainedTokenizerFast``), which imports neither PyTorch
    nor transformers' models: a replica serving ONNX starts about 7 s of CPU sooner. A model saved without a
    ``tokenizer.json`` falls back to ``AutoTokenizer`` (:func:`shoprank.encoder.model.load_tokenizer`)."""
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(resolve_model(name))
    except (OSError, ValueError, TypeError):  # no tokenizer.json (a slow tokenizer's files only)
        from shoprank.encoder.model import load_tokenizer

        return load_tokenizer(name)


def tokenize(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    """Fixed-length token ids and masks (fixed shapes batch without copying in Ray Data)."""
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    return {"input_ids": encoded["input_ids"].astype(np.int64), "attention_mask": encoded["attention_mask"].astype(np.int64)}


class Tokenize:
    """Token ids of a batch of training examples; a Ray Data callable (the tokenizer pickled into its tasks)."""

    def __init__(self, model: str, max_length: int) -> None:
        self.tokenizer = fast_tokenizer(model)
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
