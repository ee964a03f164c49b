"""Ranking: the feature rows (Ray Data), the XGBoost ranker on Ray Train, its stages and incremental updates; the
request path they build on (retrieval, features, the saved booster) is :mod:`shoprank.recsys`."""
