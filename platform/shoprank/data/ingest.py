"""The ingest stage: bring a source's records into the run as Parquet, validated.

Whatever the source (the simulated shop, the ESCI files, a shop's own CSV /
Parquet / JSON Lines), the run ends up with ``data/records/{products,events,
judgments}`` in exactly the record schemas of :mod:`shoprank.data.schema`, and
every deliberate drop counted in the manifest.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import ray
from ray.data import SaveMode

from shoprank.config import Config, SyntheticShopConfig
from shoprank.data import synthetic
from shoprank.data.io import PartFilenames, count_rows, write_table
from shoprank.privacy import INGEST_KEY_ID, Pseudonyms, pseudonyms
from shoprank.store.run import Run, StageRecord

log = logging.getLogger(__name__)

RECORDS = ("data", "records")
SHOP = ("data", "shop")
TABLES = ("products", "events", "judgments")


def ingest_outputs(config: Config) -> list[str]:
    """Paths (relative to the run) the ingest stage writes."""
    outputs = ["/".join((*RECORDS, t)) for t in TABLES]
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


def ingest(config: Config, run: Run, record: StageRecord) -> None:
    """Fill ``data/records`` from the configured source, users pseudonymous (:mod:`shoprank.privacy`), and report
    rows, drops and the pseudonym key's id (the app checks it is serving with the same key)."""
    source = config.source
    users = pseudonyms(config)
    record.metrics[INGEST_KEY_ID] = users.key_id
    if source.kind == "synthetic":
        record.timings.update(generate_shop(source.synthetic, run, users))
    else:
        from shoprank.data.readers import read_esci, read_files

        if source.kind == "esci":
            tables = read_esci(source.esci, orphan_events=source.orphan_events)
        else:
            assert source.files is not None  # checked by the config
            tables = read_files(source.files, orphan_events=source.orphan_events, users=users)
        for name in TABLES:
            write_table(run, users.table(getattr(tables, name)), *RECORDS, name)
        record.drops.update(tables.drops)
        for reason, count in tables.drops.items():
            if count:
                log.warning("ingest dropped %d rows: %s", count, reason)
    for name in TABLES:
        record.rows[name] = count_rows(run, *RECORDS, name)
