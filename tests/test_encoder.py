"""The encoder: fine-tuning on Ray Train with a tiny in-process BERT, checkpoints, export, embedding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shoprank.config import Config
from shoprank.data.io import read_table
from shoprank.encoder.model import encode, load_encoder, product_texts
from shoprank.encoder.stages import train_and_embed
from shoprank.store.run import Run


@pytest.fixture(scope="module")
def trained(tiny_run: tuple[Config, Run], tiny_encoder_dir: Path) -> tuple[Config, Run]:
    config, _ = tiny_run
    config = config.model_copy(update={"encoder": config.encoder.model_copy(update={"model": str(tiny_encoder_dir)})})
    return config, train_and_embed(config)


def test_training_reports_retrieval_and_category_metrics_every_epoch(trained: tuple[Config, Run]) -> None:
    config, run = trained
    metrics = run.manifest()["stages"]["encoder"]["metrics"]
    assert len(metrics["epochs"]) == config.encoder.train.epochs
    for key in ("validation/ndcg@10", "validation/recall@10", "validation/mrr",
                "validation/category_accuracy", "validation/category_macro_f1",
                "zero_shot/ndcg@10", "loss/query_product", "loss/coengagement", "loss/category"):
        assert key in metrics, key
    assert 0.0 <= metrics["validation/ndcg@10"] <= 1.0


def test_adapter_and_merged_models_give_the_same_embeddings(trained: tuple[Config, Run]) -> None:
    config, run = trained
    directory = Path(run.path("encoder", "model"))
    texts = product_texts(read_table(run, "data", "products").slice(0, 20), config.encoder)
    merged, tokenizer = load_encoder(directory, "merged")
    adapter, _ = load_encoder(directory, "adapter")
    a = encode(merged, tokenizer, texts, config.encoder.max_length)
    b = encode(adapter, tokenizer, texts, config.encoder.max_length)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_catalogue_users_and_index_are_embedded(trained: tuple[Config, Run]) -> None:
    import faiss

    config, run = trained
    products = read_table(run, "embeddings", "products")
    assert products.num_rows == config.source.synthetic.num_products
    vectors = np.stack(products.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    index = faiss.read_index(run.path("index", "products.faiss"))
    assert index.ntotal == products.num_rows
    users = read_table(run, "embeddings", "users")
    assert users.num_rows > 0
