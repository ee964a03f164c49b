"""What the Serve deployments load, handed to them through ``.bind(...)``.

A deployment never builds its own loader: :func:`shoprank.serving.app.build_app` binds a
:class:`RunLoader` (the runs under ``run.root``, their registry and the run root's keys), and a
test binds an in-memory one (``tests/fake_shop.py``), so the app's routing, keys, validation and
erasure are exercised without a trained run. Two concerns, two protocols:

* :class:`VariantLoader`: what a variant's replica answers with (its run's context, its query
  encoder, its ranker) and where its registry alias points now (hot reload);
* :class:`ShopSource`: what the ingress needs of the shop (API keys, the pseudonym key, each
  run's catalogue and event log, the offline figures shown beside the A/B report).

A loader is pickled with the deployment's arguments, so it holds settings only (the config) and
loads in the replica that calls it. Its methods import the models' modules (PyTorch, FAISS,
XGBoost) when called: the ingress, which imports this module, never pays for them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

from shoprank.config import Config
from shoprank.data.catalogue import recorded_catalogue_seq
from shoprank.data.io import column_names, read_table
from shoprank.encoder.text import CATEGORY_HEAD
from shoprank.privacy import Pseudonyms, serving_pseudonyms
from shoprank.serving.keys import KeyRing, load_keyring
from shoprank.serving.variants import VariantSpec, offline_figures, resolve_variant
from shoprank.store.location import Location
from shoprank.store.registry import Registry
from shoprank.store.run import Run

if TYPE_CHECKING:
    import xgboost

    from shoprank.encoder.runtime import Embedder
    from shoprank.recsys.context import RankingContext
    from shoprank.recsys.diversity import Diversity
    from shoprank.encoder.categories import CategoryHead

PRODUCT_COLUMNS = ["product_id", "title", "category", "brand", "price", "category_predicted"]
"""What the ingress shows of a product in an answer, and prices the A/B report's revenue with (``category_predicted``:
the category is ingest's prediction, not the catalogue's)."""
EVENT_COLUMNS = ["user_id", "session_id", "product_id", "event_type", "ts", "quantity"]
"""What the ingress reads of a run's events: the serving clock, the users' summaries, what an erasure masks, the
shoppers' pre-period for CUPED (sessions and revenue, :func:`shoprank.experiment.report.run_pre_period`)."""


class VariantLoader(Protocol):
    """What a variant's replicas load: called in the replica, at its start and whenever its alias moves."""

    def resolve(self, variant: str, alias: str) -> VariantSpec:
        """Variant ``variant`` as its registry ``alias`` describes it now."""
        ...

    def context(self, spec: VariantSpec, *, encoder: bool) -> RankingContext:
        """The context of ``spec``'s run (catalogue, index, event log), with its query encoder when ``encoder``."""
        ...

    def embedder(self, spec: VariantSpec, device: str) -> Embedder:
        """``spec``'s query encoder alone, on ``device`` (a separate query encoder's deployment)."""
        ...

    def booster(self, spec: VariantSpec) -> xgboost.Booster | None:
        """``spec``'s ranker, or None when its strategy needs none (``retrieval``)."""
        ...

    def diversity(self, spec: VariantSpec) -> Diversity:
        """The diversity re-ranking ``spec``'s answers get: the strength its run's evaluation chose (or the config's
        fixed one), so live answers are cut as the offline figures were."""
        ...

    def catalogue_seq(self, spec: VariantSpec) -> int:
        """The last catalogue change ``spec``'s run folded in: its replicas follow the change log from there."""
        ...

    def categoriser(self, spec: VariantSpec) -> CategoryHead | None:
        """The fine-tuned encoder's category head where ``spec`` serves it and its run has one (``head.npz``); None
        otherwise. It fills in the category of a product put live without one (else the category stays null, which
        every stage handles) and answers ``/categorize`` (else the nearest labelled products do)."""
        ...


    def categorisation(self, spec: VariantSpec) -> dict[str, dict[str, float]]:
        """The categorisation figures of ``spec``'s run's evaluation (row -> top-1, top-3 on the held-out products,
        :mod:`shoprank.evaluation.categories`); empty where it has none. ``serve.categorize_method: auto`` reads
        them."""
        ...


