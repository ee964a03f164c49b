"""Serving: one variant's encoder -> retrieval -> ranker pipeline, which the Ray Serve deployments wrap."""
