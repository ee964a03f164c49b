"""The request path, free of Ray: retrieve, build features, rank and diversify, and score the result.

One implementation that the features stage, the offline evaluation, the incremental
update and Serve all call, so an offline row and a live answer come from the same code:
:mod:`.types` (history, candidates, product statistics, sources), :mod:`.context` (what a
run loads: catalogue, statistics, event log), :mod:`.retrieval` (candidate sources),
:mod:`.features`, :mod:`.diversity`, :mod:`.booster` (the saved ranker), :mod:`.answer`
(a batch of requests answered), :mod:`.messages` (what crosses between Serve's
deployments) and :mod:`.metrics` (ranking metrics). It imports neither Ray nor
:mod:`shoprank.serving` (``tests/test_imports.py`` checks it), so it runs in a test, a
notebook or a Ray worker alike; this file imports none of them, so a process that needs
one module (the ingress unpickling :mod:`.messages`) loads no other.
"""
