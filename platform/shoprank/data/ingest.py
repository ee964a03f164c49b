"""The ingest stage: bring a source's records into the run as Parquet, validated.

Whatever the source (the simulated shop, the ESCI files, a shop's own CSV /
Parquet / JSON Lines), the run ends up with ``data/records/{products,events,
judgments}`` in exactly the record schemas of :mod:`shoprank.data.schema`, and
every deliberate drop counted in the manifest.

Shoppers erased from the event store (``DELETE /users/{id}``: a tombstone there, by
pseudonym) are left out of every table ingest writes, so nothing after it (features,
encoder, ranker, evaluation) sees them again. The last tombstone's number is part of
the stage's identity (:func:`erasure_mark`): a new erasure makes the next pipeline run
ingest again, and every later stage rebuild without the shopper.

The catalogue change log (``PUT /products``, ``DELETE /products/{id}``, ``shoprank catalogue
sync``) is folded into the source's products the same way (:func:`fold_catalogue_log`): its
last change is part of the stage's identity (:func:`catalogue_mark`), so retraining learns the
products put since the last run and forgets the deleted ones; the change folded up to is
recorded (``catalogue_seq``), where the replicas serving the run start to follow the log.

Then the stage's second step (:mod:`shoprank.encoder.fill`, ``source.categories``) gives a product without a category
(a catalogue with gaps, or one put through the log without) the category its nearest labelled products vote for,
listed in ``data/records/category_predictions``, so every later stage can tell a predicted category from the
catalogue's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import SaveMode

from shoprank.config import Config, SyntheticShopConfig
from shoprank.data import synthetic
from shoprank.data.catalogue import CATALOGUE_SEQ, products_table
from shoprank.data.io import PartFilenames, column_names, count_rows, read_table, write_table
from shoprank.data.schema import conform
from shoprank.errors import ConfigError
from shoprank.privacy import INGEST_KEY_ID, Pseudonyms, pseudonyms
from shoprank.store.events import EventStore, event_db_location, is_server_database, open_event_store
from shoprank.store.run import Run, StageRecord

log = logging.getLogger(__name__)

RECORDS = ("data", "records")
SHOP = ("data", "shop")
TABLES = ("products", "events", "judgments")
PREDICTIONS = (*RECORDS, "category_predictions")
"""Where ingest lists the products whose category it predicted (:mod:`shoprank.encoder.fill`, the stage's second
step)."""
PREDICTION_SCHEMA = pa.schema([pa.field("product_id", pa.string(), nullable=False),
                               pa.field("category", pa.string(), nullable=False),
                               pa.field("votes", pa.float64(), nullable=False)])


def ingest_outputs(config: Config) -> list[str]:
    """Paths (relative to the run) the ingest stage writes."""
    outputs = ["/".join((*RECORDS, t)) for t in TABLES] + ["/".join(PREDICTIONS)]
    if config.source.kind == "synthetic":
        outputs += ["/".join((*SHOP, t)) for t in ("users", "queries")]
    return outputs


def _render_block(batch: dict[str, np.ndarray], shop: SyntheticShopConfig, table: str,
                  users: Pseudonyms) -> pa.Table:
    """Records of one block of chunks (users pseudonymous); the (cheap, numeric) ground truth is rebuilt per
    block."""
    if table == "products":
        catalog = synthetic.build_catalog(shop)
        size, total = synthetic.PRODUCT_CHUNK, shop.num_products

        def render(chunk: int, start: int, stop: int) -> pa.Table:
            return synthetic.render_products(catalog, start, stop)
    else:
        render = synthetic.ShopModel.build(shop).sessions
        size, total = synthetic.SESSION_CHUNK, shop.num_sessions
    return users.table(pa.concat_tables(
        [render(int(c), int(c) * size, min((int(c) + 1) * size, total)) for c in batch["id"]]
    ))


def _generate_table(shop: SyntheticShopConfig, run: Run, table: str, total: int, chunk_size: int,
                    users: Pseudonyms) -> float:
    """Render ``table`` with Ray Data, one task per block of chunks; returns seconds."""
    started = time.perf_counter()
    chunks = max(1, -(-total // chunk_size))
    (
        ray.data.range(chunks, override_num_blocks=min(shop.num_blocks, chunks))
        .map_batches(_render_block, fn_kwargs={"shop": shop, "table": table, "users": users}, batch_size=None, batch_format="numpy")
        .write_parquet(run.uri(*RECORDS, table), filename_provider=PartFilenames(), mode=SaveMode.OVERWRITE,
                       filesystem=run.filesystem_for_ray)
    )
    return round(time.perf_counter() - started, 3)


def generate_shop(shop: SyntheticShopConfig, run: Run, users: Pseudonyms) -> dict[str, float]:
    """Generate the simulated shop into the run with Ray Data, in parallel blocks.

    Products and sessions are rendered by Ray tasks, one per block of chunks; the
    query pool, judgments and users' hidden tastes are small and written from the
    driver. Every table names users by pseudonym, the hidden tastes (``data/shop/users``,
    which the platform never serves) too: the simulator rebuilds its shoppers from the
    config, not from the run, so the run holds no raw id at all. Returns timings per part.
    """
    timings = {
        "products_s": _generate_table(shop, run, "products", shop.num_products, synthetic.PRODUCT_CHUNK, users),
        "events_s": _generate_table(shop, run, "events", shop.num_sessions, synthetic.SESSION_CHUNK, users),
    }
    started = time.perf_counter()
    model = synthetic.ShopModel.build(shop)
    write_table(run, model.judgments(), *RECORDS, "judgments")
    write_table(run, users.table(synthetic.users_table(model.users)), *SHOP, "users")
    write_table(run, synthetic.queries_table(model.queries), *SHOP, "queries")
    timings["judgments_users_s"] = round(time.perf_counter() - started, 3)
    return timings


@contextmanager
def _existing_event_store(config: Config) -> Iterator[EventStore | None]:
    """The event store ``serve.event_db`` names, or None where there is none: an SQLite file not made yet (reading
    must not create one), or a run root on remote storage with a relative ``serve.event_db``, where no SQLite store
    can be."""
    try:
        location = event_db_location(config)
    except ConfigError:
        yield None
        return
    if not is_server_database(location) and not Path(location).exists():
        yield None
        return
    store = open_event_store(location)
    try:
        yield store
    finally:
        store.close()


def erasure_mark(config: Config) -> int:
    """The event store's last tombstone (0: none, or no store): part of the ingest stage's identity, so that the
    next pipeline run after an erasure ingests again without the shopper."""
    with _existing_event_store(config) as store:
        return store.last_erasure() if store is not None else 0


def catalogue_mark(config: Config) -> int:
    """The event store's last catalogue change (0: none, or no store): part of the ingest stage's identity, so that
    the next pipeline run after a catalogue change ingests again with it."""
    with _existing_event_store(config) as store:
        return store.last_catalogue_change()[0] if store is not None else 0


def catalogue_identity(config: Config) -> dict[str, int]:
    """The ingest stage's identity setting for the catalogue log: its last change, or nothing while it has none, so
    that runs ingested before the log existed stay valid until a first change."""
    mark = catalogue_mark(config)
    return {"catalogue": mark} if mark else {}


class Folded(NamedTuple):
    """What folding the catalogue change log into a run's records did."""

    put: int
    """Products the log put (each replaced the source's row of its id, or was added)."""
    drops: dict[str, int]
    """Rows dropped per table for a deleted product: ``products_deleted_by_the_catalogue_log``,
    ``events_of_withdrawn_products``, ``judgments_of_withdrawn_products``."""


