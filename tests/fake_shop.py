"""A small shop held in memory, for the serving tests that need no trained run.

:class:`FakeShop` is both loaders the app's deployments are bound with
(:class:`~shoprank.serving.loaders.VariantLoader`, :class:`~shoprank.serving.loaders.ShopSource`): 36 products in
four categories, five shoppers with a few weeks of events, API keys and a pseudonym key, and a query encoder that
hashes words into a 32-dimensional space (deterministic, no model). Both variants rank by retrieval (no ranker to
train). The app itself is the real one: Ray Serve, HTTP, the event store in SQLite, the routing, keys, validation
and erasure of :mod:`shoprank.serving.routes`; what it answers is the real retrieval and ranking path
(:class:`~shoprank.recsys.context.RankingContext` built by ``assemble_context``, as ``load_context`` builds
it), over this data.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from shoprank.config import Config
from shoprank.encoder.text import product_texts
from shoprank.privacy import Pseudonyms
from shoprank.recsys.context import DenseIndex, RankingContext, assemble_context
from shoprank.recsys.diversity import Diversity
from shoprank.recsys.types import ProductStats
from shoprank.serving.keys import KeyRing, digest
from shoprank.serving.loaders import EVENT_COLUMNS as INGRESS_EVENT_COLUMNS
from shoprank.serving.loaders import PRODUCT_COLUMNS
from shoprank.serving.variants import VariantSpec

RUN = "memory://fake-shop"
"""The one "run" the fake shop serves: a name only, nothing is read from it."""
CATEGORIES = ("Kitchen > Cookware", "Kitchen > Knives", "Outdoors > Tents", "Outdoors > Lights")
BRANDS = ("Acme", "Borealis", "Cinder")
NOUNS = {"Cookware": ("skillet", "saucepan", "wok"), "Knives": ("chef knife", "paring knife", "cleaver"),
         "Tents": ("dome tent", "tunnel tent", "bivy"), "Lights": ("headlamp", "lantern", "torch")}
COLOURS = ("black", "red", "green")
SHOPPERS = tuple(f"U{i:06d}" for i in range(1, 6))
DIMENSIONS = 32
START = dt.datetime(2024, 3, 1, tzinfo=dt.timezone.utc)


class HashedWords:
    """A query encoder without a model: each word adds a fixed random unit vector (seeded by its hash)."""

    runtime = "torch"

    def embed(self, texts: list[str], max_length: int, batch_size: int = 128) -> np.ndarray:
        rows = np.zeros((len(texts), DIMENSIONS), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split()[:max_length]:
                seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little")
                rows[i] += np.random.default_rng(seed).standard_normal(DIMENSIONS).astype(np.float32)
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        return rows / np.where(norms > 0, norms, 1.0)


def products() -> pa.Table:
    """36 products: per category, each brand in each colour of one of its nouns."""
    rows = []
    for c, category in enumerate(CATEGORIES):
        nouns = NOUNS[category.split(" > ")[1]]
        for b, brand in enumerate(BRANDS):
            for k, colour in enumerate(COLOURS):
                noun = nouns[(b + k) % len(nouns)]
                rows.append({"product_id": f"P{len(rows):05d}", "title": f"{brand} {colour} {noun}",
                             "description": f"A {colour} {noun} by {brand}.", "category": category, "brand": brand,
                             "price": 10.0 + 5 * c + b + k, "attributes": [("colour", colour)]})
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("product_id", pa.string()), ("title", pa.string()), ("description", pa.string()), ("category", pa.string()),
        ("brand", pa.string()), ("price", pa.float64()), ("attributes", pa.map_(pa.string(), pa.string()))]))


def events(pseudonyms: Pseudonyms) -> pa.Table:
    """Each shopper's four weeks: a view every day of a product in their favourite category, a click every third
    day, a purchase every seventh; shopper ``U000001`` is the busiest (two a day)."""
    rows = []
    for s, shopper in enumerate(SHOPPERS):
        user = pseudonyms.of(shopper)
        for day in range(28):
            for repeat in range(2 if s == 0 else 1):
                product = f"P{(s % len(CATEGORIES)) * 9 + (day + repeat) % 9:05d}"
                kind = "purchase" if day % 7 == 6 else "click" if day % 3 == 2 else "view"
                rows.append({"user_id": user, "session_id": f"{user}-{day}", "product_id": product,
                             "event_type": kind, "ts": START + dt.timedelta(days=day, hours=s, minutes=repeat),
                             "split": "train"})
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("user_id", pa.string()), ("session_id", pa.string()), ("product_id", pa.string()),
        ("event_type", pa.string()), ("ts", pa.timestamp("us", tz="UTC")), ("split", pa.string())]))


@dataclass(frozen=True)
class FakeShop:
    """Both loaders over the in-memory shop: picklable (it holds settings and keys only; every table is built in
    the replica that asks for it)."""

    config: Config
    keys: dict[str, str]
    """Role -> API key."""
    user_key: bytes

    def specs(self) -> dict[str, VariantSpec]:
        """The experiment: ``A`` the zero-shot encoder, ``B`` the fine-tuned one, both ranked by retrieval."""
        return {name: self.resolve(name, name) for name in ("A", "B")}

    # VariantLoader

    def resolve(self, variant: str, alias: str) -> VariantSpec:
        return VariantSpec(name=variant, alias=alias, run=RUN, ranker_run=RUN, strategy="retrieval",
                           encoder="zero_shot" if variant == "A" else "fine_tuned")

    def context(self, spec: VariantSpec, *, encoder: bool) -> RankingContext:
        catalogue_table = products()

        def dense(stats: ProductStats) -> DenseIndex:
            vectors = HashedWords().embed(product_texts(catalogue_table, self.config.encoder), 64)
            index = faiss.IndexFlatIP(DIMENSIONS)
            index.add(vectors)
            return vectors, index, np.arange(len(vectors))

        return assemble_context(self.config, catalogue_table, events(Pseudonyms(self.user_key)), dense,
                                HashedWords() if encoder else None)

    def embedder(self, spec: VariantSpec, device: str) -> HashedWords:
        return HashedWords()

    def booster(self, spec: VariantSpec) -> None:
        return None

    def diversity(self, spec: VariantSpec) -> Diversity:
        return Diversity.of(self.config)  # no run, no evaluation: the config's fixed strength (auto: none)

    def catalogue_seq(self, spec: VariantSpec) -> int:
        return 0  # no run ingested any change: replicas and the ingress follow the whole log

    def categoriser(self, spec: VariantSpec) -> None:
        return None  # no fine-tuned encoder, no category head: a product put without a category keeps none, and
        # /categorize answers from the nearest labelled products

    def categorisation(self, spec: VariantSpec) -> dict[str, dict[str, float]]:
        return {}  # no evaluation

    # ShopSource

    def keyring(self) -> KeyRing:
        return KeyRing(tuple((role, role, digest(key)) for role, key in self.keys.items()))

    def pseudonyms(self, runs: Iterable[str]) -> Pseudonyms:
        return Pseudonyms(self.user_key)

    def products(self, run: str) -> pa.Table:
        table = products()  # every category the catalogue's own
        return table.append_column("category_predicted", pa.array([False] * table.num_rows)).select(PRODUCT_COLUMNS)

    def events(self, run: str) -> pa.Table:
        table = events(Pseudonyms(self.user_key))
        return table.append_column("quantity", pa.nulls(table.num_rows, pa.int32())).select(INGRESS_EVENT_COLUMNS)

    def offline(self, spec: VariantSpec) -> dict[str, Any]:
        return {"system": None, "ndcg@10": {}, "note": "an in-memory shop: no offline evaluation"}

