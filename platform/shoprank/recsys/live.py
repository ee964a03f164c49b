"""A variant's catalogue following the catalogue change log, free of Ray.

The catalogue change log (``EventStore.catalogue_changes``) holds every product put or deleted since the run's
data; :class:`LiveCatalogue` applies its entries to a loaded :class:`~shoprank.recsys.context.RankingContext`
in place, so the next answer searches, recommends, features and shows the catalogue as changed:

* a **put** of a new product appends a row everywhere the catalogue has one (statistics, vectors, texts, the
  item-item weights, the recent windows, the judged counts): its statistics are those
  :func:`~shoprank.recsys.features.product_stats` gives a product no event names (no counts, every rate
  missing, never a ratio over zero), its vector goes to the catalogue's delta FAISS index and its text to the
  delta BM25 (:class:`~shoprank.recsys.retrieval.DeltaLexical`), both searched beside the run's indices; a put
  of a known product replaces its row in place (re-embedded only when its text changed, so a re-put of a run
  product never moves its vector);
* a **delete** unlists the row (``Catalogue.alive``): every candidate source leaves it out, its statistics stay
  readable for the histories that name it;
* then the categories' median prices and popularity ranks and the popular sources' orders are recomputed, over
  the listed products only, so the live catalogue's features are those of a catalogue built with the changes.

Products are normalised (:func:`shoprank.data.catalogue.normalised_products`) and their texts made
(:func:`shoprank.encoder.text.product_texts`) exactly as the preprocess and embed stages do. Embedding runs in
:meth:`LiveCatalogue.prepare`, apart from :meth:`LiveCatalogue.commit`, so a replica embeds outside the lock its
answers take and holds the lock only while the arrays change. The Serve replica's follower
(:mod:`shoprank.serving.catalogue_state`), :class:`~shoprank.recsys.answer.VariantPipeline` and the benchmarks
call it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np

from shoprank.data.catalogue import normalised_products, products_table
from shoprank.encoder.categories import Neighbours
from shoprank.encoder.text import product_texts
from shoprank.errors import ShopRankError
from shoprank.recsys.context import RankingContext
from shoprank.recsys.diversity import NO_GROUP, group_codes
from shoprank.recsys.features import _codes, department_of
from shoprank.recsys.retrieval import Catalogue, main_indices
from shoprank.store.events import CatalogueChange

Embed = Callable[[list[str]], np.ndarray]
"""Product texts -> their vectors (rows), with the variant's own encoder at ``encoder.max_length``."""
Categorise = Callable[[np.ndarray], list["str | None"]]
"""Product vectors -> a category path for each (None: no guess): the fine-tuned encoder's category head
(:class:`shoprank.encoder.categories.CategoryHead`)."""


def labelled_neighbours(catalogue: Catalogue, neighbours: int) -> Neighbours:
    """:class:`Neighbours` over a served catalogue's listed products whose category is the catalogue's own (not a
    prediction): their vectors as the variant's encoder embedded them. The caller holds the lock under which the
    catalogue changes."""
    listing = catalogue.listing
    if listing is None:
        return Neighbours(np.zeros((0, catalogue.vectors.shape[1]), np.float32), [], neighbours)
    rows = [row for row, (category, predicted) in enumerate(zip(listing.category, listing.category_predicted))
            if category is not None and not predicted and catalogue.alive[row]]
    return Neighbours(catalogue.vectors[rows].astype(np.float32), [listing.category[row] for row in rows], neighbours)


@dataclass
class PreparedChanges:
    """A batch of changes, coalesced, normalised and embedded: all :meth:`LiveCatalogue.commit` has left to do is
    change the arrays."""

    puts: list[dict]
    """Each put product's normalised row (``product_id``, ``title``, ``category``, ``brand``, ``price``,
    ``category_predicted``: the category is the replica's guess)."""
    texts: list[str]
    vectors: list[np.ndarray | None]
    """Each put's vector; None where its text is the one the catalogue holds (no re-embedding)."""
    put_at_s: list[float]
    deletes: list[str]
    last_seq: int


