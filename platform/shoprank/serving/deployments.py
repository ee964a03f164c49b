"""Ray Serve deployments shared by both variants, and the HTTP ingress.

A search or recommendation has two hops behind Serve's HTTP proxy: the ingress, then the
variant's replica (:mod:`shoprank.serving.variant_deployments`, which loads the models and
reads the users' live events from its own cache of the event store).

* :class:`EventStoreWriter` owns the event store (SQLite or PostgreSQL); concurrent ``/events``
  requests are written in one transaction (``@serve.batch``), falling back to one
  transaction per request when a batch fails, so each request stays all or nothing;
  the ingress replicas' impressions arrive in batches, off the answers' path;
* :class:`Ingress` holds a replica's state for its FastAPI app (:mod:`shoprank.serving.routes`),
  which validates, routes to a variant (salted hash or forced), asks it, queues the answer's
  impressions (:mod:`shoprank.serving.impressions`) and answers.

None of them loads a model, so this module imports neither PyTorch nor the ranker: each of
these replicas starts in about a second of imports instead of ten.
Nothing here runs at import; :func:`shoprank.serving.app.build_app` binds the graph.
"""

import asyncio
import contextlib
import datetime as dt
import logging
import pathlib
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from shoprank.cluster import replica_grpc_on_loopback
from shoprank.config import Config
from shoprank.data.catalogue import normalised_products, products_table
from shoprank.data.schema import ENGAGEMENT_TYPES
from shoprank.errors import ConfigError, DataError, ShopRankError
from shoprank.experiment.guardrails import GuardrailWindow
from shoprank.experiment.plan import readout_planned_size
from shoprank.experiment.report import DECISION_METRIC, PrePeriod, ab_report, run_pre_period
from shoprank.experiment.sequential import UNPLANNED, PlannedSize
from shoprank.recsys.features import epoch_seconds
from shoprank.serving.impressions import ImpressionQueue
from shoprank.serving.loaders import PRODUCT_COLUMNS, ShopSource
from shoprank.serving.metrics import metered, record_dropped, record_split, record_waiting
from shoprank.serving.routes import http_api
from shoprank.serving.variants import VariantSpec
from shoprank.store.events import (
    CatalogueChange, EventStore, Impression, StoreBusy, checked_backup, is_server_database, open_event_writer, redacted,
    restore_sqlite,
)

log = logging.getLogger(__name__)

CATALOGUE_PAGE = 10_000
"""Catalogue changes an ingress replica reads from the change log at once (a replica started late pages through)."""


