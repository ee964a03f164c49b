"""The saved ranker: the XGBoost booster written, read back and asked for scores, without Ray.

The saved model (``ranker/model/``) is ``model.ubj`` plus ``ranker.json`` with the
feature list and :data:`~shoprank.recsys.features.FEATURE_SCHEMA_VERSION`; loading it
with another feature schema is an error, not a silent mis-ranking. Training
(:mod:`shoprank.ranker.train`) saves it; Serve, the evaluation and an update load it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import xgboost

from shoprank.errors import ShopRankError
from shoprank.recsys.features import FEATURE_SCHEMA_VERSION, FEATURES

MODEL_FILE = "model.ubj"
META_FILE = "ranker.json"


def save_ranker(booster: xgboost.Booster, directory: Path, metrics: dict[str, Any]) -> None:
    """``model.ubj`` and ``ranker.json`` (feature list, schema version, metrics)."""
    directory.mkdir(parents=True, exist_ok=True)
    booster.save_model(directory / MODEL_FILE)
    meta = {"features": FEATURES, "feature_schema_version": FEATURE_SCHEMA_VERSION,
            "num_trees": booster.num_boosted_rounds(), "metrics": metrics}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))


def load_ranker(directory: Path) -> xgboost.Booster:
    """The saved booster; an error when it was trained on another feature schema."""
    meta_path = Path(directory) / META_FILE
    if not meta_path.exists():
        raise ShopRankError(f"{directory}: no ranker here ({META_FILE} missing); train one with jobs/train_ranker.py")
    meta = json.loads(meta_path.read_text())
    if meta.get("feature_schema_version") != FEATURE_SCHEMA_VERSION or meta.get("features") != FEATURES:
        raise ShopRankError(
            f"{directory}: ranker trained on feature schema v{meta.get('feature_schema_version')} "
            f"({len(meta.get('features', []))} features), this code computes v{FEATURE_SCHEMA_VERSION} "
            f"({len(FEATURES)} features); retrain it with jobs/train_ranker.py"
        )
    booster = xgboost.Booster()
    booster.load_model(Path(directory) / MODEL_FILE)
    return booster


def predict(booster: xgboost.Booster, features: np.ndarray) -> np.ndarray:
    """Scores of one request's candidates (higher ranks first)."""
    return booster.inplace_predict(features)