def fold_catalogue_log(config: Config, run: Run, mark: int) -> Folded:
    """Apply the catalogue change log up to change ``mark`` to the products ingest wrote: a product put replaces the
    source's row of that id (in its place) or is appended (in the log's order); a deleted one leaves, and so do the
    events and judgments naming it (a recalled product must not come back through training rows)."""
    with _existing_event_store(config) as store:
        state = store.catalogue_state(mark) if store is not None and mark else {}
    if not state:
        return Folded(0, {})
    put = {product_id: row for product_id, row in state.items() if row is not None}
    deleted = pa.array(sorted(product_id for product_id, row in state.items() if row is None), pa.string())
    products = read_table(run, *RECORDS, "products")
    changed = products_table(list(put.values()))
    ids = products.column("product_id").to_pylist()
    listed = set(ids)
    put_at = {product_id: len(ids) + j for j, product_id in enumerate(put)}
    order = [put_at.get(product_id, i) for i, product_id in enumerate(ids)]
    order += [row for product_id, row in put_at.items() if product_id not in listed]
    merged = pa.concat_tables([conform(products, "products"), changed]).take(pa.array(order, pa.int64()))
    folded = merged.filter(pc.invert(pc.is_in(merged.column("product_id"), value_set=deleted)))
    drops = {"products_deleted_by_the_catalogue_log": merged.num_rows - folded.num_rows}
    replace_records(run, folded, "products")
    for name in ("events", "judgments"):
        table = read_table(run, *RECORDS, name)
        kept = table.filter(pc.invert(pc.is_in(table.column("product_id"), value_set=deleted)))
        drops[f"{name}_of_withdrawn_products"] = table.num_rows - kept.num_rows
        if kept.num_rows < table.num_rows:
            replace_records(run, kept, name)
    return Folded(len(put), drops)


