"""Ranking: features (one implementation offline and online), the XGBoost ranker, its stages."""
