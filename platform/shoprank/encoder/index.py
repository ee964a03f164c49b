"""The retrieval index over product embeddings (FAISS, inner product = cosine on unit vectors), and the
(id, embedding) tables it is built from.

Exact search (``flat``) by default; ``hnsw`` or ``ivf`` for large catalogues, where
exact search costs a full scan per query.
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np
import pyarrow as pa

from shoprank.config import EmbedConfig

PRODUCT_EMBEDDINGS = ("embeddings", "products")
ZERO_SHOT_PRODUCTS = ("embeddings", "zero_shot_products")
"""Where the embed stage writes the catalogue as the fine-tuned and as the pretrained encoder embed it; here,
not beside the stage, so the readers (ranking context, evaluation) import no PyTorch or Ray Train for a path."""


def embedding_table(key: str, ids: Sequence[str], vectors: np.ndarray) -> pa.Table:
    """``(key, embedding)`` rows: one id and one float32 vector (a fixed-size list) per row of ``vectors``."""
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), pa.float32())
    return pa.table({key: pa.array(list(ids), pa.string()),
                     "embedding": pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])})


def build_index(embeddings: np.ndarray, config: EmbedConfig) -> faiss.Index:
    """An inner-product index of ``embeddings`` (rows in catalogue order)."""
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    dim = vectors.shape[1]
    if config.index == "flat":
        index: faiss.Index = faiss.IndexFlatIP(dim)
    elif config.index == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = config.hnsw_ef_construction
        index.hnsw.efSearch = config.hnsw_ef_search
    else:
        nlist = max(1, min(config.ivf_nlist, len(vectors) // 39))  # FAISS wants ~39 points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(config.ivf_nprobe, nlist)
    index.add(vectors)
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, row numbers) of the top ``k`` products per query; row -1 where fewer exist."""
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def embedding_matrix(embedded: pa.Table, product_ids: list[str]) -> np.ndarray:
    """The ``embedding`` column of an (id, embedding) table as a matrix in ``product_ids`` order."""
    position = {p: i for i, p in enumerate(embedded.column("product_id").to_pylist())}
    matrix = np.stack(embedded.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    return matrix[[position[p] for p in product_ids]]