@serve.deployment
class EventStoreWriter:
    """The event store's writer (the one owner of an SQLite file, holding its writer lock); concurrent writes share a
    transaction. A restore (:meth:`restore`) pauses it: the calls it is serving finish, new ones are refused with
    :class:`StoreBusy` (a 503 with Retry-After at the ingress) until the backup is in place and the store reopened,
    so no request is answered 200 for a write the restore then loses."""

    def __init__(self, location: str) -> None:
        replica_grpc_on_loopback()
        self.location = location
        self.store = metered(open_event_writer(location))
        self.restoring = False
        self.in_use = 0
        self.idle = asyncio.Event()
        """Set while no call uses the store: what a restore waits for after it stops new calls."""
        self.idle.set()

    def reconfigure(self, settings: dict[str, Any]) -> None:
        self.append.set_max_batch_size(settings["batch_size"])

    @contextlib.asynccontextmanager
    async def _using(self) -> AsyncIterator[EventStore]:
        """The store for one call, or :class:`StoreBusy` while a restore is under way."""
        if self.restoring:
            raise StoreBusy("the event store is being restored from a backup")
        self.in_use += 1
        self.idle.clear()
        try:
            yield self.store
        finally:
            self.in_use -= 1
            if not self.in_use:
                self.idle.set()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def append(self, batches: list[list[dict]]) -> list[int | str]:
        """Per request: how many were stored, or why none were (each request all or nothing)."""
        async with self._using() as store:
            return await asyncio.to_thread(self._append, store, batches)

    @staticmethod
    def _append(store: EventStore, batches: list[list[dict]]) -> list[int | str]:
        if len(batches) > 1:
            try:
                store.append([event for batch in batches for event in batch])
                return [len(batch) for batch in batches]
            except DataError:
                pass  # one request's events are at fault: store each request alone
        results: list[int | str] = []
        for batch in batches:
            try:
                results.append(store.append(batch))
            except DataError as exc:
                results.append(str(exc))
        return results

    async def log_impressions(self, impressions: list[Impression], dropped: int, batch_id: str) -> bool:
        """An ingress replica's queued impressions, already batched (:class:`ImpressionQueue`); False when the store
        had this batch already (a retry after a lost answer)."""
        async with self._using() as store:
            return await asyncio.to_thread(store.log_impressions, impressions, dropped, batch_id)

    async def restore(self, backup: str, replace: bool) -> int | str:
        """Put an SQLite backup in place of the store (:func:`restore_sqlite`): the events it holds, or why nothing
        was restored. Calls already using the store finish first; new ones are refused until the store is open again."""
        if is_server_database(self.location):
            return (f"serve.event_db is a PostgreSQL server ({redacted(self.location)}): restore it with its own "
                    "tools (pg_restore, or your managed service's snapshots)")
        if self.restoring:
            return "a restore is already under way"
        try:
            await asyncio.to_thread(checked_backup, pathlib.Path(backup))  # a wrong file never pauses the writer
        except DataError as exc:
            return str(exc)
        self.restoring = True
        try:
            await self.idle.wait()
            return await asyncio.to_thread(self._restore, backup, replace)
        finally:
            self.restoring = False

    def _restore(self, backup: str, replace: bool) -> int | str:
        self.store.close()  # lets go of the writer lock, which the restore takes
        try:
            return restore_sqlite(backup, self.location, replace=replace)
        except ShopRankError as exc:
            return str(exc)
        finally:
            self.store = metered(open_event_writer(self.location))

    async def report(self, split: dict[str, float], prices: dict[str, float], pre_period: PrePeriod | None = None,
                     decision_metric: str = DECISION_METRIC, planned: PlannedSize = UNPLANNED,
                     control: str | None = None) -> dict[str, Any]:
        async with self._using() as store:
            report = await asyncio.to_thread(ab_report, store, split, control, prices=prices, pre_period=pre_period,
                                             decision_metric=decision_metric, planned=planned)
            report["impressions_dropped"] = await asyncio.to_thread(store.dropped_impressions)
        return report

    async def erase(self, user: str, at: dt.datetime) -> dict[str, int]:
        async with self._using() as store:
            return await asyncio.to_thread(store.erase, user, at)

    async def erasures(self, after: int) -> list[tuple[int, str]]:
        return await asyncio.to_thread(self.store.erasures, after)

    async def change_catalogue(self, puts: list[dict], deletes: list[str], at: dt.datetime, batch_id: str) -> int:
        """Append a batch of catalogue changes (:meth:`EventStore.change_catalogue`): all or nothing, once per
        ``batch_id``."""
        async with self._using() as store:
            return await asyncio.to_thread(store.change_catalogue, puts, deletes, at, batch_id)

    async def catalogue_changes(self, after: int, limit: int = 10_000) -> list[CatalogueChange]:
        async with self._using() as store:
            return await asyncio.to_thread(store.catalogue_changes, after, limit)

    async def last_catalogue_change(self) -> tuple[int, float]:
        async with self._using() as store:
            return await asyncio.to_thread(store.last_catalogue_change)

    async def catalogue_state(self, through: int) -> dict[str, dict | None]:
        async with self._using() as store:
            return await asyncio.to_thread(store.catalogue_state, through)

    async def purge(self, before: dt.datetime) -> dict[str, int]:
        async with self._using() as store:
            return await asyncio.to_thread(store.purge, before)

    async def shown(self, request_id: str) -> tuple[str, set[str]] | None:
        async with self._using() as store:
            return await asyncio.to_thread(store.shown, request_id)

    async def export(self, path: str) -> int:
        async with self._using() as store:
            return await asyncio.to_thread(store.export_parquet, path)

    async def counts(self) -> dict[str, int]:
        async with self._using() as store:
            events = await asyncio.to_thread(store.events)
            return {"events": events.num_rows, "impressions": len(await asyncio.to_thread(store.impressions))}