def replace_records(run: Run, table: pa.Table, name: str) -> None:
    """Write ``table`` as the run's records of ``name`` (Ray Data may have written them in parts: all are replaced)."""
    run.remove(*RECORDS, name)
    write_table(run, table, *RECORDS, name)


def leave_out_erased(config: Config, run: Run, users: Pseudonyms) -> dict[str, int]:
    """Drop the erased shoppers' rows from every table ingest wrote that names users (by pseudonym, or by a
    simulated shopper's own id); rows dropped per table, as ``<table>_of_erased_shoppers`` (none: no tombstone)."""
    with _existing_event_store(config) as store:
        erased = pa.array(sorted({user for _, user in store.erasures(0)}) if store is not None else [], pa.string())
    if not len(erased):
        return {}
    drops: dict[str, int] = {}
    for output in ingest_outputs(config):
        parts = output.split("/")
        if tuple(parts) == PREDICTIONS:  # written after this step, by the category fill; it names no shopper
            continue
        if "user_id" not in column_names(run, *parts):
            continue
        table = read_table(run, *parts)
        kept = table.filter(pc.invert(pc.is_in(users.column(table.column("user_id")), value_set=erased)))
        drops[f"{parts[-1]}_of_erased_shoppers"] = table.num_rows - kept.num_rows
        if kept.num_rows < table.num_rows:
            run.remove(*parts)  # Ray Data wrote it in parts: the kept rows replace them all
            write_table(run, kept, *parts)
    return drops


def ingest(config: Config, run: Run, record: StageRecord) -> None:
    """Fill ``data/records`` from the configured source, users pseudonymous (:mod:`shoprank.privacy`) and erased
    shoppers left out, and report rows, drops and the pseudonym key's id (the app checks it is serving with the same
    key)."""
    source = config.source
    users = pseudonyms(config)
    record.metrics[INGEST_KEY_ID] = users.key_id
    if source.kind == "synthetic":
        record.timings.update(generate_shop(source.synthetic, run, users))
    else:
        from shoprank.data.readers import reader_for

        tables = reader_for(source).read(orphan_events=source.orphan_events, users=users)
        for name in TABLES:
            write_table(run, users.table(getattr(tables, name)), *RECORDS, name)
        record.drops.update(tables.drops)
        for reason, count in tables.drops.items():
            if count:
                log.warning("ingest dropped %d rows: %s", count, reason)
    mark = catalogue_mark(config)
    record.metrics[CATALOGUE_SEQ] = mark
    folded = fold_catalogue_log(config, run, mark)
    record.metrics["products_put_from_the_catalogue_log"] = folded.put
    record.drops.update(folded.drops)
    if folded.drops:
        log.info("ingest folded the catalogue change log up to change %d in: %d products put, %s", mark, folded.put,
                 folded.drops)
    erased = leave_out_erased(config, run, users)
    record.drops.update(erased)
    if any(erased.values()):
        log.info("ingest left out the shoppers erased from the event store: %s", erased)
    for name in TABLES:
        record.rows[name] = count_rows(run, *RECORDS, name)
