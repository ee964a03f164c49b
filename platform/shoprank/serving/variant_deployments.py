"""Ray Serve deployments that load a variant's models: the two that answer on a request's path.

Per variant (``Variant_A``, ``Variant_B``):

* :class:`Variant` answers whole requests in one replica, batched with ``@serve.batch``:
  its user cache caught up with the event store once (:mod:`shoprank.serving.user_state`),
  the batch's queries encoded in one call, each request's candidates retrieved (its
  run's catalogue, FAISS index, BM25, event log), all of them ranked in one ``predict``
  (:func:`shoprank.recsys.answer.answer_many`, the Ray-free path the tests and the
  in-process benchmark call too). Its ranker comes through ``user_config``, so moving a
  registry alias and redeploying reloads it in place (``reconfigure``), without
  restarting a replica.
  What it loads comes from the :class:`~shoprank.serving.loaders.VariantLoader` bound to it
  (the runs under ``run.root`` in production, an in-memory shop in the tests).
* :class:`QueryEncoder` (``QueryEncoder_A``...), with ``ray.use_gpu`` (or
  ``serve.separate_query_encoder``): the encoder in a deployment of its own, on the GPU,
  called by the variant's replicas; otherwise the variant encodes its queries itself.

The ingress and the shared deployments live in :mod:`shoprank.serving.deployments`, which
imports none of this module's models. Here too the models' modules (PyTorch, transformers, FAISS,
XGBoost) are imported inside the methods that use them: the process that binds the app
(``shoprank serve``) then starts deploying about 7 s sooner, and only these replicas pay for them.
"""

import asyncio
import dataclasses
import logging
import threading
import time
from typing import Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from shoprank.cluster import replica_grpc_on_loopback
from shoprank.config import Config
from shoprank.recsys.messages import Answered, Asked
from shoprank.serving.loaders import VariantLoader
from shoprank.serving.metrics import record_model
from shoprank.serving.user_state import UserCache
from shoprank.serving.variants import VariantSpec
from shoprank.store.events import open_event_store

log = logging.getLogger(__name__)


@serve.deployment
class QueryEncoder:
    """A variant's query encoder on its own (on the GPU with ``ray.use_gpu``): the run's fine-tuned model, or the
    pretrained one."""

    def __init__(self, config: dict[str, Any], spec: VariantSpec, loader: VariantLoader) -> None:
        replica_grpc_on_loopback()
        self.config = Config.model_validate(config)
        device = "cpu"
        if spec.runtime == "torch" and self.config.ray.use_gpu:  # an ONNX runtime's replica never imports PyTorch
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.embedder = loader.embedder(spec, device)

    def reconfigure(self, settings: dict[str, Any]) -> None:
        self.encode.set_max_batch_size(settings["batch_size"])
        self.encode.set_batch_wait_timeout_s(settings["batch_wait_s"])

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def encode(self, queries: list[str]) -> list[np.ndarray]:
        from shoprank.encoder.text import QUERY_MAX_LENGTH

        return list(self.embedder.embed(queries, QUERY_MAX_LENGTH))


@serve.deployment
class Variant:
    """A variant's answers: its run's context (encoder, catalogue, index, BM25, event log) and its ranker.

    The ranker follows the variant's registry alias while the app runs: ``user_config``
    names the alias and the batching; a thread polls the registry and, when
    the alias moved to another ranker over the same base run (an incremental update),
    loads it and swaps it in between two batches.
    """

    def __init__(self, config: dict[str, Any], spec: VariantSpec, loader: VariantLoader, event_db: str,
                 query_encoder: DeploymentHandle | None = None) -> None:
        replica_grpc_on_loopback()
        from shoprank.recsys.answer import Ranking, Retrieval

        self.config = Config.model_validate(config)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.base_run = spec.run
        self.loader = loader
        # with a query encoder of its own, the variant loads no encoder
        self.context = loader.context(spec, encoder=query_encoder is None)
        # an erased shopper leaves the run's history too (every tombstone now, the new ones before each batch)
        self.users = UserCache(open_event_store(event_db), self.config.features.history_events,
                               self.config.serve.user_cache_events, forget_elsewhere=self.context.events.forget)
        self.retrieval = Retrieval(self.context)
        # exploration slots for live-added products, their impressions and clicks read beside the catalogue's log
        from shoprank.recsys.explore import Exploration, ExposureCounts, ExposureFollower

        exposure = ExposureCounts()
        self.exploration = Exploration(self.config.serve.explore, self.context, exposure)
        ExposureFollower(open_event_store(event_db), exposure).start(self.config.serve.catalogue_poll_s)
        self.query_encoder = query_encoder
        self.ranking: Ranking | None = None
        self.model: dict[str, Any] = {}
        self.settings: dict[str, Any] = {}
        self.watcher: threading.Thread | None = None

    def reconfigure(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.answer.set_max_batch_size(settings["batch_size"])
        self.answer.set_batch_wait_timeout_s(settings["batch_wait_s"])
        self.follow_registry()
        if self.watcher is None:
            self.watcher = threading.Thread(target=self._watch, daemon=True, name="registry-watcher")
            self.watcher.start()

    def follow_registry(self) -> None:
        """Load the model the alias names now, when it is not the one loaded."""
        from shoprank.recsys.answer import Ranking

        spec = self.loader.resolve(self.settings["variant"], self.settings["alias"])
        if spec.ranker_run == self.model.get("ranker_run") and spec.strategy == self.model.get("strategy"):
            return
        if spec.run != self.base_run:
            log.warning("alias %s moved to %s over another base run (%s): redeploy the app to serve it",
                        spec.alias, spec.ranker_run, spec.run)
            return
        booster = self.loader.booster(spec)
        self.ranking = Ranking.served(self.config, self.context.catalogue.stats, spec.strategy, booster,
                                      self.loader.diversity(spec))
        replaced, self.model = self.model, {"strategy": spec.strategy, "ranker_run": spec.ranker_run,
                                            "trees": booster.num_boosted_rounds() if booster is not None else 0}
        record_model(self.settings["variant"], replaced, self.model)
        log.info("ranker loaded: %s", self.model)

    def _watch(self) -> None:
        while True:
            time.sleep(self.config.serve.registry_poll_s)
            try:
                self.follow_registry()
            except Exception:  # a half-copied model or a bad entry: keep serving the loaded one
                log.exception("registry check failed; keeping %s", self.model)

    def describe(self) -> dict[str, Any]:
        return self.model

    def _with_live_events(self, asked: list[Asked]) -> list[Asked]:
        """``asked`` with each user's live events: what the store acknowledged up to now is in the cache, and a
        user erased up to now is out of it and out of the run's history."""
        self.users.catch_up()
        return [dataclasses.replace(a, live=self.users.events_of(a.user_id)) for a in asked]

    async def _vectors(self, queries: list[str]) -> dict[str, np.ndarray]:
        if not queries:
            return {}
        if self.query_encoder is None:
            return dict(zip(queries, self.context.encode_queries(queries)))
        vectors = await asyncio.gather(*(self.query_encoder.encode.remote(q) for q in queries))
        return dict(zip(queries, vectors))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def answer(self, asked: list[Asked]) -> list[Answered]:
        ranking = self.ranking
        assert ranking is not None, "reconfigure runs before the first request"
        asked = await asyncio.to_thread(self._with_live_events, asked)
        vectors = await self._vectors(sorted({a.query for a in asked if a.query is not None}))
        from shoprank.recsys.answer import answer_many

        answered = answer_many(self.retrieval, ranking, asked, vectors, self.exploration)
        return [dataclasses.replace(answer, replica=self.replica) for answer in answered]