class LiveCatalogue:
    """A context's catalogue changed in place by the catalogue change log (see the module docstring).

    ``embed`` embeds product texts with the variant's own encoder; ``categorise`` (None: not available) fills the
    category of a put product that has none. :attr:`cursor` is the last change applied.
    """

    def __init__(self, context: RankingContext, embed: Embed, categorise: Categorise | None = None) -> None:
        catalogue = context.catalogue
        if catalogue.listing is None:
            raise ShopRankError("this ranking context's catalogue has no listing (assemble_context gives one): "
                                "a live catalogue shows what it changed")
        self.context = context
        self.catalogue = catalogue
        self.embed = embed
        self.categorise = categorise
        self.cursor = 0
        self._index_codes()

    def _index_codes(self) -> None:
        """The code :func:`~shoprank.recsys.features.product_stats` gave each category, department and brand."""
        stats, listing = self.catalogue.stats, self.catalogue.listing
        assert listing is not None
        self.category_code = {c or "": int(code) for c, code in zip(listing.category, stats.category)}
        self.department_code = {department_of(c): int(code) for c, code in zip(listing.category, stats.department)}
        self.brand_code = {b or "": int(code) for b, code in zip(listing.brand, stats.brand)}
        self.brand_group_code = {name: i for i, name in enumerate(stats.brand_names)}

    def _recode(self) -> None:
        """Codes for every product again, as ``product_stats`` gives them over the catalogue as it is now: a value
        first put live sorts among the others, so that code order (which breaks ties between favourite categories)
        is the one a rebuilt catalogue has."""
        stats, listing = self.catalogue.stats, self.catalogue.listing
        assert listing is not None
        stats.category = _codes(listing.category)
        stats.department = _codes([department_of(c) for c in listing.category])
        stats.brand = _codes(listing.brand)
        stats.brand_group, stats.brand_names = group_codes(listing.brand)
        self._index_codes()

    def compact(self, lock: AbstractContextManager) -> None:
        """Rebuild the main FAISS and BM25 indices over the listed products (``encoder``-free, seconds for a large
        catalogue) and swap them in: the delta indices empty again, withdrawn rows leave the main ones, and BM25's
        statistics count the live texts. ``lock`` (the readers') is held for the snapshot and the swap only;
        changes committed meanwhile stay in the delta indices."""
        catalogue = self.catalogue
        with lock:
            rows, vectors, texts = catalogue.snapshot()
        try:
            built = main_indices(rows, vectors, texts, self.context.config.embed, catalogue.bm25_k1, catalogue.bm25_b)
        except BaseException:
            with lock:
                catalogue.forget_snapshot()
            raise
        with lock:
            catalogue.compacted(built)

    @property
    def products(self) -> int:
        """Listed products."""
        return int(self.catalogue.alive.sum())

    def apply(self, changes: Sequence[CatalogueChange]) -> dict[str, int]:
        """Apply ``changes`` (in sequence order); how many puts and deletes changed the catalogue."""
        return self.commit(self.prepare(changes))

    def prepare(self, changes: Sequence[CatalogueChange]) -> PreparedChanges:
        """``changes`` coalesced to the last one per product, the puts normalised and their new texts embedded.
        Reads the catalogue's texts and vectors; only the thread that commits may change them meanwhile."""
        last: dict[str, CatalogueChange] = {}
        for change in changes:
            last.pop(change.product_id, None)
            last[change.product_id] = change
        puts = [c for c in last.values() if c.op == "put"]
        deletes = [c.product_id for c in last.values() if c.op == "delete"]
        config = self.context.config
        table = normalised_products(products_table([c.product for c in puts]), {}, config.preprocess.description_chars)
        texts = product_texts(table, config.encoder)
        rows = [self.catalogue.stats.row_of.get(c.product_id) for c in puts]
        changed = [i for i, (row, text) in enumerate(zip(rows, texts)) if row is None or self.catalogue.texts[row] != text]
        embedded = self.embed([texts[i] for i in changed]) if changed else np.zeros((0, 0), np.float32)
        vectors: list[np.ndarray | None] = [None] * len(puts)
        for i, vector in zip(changed, embedded):
            vectors[i] = np.asarray(vector, np.float32)
        products = table.select(["product_id", "title", "category", "brand", "price"]).to_pylist()
        for product in products:
            product["category_predicted"] = False
        unknown = [i for i, p in enumerate(products) if p["category"] is None]
        if self.categorise is not None and unknown:
            current = [vectors[i] if vectors[i] is not None else self.catalogue.vectors[rows[i]] for i in unknown]
            for i, category in zip(unknown, self.categorise(np.stack(current))):
                # the replica's guess, shown as one; the log keeps the product's own null
                products[i]["category"], products[i]["category_predicted"] = category, category is not None
        return PreparedChanges(products, texts, vectors, [c.ts_s for c in puts], deletes,
                               changes[-1].seq if len(changes) else self.cursor)

    def commit(self, prepared: PreparedChanges) -> dict[str, int]:
        """Change the catalogue as ``prepared`` says (the caller holds whatever lock its readers take)."""
        catalogue, stats = self.catalogue, self.catalogue.stats
        listing = catalogue.listing
        assert listing is not None
        new = [i for i, p in enumerate(prepared.puts) if p["product_id"] not in stats.row_of]
        if new:
            stats.append_unseen([prepared.puts[i]["product_id"] for i in new])
            catalogue.extend(np.array([prepared.put_at_s[i] for i in new], np.float64))
        unknown_value = False
        for product, text, vector in zip(prepared.puts, prepared.texts, prepared.vectors):
            row = stats.row_of[product["product_id"]]
            category, brand = product["category"], product["brand"]
            brand_named = bool(brand and brand.strip())
            codes = (self.category_code.get(category or ""), self.department_code.get(department_of(category)),
                     self.brand_code.get(brand or ""), self.brand_group_code.get(brand) if brand_named else NO_GROUP)
            unknown_value |= None in codes
            category_code, department_code, brand_code, group_code = (-1 if c is None else c for c in codes)
            stats.describe(row, category=category_code, department=department_code, brand=brand_code,
                           brand_group=group_code, price=product["price"], has_category=bool(category),
                           has_brand=bool(brand))
            listing.put(row, product["title"], category, brand, product["price"], product["category_predicted"])
            catalogue.put(row, text, vector)
        if unknown_value:
            self._recode()
        deleted = 0
        for product_id in prepared.deletes:
            row = stats.row_of.get(product_id)
            if row is not None and catalogue.alive[row]:
                catalogue.withdraw(row)
                deleted += 1
        if not prepared.puts and not deleted:
            self.cursor = max(self.cursor, prepared.last_seq)
            return {"put": 0, "delete": 0}
        stats.price_within_categories(catalogue.alive)
        stats.rank_within_categories(catalogue.alive)
        catalogue.settle()
        self.cursor = max(self.cursor, prepared.last_seq)
        return {"put": len(prepared.puts), "delete": deleted}