def user_summaries(table: pa.Table, products: dict[str, dict[str, Any]], recent: int = 20) -> list[dict[str, str]]:
    """Users by activity, each with "N events; mostly <category>; last: <event> <title>"."""
    events = table.to_pandas().sort_values(["user_id", "ts"], kind="stable")
    out = []
    for user, rows in sorted(events.groupby("user_id"), key=lambda kv: -len(kv[1])):
        tail = rows.tail(recent)
        categories = [products[p]["category"] for p in tail["product_id"] if p in products and products[p]["category"]]
        favourite = max(set(categories), key=categories.count) if categories else "-"
        engaged = rows[rows["event_type"].isin(ENGAGEMENT_TYPES)].tail(1)
        last = (f"; last: {engaged['event_type'].iat[0]} {products[engaged['product_id'].iat[0]]['title']}"
                if len(engaged) and engaged["product_id"].iat[0] in products else "")
        out.append({"user_id": user, "summary": f"{len(rows)} events; mostly {favourite}{last}"})
    return out


def shown_products(puts: list[dict[str, Any]], description_chars: int) -> dict[str, dict[str, Any]]:
    """Product -> what an answer shows of it (:data:`~shoprank.serving.loaders.PRODUCT_COLUMNS`), for record rows
    put through the catalogue change log: normalised as the preprocess stage normalises the run's products (no
    category label: the ingress shows none)."""
    if not puts:
        return {}
    rows = normalised_products(products_table(puts), {}, description_chars).select(PRODUCT_COLUMNS).to_pylist()
    return {row["product_id"]: row for row in rows}


