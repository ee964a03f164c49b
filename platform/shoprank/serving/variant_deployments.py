"""Ray Serve deployments that load a variant's models: the two that answer on a request's path.

Per variant (``Variant_A``, ``Variant_B``):

* :class:`Variant` answers whole requests in one replica, batched with ``@serve.batch``:
  its catalogue caught up with the catalogue change log (:mod:`shoprank.serving.catalogue_state`:
  products put live are found, changed ones answered as changed, deleted ones never), then
  its user cache with the event store (:mod:`shoprank.serving.user_state`), once per batch,
  the batch's queries encoded in one call, each request's candidates retrieved (its
  run's catalogue, FAISS index, BM25, event log), all of them ranked in one ``predict``
  (:func:`shoprank.recsys.answer.answer_many`, the Ray-free path the tests and the
  in-process benchmark call too). Its ranker comes through ``user_config``, so moving a
  registry alias and redeploying reloads it in place (``reconfigure``), without
  restarting a replica.
  Between batches a thread follows the change log every ``serve.catalogue_poll_s``; one lock
  per replica keeps a change being applied, a ranker being swapped in and a batch being
  answered apart (new products are embedded outside it, by the variant's own encoder).
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
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from shoprank.cluster import replica_grpc_on_loopback
from shoprank.config import Config
from shoprank.recsys.messages import Answered, Asked
from shoprank.serving.catalogue_state import CatalogueFollower
from shoprank.serving.loaders import VariantLoader
from shoprank.serving.metrics import GAUGE_REFRESH_S, record_catalogue, record_catalogue_changes, record_model
from shoprank.serving.user_state import UserCache
from shoprank.serving.variants import VariantSpec
from shoprank.store.events import open_event_store

if TYPE_CHECKING:
    from shoprank.recsys.answer import Ranking

log = logging.getLogger(__name__)

REQUEST_CATCH_UP_WAIT_S = 1.0
"""How long a batch of requests waits for a catalogue catch-up already under way (the poll thread's) before it is
answered from the catalogue as it is: a small change is applied well within it, a large sync being embedded is not
worth holding every answer for."""
EMBED_TIMEOUT_S = 120.0
"""How long a replica waits for its query encoder deployment to embed a page of new product texts."""


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

    def embed_products(self, texts: list[str]) -> np.ndarray:
        """Product texts put through the catalogue change log, at the products' length (``encoder.max_length``, as
        the embed stage embeds the catalogue): the variant's replicas embed new products with this encoder."""
        return self.embedder.embed(texts, self.config.encoder.max_length)


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
        from shoprank.recsys.live import LiveCatalogue

        self.config = Config.model_validate(config)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.base_run = spec.run
        self.loader = loader
        # with a query encoder of its own, the variant loads no encoder
        self.context = loader.context(spec, encoder=query_encoder is None)
        store = open_event_store(event_db)
        # an erased shopper leaves the run's history too (every tombstone now, the new ones before each batch)
        self.users = UserCache(store, self.config.features.history_events,
                               self.config.serve.user_cache_events, forget_elsewhere=self.context.events.forget)
        self.retrieval = Retrieval(self.context)
        # exploration slots for live-added products, their impressions and clicks read beside the catalogue's log
        from shoprank.recsys.explore import Exploration, ExposureCounts, ExposureFollower

        exposure = ExposureCounts()
        self.exploration = Exploration(self.config.serve.explore, self.context, exposure)
        ExposureFollower(open_event_store(event_db), exposure).start(self.config.serve.catalogue_poll_s)
        self.query_encoder = query_encoder
        self.lock = threading.Lock()
        """Held while the catalogue changes, the ranking is replaced, or a batch is answered."""
        self.head = loader.categoriser(spec)
        """The run's category head (None: the pretrained encoder, or a run without head.npz): fills a live product's
        missing category, and answers /categorize."""
        from shoprank.encoder.categories import chosen_method

        self.categorize_method = chosen_method(self.config.serve.categorize_method, self.head is not None,
                                               loader.categorisation(spec))
        """How /categorize answers here, and why not by the head when it does not."""
        live = LiveCatalogue(self.context, self._embed_products, self.head)
        self.catalogue = CatalogueFollower(store, live, self.lock, loader.catalogue_seq(spec),
                                           compact_rows=self.config.serve.catalogue_compact_rows)
        self.variant = spec.name
        # the change log since the run's mark, before this replica reports ready: one started later has every change
        # (in a thread of its own: the constructor runs on Serve's event loop, where a handle's result cannot wait;
        # a failure fails the start, and Serve starts the replica again)
        with ThreadPoolExecutor(1, thread_name_prefix="catalogue-replay") as replay:
            replay.submit(self._follow_catalogue).result()
        for name, target in (("catalogue-follower", self._poll_catalogue), ("catalogue-metrics", self._report)):
            threading.Thread(target=target, daemon=True, name=name).start()
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
        diversity = self.loader.diversity(spec)
        with self.lock:  # the catalogue's statistics do not change while the ranking is made from them
            self.ranking = Ranking.served(self.config, self.context.catalogue.stats, spec.strategy, booster, diversity,
                                          self.context.catalogue.listing)
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
        return {**self.model, "catalogue": self.catalogue.describe()}

    def _embed_products(self, texts: list[str]) -> np.ndarray:
        """New product texts embedded by this variant's own encoder runtime (a thread's call, never the loop's)."""
        if self.query_encoder is None:
            return self.context.embed_products(texts)
        return self.query_encoder.embed_products.remote(texts).result(timeout_s=EMBED_TIMEOUT_S)

    async def categorize(self, title: str, description: str | None, k: int) -> dict[str, Any]:
        """``/categorize``: the listing's ``k`` most likely categories (:mod:`shoprank.encoder.categories`)."""
        return await asyncio.to_thread(self._categorize, title, description, k)

    def _categorize(self, title: str, description: str | None, k: int) -> dict[str, Any]:
        from shoprank.encoder.categories import product_text
        from shoprank.recsys.live import labelled_neighbours

        vector = self._embed_products([product_text(title, description, self.config)])
        method, note = self.categorize_method
        if method == "head" and self.head is not None:
            categoriser: Any = self.head
        else:
            with self.lock:  # the catalogue's rows do not change while the labelled ones are picked
                categoriser = labelled_neighbours(self.context.catalogue, self.config.source.categories.neighbours)
        found = categoriser.top(np.asarray(vector, np.float32), k)[0]
        return {"categories": [{"category": c, "probability": round(p, 6)} for c, p in found],
                "method": categoriser.method, "note": note}

    def _follow_catalogue(self, wait_s: float | None = None) -> None:
        """Apply the catalogue changes stored since the last call, and count them (``wait_s``: see
        :meth:`CatalogueFollower.catch_up`)."""
        record_catalogue_changes(self.variant, self.catalogue.catch_up(wait_s))

    def _poll_catalogue(self) -> None:
        """Follow the change log while no request comes: an idle replica is current within a second."""
        while True:
            time.sleep(self.config.serve.catalogue_poll_s)
            try:
                self._follow_catalogue()
            except Exception:  # the store unreachable a moment, a change that cannot be embedded: the lag shows it
                log.exception("catalogue change log: catching up failed at change %d", self.catalogue.cursor)

    def _report(self) -> None:
        """The catalogue's size and lag, while a long catch-up (a large sync being embedded) is under way too."""
        while True:
            record_catalogue(self.variant, self.catalogue.live.products, self.catalogue.lag_s())
            time.sleep(GAUGE_REFRESH_S)

    def _with_live_events(self, asked: list[Asked]) -> list[Asked]:
        """``asked`` with each user's live events: the catalogue changes and events the store acknowledged up to now
        applied (the catalogue first, so an event naming a product put a moment ago maps to its row), and a user
        erased up to now out of the cache and out of the run's history."""
        try:
            self._follow_catalogue(REQUEST_CATCH_UP_WAIT_S)
        except Exception:  # a change that cannot be applied now: answer from the catalogue as it is; the lag shows it
            log.exception("catalogue change log: catching up failed at change %d", self.catalogue.cursor)
        self.users.catch_up()
        return [dataclasses.replace(a, live=self.users.events_of(a.user_id), hidden=self.users.hidden_of(a.user_id))
                for a in asked]

    def _answered(self, ranking: "Ranking", asked: list[Asked], vectors: dict[str, np.ndarray]) -> list[Answered]:
        from shoprank.recsys.answer import answer_many

        with self.lock:
            return answer_many(self.retrieval, ranking, asked, vectors, self.exploration)

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
        # in a thread: the catalogue's lock may be held a moment by a change being applied
        answered = await asyncio.to_thread(self._answered, ranking, asked, vectors)
        return [dataclasses.replace(answer, replica=self.replica) for answer in answered]