class ShopSource(Protocol):
    """What the ingress reads of the shop: called in the ingress replica, at its start and when it is reconfigured."""

    def keyring(self) -> KeyRing:
        """The API keys and their roles."""
        ...

    def pseudonyms(self, runs: Iterable[str]) -> Pseudonyms:
        """The pseudonym key of the app, checked against the one each run in ``runs`` (URIs) was ingested under."""
        ...

    def products(self, run: str) -> pa.Table:
        """Run ``run``'s catalogue, :data:`PRODUCT_COLUMNS`."""
        ...

    def events(self, run: str) -> pa.Table:
        """Run ``run``'s event log, :data:`EVENT_COLUMNS`."""
        ...

    def offline(self, spec: VariantSpec) -> dict[str, Any]:
        """``spec``'s offline figures (its run's evaluation), shown beside the online ones."""
        ...

    def catalogue_seq(self, spec: VariantSpec) -> int:
        """The last catalogue change ``spec``'s run folded in: the ingress follows the change log from there."""
        ...


@dataclass(frozen=True)
class RunLoader:
    """Both loaders for the runs of ``config`` (``run.root``): what :func:`~shoprank.serving.app.build_app` binds."""

    config: Config

    def resolve(self, variant: str, alias: str) -> VariantSpec:
        return resolve_variant(Registry(Location(self.config.run.root).uri()), variant, alias)

    def context(self, spec: VariantSpec, *, encoder: bool) -> RankingContext:
        from shoprank.recsys.context import load_context

        return load_context(self.config, Run.from_uri(spec.run), zero_shot=spec.encoder == "zero_shot",
                            encoder=encoder, runtime=spec.runtime)

    def embedder(self, spec: VariantSpec, device: str) -> Embedder:
        from shoprank.encoder.runtime import load_embedder

        return load_embedder(self.config, Run.from_uri(spec.run), zero_shot=spec.encoder == "zero_shot",
                             runtime=spec.runtime, device=device)

    def booster(self, spec: VariantSpec) -> xgboost.Booster | None:
        if spec.strategy != "ranker":
            return None
        from shoprank.recsys.booster import load_ranker

        return load_ranker(Run.from_uri(spec.ranker_run).local_path("ranker", "model"))

    def diversity(self, spec: VariantSpec) -> Diversity:
        from shoprank.recsys.diversity import Diversity

        return Diversity.of(self.config, Run.from_uri(spec.run))

    def catalogue_seq(self, spec: VariantSpec) -> int:
        return recorded_catalogue_seq(Run.from_uri(spec.run))

    def categoriser(self, spec: VariantSpec) -> CategoryHead | None:
        run = Run.from_uri(spec.run)
        if spec.encoder != "fine_tuned" or not run.exists(*CATEGORY_HEAD):
            return None  # the pretrained encoder has no head; a run exported before head.npz has none to read
        from shoprank.encoder.categories import CategoryHead

        return CategoryHead.load(run.local_path(*CATEGORY_HEAD))

    def categorisation(self, spec: VariantSpec) -> dict[str, dict[str, float]]:
        evaluation = Run.from_uri(spec.run).manifest().get("stages", {}).get("evaluate", {})
        return evaluation.get("metrics", {}).get("categories", {}).get("rows", {})

    def keyring(self) -> KeyRing:
        return load_keyring(self.config)

    def pseudonyms(self, runs: Iterable[str]) -> Pseudonyms:
        return serving_pseudonyms(self.config, runs)

    def products(self, run: str) -> pa.Table:
        served = Run.from_uri(run)
        if "category_predicted" in column_names(served, "data", "products"):
            return read_table(served, "data", "products", columns=PRODUCT_COLUMNS)
        # a run preprocessed before categories were predicted: none of its categories is a prediction
        table = read_table(served, "data", "products", columns=PRODUCT_COLUMNS[:-1])
        return table.append_column("category_predicted", pa.array([False] * table.num_rows, pa.bool_()))

    def events(self, run: str) -> pa.Table:
        return read_table(Run.from_uri(run), "data", "events", columns=EVENT_COLUMNS)

    def offline(self, spec: VariantSpec) -> dict[str, Any]:
        return offline_figures(spec)
