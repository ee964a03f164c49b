"""What the recommendation benchmarks share: the baselines' models, the top-k cut and the per-shopper bootstrap.

``benchmarks/recommend.py`` (the generated latent-factor shop) and
``benchmarks/online_retail.py`` (UCI Online Retail) both score EASE and ``implicit``'s
ALS and run the pipeline (:func:`run_pipeline`) for the system's row (their bootstrap is
:func:`shoprank.recsys.metrics.bootstrap_mean`, the evaluation's own);
one implementation here, so the two benchmarks'
baselines are the same models fitted the same way. Like :mod:`common`, imported as a
script sibling (``import baselines``), by drivers only.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
K = 10
"""The cut of every list scored (NDCG@10, Recall@10, HitRate@10)."""
ALS_ITERATIONS = 15


def user_matrix(users: np.ndarray, rows: np.ndarray, n: int) -> sp.csr_matrix:
    """Binary users x products matrix of the training engagements (users in sorted order of their ids)."""
    codes = np.unique(users, return_inverse=True)[1]
    matrix = sp.csr_matrix((np.ones(len(rows), np.float32), (codes, rows)), shape=(codes.max() + 1, n))
    matrix.data[:] = 1.0
    return matrix


def top_k(scores: np.ndarray, history: sp.csr_matrix | None, k: int = K) -> np.ndarray:
    """Each row's ``k`` best products (columns), best first; the ones in its ``history`` left out (None: none)."""
    scores = np.array(scores, dtype=np.float64)
    if history is not None:
        scores[history.nonzero()] = -np.inf
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def ease_weights(matrix: sp.csr_matrix, l2: float) -> np.ndarray:
    """EASE's item-item weights (Steck 2019): dense, closed form, a zero diagonal."""
    gram = (matrix.T @ matrix).toarray().astype(np.float64)
    gram[np.diag_indices_from(gram)] += l2
    precision = np.linalg.inv(gram)
    weights = precision / -np.diag(precision)[None, :]
    np.fill_diagonal(weights, 0.0)
    return weights


def fit_als(matrix: sp.csr_matrix, params: dict[str, Any]) -> Any:
    """``implicit``'s ALS (Hu, Koren and Volinsky 2008) fitted on ``matrix`` with ``params`` (factors,
    regularization, alpha), :data:`ALS_ITERATIONS` sweeps, seeded. Call it under ``threadpool_limits(1, "blas")``:
    implicit's advice, its own threads and not BLAS's."""
    from implicit.als import AlternatingLeastSquares

    model = AlternatingLeastSquares(**params, iterations=ALS_ITERATIONS, random_state=0)
    model.fit(matrix, show_progress=False)
    return model


def run_pipeline(config_arg: str, overrides: list[str]) -> None:
    """``jobs/pipeline.py`` on the config: its stages skip what is current, so a finished run costs seconds."""
    command = [sys.executable, str(REPO / "jobs" / "pipeline.py"), "--config", config_arg]
    command += [arg for override in overrides for arg in ("--set", override)]
    print("running " + " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)