@serve.deployment
@serve.ingress()
class Ingress:
    """The HTTP API (see :mod:`shoprank.serving.api`, its routes in :mod:`shoprank.serving.routes`, and
    docs/serving.md): this replica's state, which its app's routes read through ``app.state.ingress``. What it reads
    of the shop (keys, pseudonym key, catalogues, event logs, offline figures) comes from the bound ``source``."""

    def __init__(self, config: dict[str, Any], variants: dict[str, DeploymentHandle],
                 store: DeploymentHandle, source: ShopSource) -> None:
        replica_grpc_on_loopback()
        self.config = Config.model_validate(config)
        self.source = source
        self.keys = source.keyring()
        if not self.keys.entries:
            raise ConfigError(f"no API keys: serve.api_keys ({self.config.serve.api_keys} under run.root) is missing "
                              "and SHOPRANK_API_KEYS is empty; create them with `shoprank keys create`")
        self.guardrails = GuardrailWindow(self.config.serve.guardrail_window)
        """This replica's answers for the A/B guardrails, observed by its app's :class:`RequestMetrics`."""
        self.handles = variants
        self.store = store
        self.pseudonyms = source.pseudonyms(())
        """Every user id of a request is replaced by its pseudonym first: nothing past this point sees the id. The
        run root's key, never one made here; :meth:`reconfigure` checks it is the one the variants' runs recorded."""
        self.impressions = ImpressionQueue(self.store.log_impressions.remote, self.config.serve.impression_queue,
                                           on_drop=record_dropped, on_waiting=record_waiting)
        record_split(self.config.serve.split)
        self.shown: OrderedDict[str, tuple[str, frozenset[str]]] = OrderedDict()
        self.background: list[asyncio.Task] = []
        self.specs: dict[str, VariantSpec] = {}
        self.offline: dict[str, dict[str, Any]] = {}
        """Each variant's offline figures (its run's evaluation), shown beside the online ones."""
        self.products: dict[str, dict[str, Any]] = {}
        """Product -> what an answer shows of it (:data:`~shoprank.serving.loaders.PRODUCT_COLUMNS`): every product
        the served runs or the catalogue change log ever listed, deleted ones too (an event may still name them)."""
        self.prices: dict[str, float] = {}
        """Product -> price: the A/B report's revenue."""
        self.withdrawn: set[str] = set()
        """Products the change log deleted (and did not put again since)."""
        self.catalogue_cursor = 0
        """The last catalogue change applied to ``products``, ``prices`` and ``withdrawn``."""
        self.catalogue_lock = asyncio.Lock()
        """One read of the change log at a time: the poll and a request's read never apply a change twice."""
        self.clock_offset_s = 0.0
        self.users: list[dict[str, str]] = []
        self.planned = UNPLANNED
        """The A/B readout's planned size (:func:`~shoprank.experiment.plan.readout_planned_size`)."""
        self.pre_period: PrePeriod | None = None
        """The shoppers' history in the served runs' event log: CUPED's covariate in the A/B report."""
        self.run_events_of: Counter[str] = Counter()
        """User -> their events in the served runs' history: what an erasure masks on the variants."""
        self.erasure_cursor = 0
        """The last tombstone whose user left ``users`` and ``run_events_of``."""
        self.without_behaviour: set[str] = set()
        """Runs with no behaviour events (judged queries only): nothing there is popular or personal."""

    def __serve_build_asgi_app__(self) -> FastAPI:
        """This replica's own app (Serve calls it after ``__init__``): its middleware set from this replica's
        config, its routes reading this replica's state."""
        app = http_api(self.config.serve, self.guardrails)
        app.state.ingress = self
        return app

    def reconfigure(self, settings: dict[str, Any]) -> None:
        """The variants (from the registry, at deploy time): their products and the serving clock."""
        self.specs = {name: VariantSpec.model_validate(spec) for name, spec in settings["variants"].items()}
        self.pseudonyms = self.source.pseudonyms([spec.run for spec in self.specs.values()])
        self.offline = {name: self.source.offline(spec) for name, spec in self.specs.items()}
        self.planned = readout_planned_size(self.config.serve, self.offline)
        last_event_s = 0.0
        events_of_run = {}
        last_event_of_run: dict[str, float] = {}
        self.run_events_of = Counter()
        for run_uri in sorted({spec.run for spec in self.specs.values()}):
            for row in self.source.products(run_uri).to_pylist():
                self.products[row["product_id"]] = row
                self.prices[row["product_id"]] = row["price"]
            events = self.source.events(run_uri)
            ts = epoch_seconds(events.column("ts"))
            last_event_of_run[run_uri] = float(ts.max()) if len(ts) else 0.0
            last_event_s = max(last_event_s, last_event_of_run[run_uri])
            events_of_run[run_uri] = events
            if events.num_rows == 0:
                self.without_behaviour.add(run_uri)
            for counted in pc.value_counts(events.column("user_id")).to_pylist():
                self.run_events_of[counted["values"]] += counted["counts"]
        self.users = user_summaries(events_of_run[self.specs[sorted(self.specs)[-1]].run], self.products)
        # the log that reaches furthest: the variants' runs usually share one, and an update's log holds its parent's
        # events, so two logs would count a shopper's history twice
        latest = max(events_of_run, key=last_event_of_run.__getitem__)
        self.pre_period = run_pre_period(events_of_run[latest], self.prices, self.config.serve.cuped_pre_period_days)
        self.erasure_cursor = 0  # the lists are the run's again: every erasure so far leaves them at the next read
        # the catalogue is the runs' again: follow the change log from the earliest change a run has not folded in
        # (applying one a run has folded in already changes nothing)
        self.withdrawn = set()
        self.catalogue_cursor = min(self.source.catalogue_seq(spec) for spec in self.specs.values())
        if self.config.serve.clock == "data" and last_event_s:
            # from the deploy's moment, not this replica's start: every ingress replica (a restarted one too) keeps
            # the same clock, so impressions and erasures stamped by different replicas compare in time order
            self.clock_offset_s = settings["deployed_at_s"] - (last_event_s + 60.0)

    def now_s(self) -> float:
        return time.time() - self.clock_offset_s

    def start_background(self) -> None:
        """The impressions' flusher, the retention purge and the catalogue's follower, started on the replica's event
        loop by its first request."""
        if not self.background:
            self.background = [asyncio.create_task(self.impressions.run(self.config.serve.impression_flush_s)),
                               asyncio.create_task(self._purge_every(self.config.serve.purge_interval_s)),
                               asyncio.create_task(self._follow_catalogue_every(self.config.serve.catalogue_poll_s))]

    async def follow_catalogue(self) -> int:
        """Apply the catalogue changes stored since the last read to what this replica shows and checks (``products``,
        ``prices``, ``withdrawn``); the log's position after them. A put shows as the pipeline would show it (its
        text normalised by the preprocess stage's own function); a delete keeps the product's row, since events may
        still name it, and marks it withdrawn."""
        async with self.catalogue_lock:
            while True:
                changes = await self.store.catalogue_changes.remote(self.catalogue_cursor, CATALOGUE_PAGE)
                shown = shown_products([change.product for change in changes if change.op == "put"],
                                       self.config.preprocess.description_chars)
                for change in changes:
                    if change.op == "put":
                        self.products[change.product_id] = shown[change.product_id]
                        self.prices[change.product_id] = change.product["price"]
                        self.withdrawn.discard(change.product_id)
                    else:
                        self.withdrawn.add(change.product_id)
                    self.catalogue_cursor = change.seq
                if len(changes) < CATALOGUE_PAGE:
                    return self.catalogue_cursor

    async def _follow_catalogue_every(self, interval_s: float) -> None:
        """Follow the catalogue change log every ``interval_s`` (``serve.catalogue_poll_s``), so a product put through
        another ingress replica is known here within that long."""
        while True:
            try:
                await self.follow_catalogue()
            except Exception as exc:  # the store restoring or restarting: the next poll reads on from the cursor
                log.warning("reading the catalogue change log failed (%s); retrying in %.2f s", exc, interval_s)
            await asyncio.sleep(interval_s)

    async def _purge_every(self, interval_s: float) -> None:
        """Delete what is older than ``serve.retention_days`` now, then every ``interval_s``."""
        while True:
            before = dt.datetime.fromtimestamp(self.now_s() - self.config.serve.retention_days * 86_400,
                                               dt.timezone.utc)
            try:
                purged = await self.store.purge.remote(before)
                if any(purged.values()):
                    log.info("retention: purged %s dated before %s", purged, before.isoformat(timespec="seconds"))
            except Exception:
                log.exception("retention purge failed; retrying in %.0f s", interval_s)
            await asyncio.sleep(interval_s)

    async def forget_erased(self) -> None:
        """Drop the users erased since the last read from what this replica lists: the store's tombstones, so an
        erasure answered by any ingress replica reaches every one."""
        erased: set[str] = set()
        for self.erasure_cursor, user in await self.store.erasures.remote(self.erasure_cursor):
            erased.add(user)
            self.run_events_of.pop(user, None)
            if self.pre_period is not None:  # a shopper erased is a new shopper: no history predicts them
                self.pre_period.totals.pop(user, None)
        if erased:
            self.users = [u for u in self.users if u["user_id"] not in erased]

    async def __del__(self) -> None:
        """On a graceful shutdown, the queued impressions go to the store first (Serve awaits this)."""
        for task in self.background:
            task.cancel()
        try:
            await self.impressions.flush()
        except Exception:
            log.exception("%d impressions could not be written at shutdown", self.impressions.held)
