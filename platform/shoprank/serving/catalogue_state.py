"""A variant replica's catalogue following the catalogue change log: the products' analogue of
:mod:`shoprank.serving.user_state`.

The event store's catalogue change log (``catalogue_changes``, written by ``PUT /products``, ``DELETE
/products/{id}`` and ``shoprank catalogue sync``) is the one source of truth; every variant replica applies it to
its own catalogue (:class:`~shoprank.recsys.live.LiveCatalogue`):

* **replay** at start, from the run's mark (the last change the run's data holds) to the log's end, before the
  replica reports ready: a replica started later has every change;
* **catch up** before each batch of requests, so a 200 from ``PUT``/``DELETE`` shows in the very next answer on
  any replica; and every ``serve.catalogue_poll_s`` from a daemon thread, so an idle replica is current within a
  second;
* changes are read in pages, coalesced to the last one per product, normalised and embedded **outside** the
  replica's lock (embedding takes the time), then applied under it: answers never see a half-applied batch;
* **lag**: from the moment a catch-up sees a change it has not applied, how long until it has (0 when caught
  up). Measured on this replica's monotonic clock, not against the change's time stamp: that is the app's
  clock, which under ``serve.clock: data`` runs far from this process's.

Ray-free: the variant deployment holds one, and the tests drive it with a store of their own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from shoprank.recsys.live import LiveCatalogue
    from shoprank.store.events import CatalogueChange

log = logging.getLogger(__name__)

PAGE = 10_000
"""Changes read per query (as the user caches read events)."""


class CatalogueLog(Protocol):
    """What the follower reads of the event store (``EventStore`` has it; a test's store may too)."""

    def catalogue_changes(self, after: int, limit: int = PAGE) -> list[CatalogueChange]: ...

    def last_catalogue_change(self) -> tuple[int, float]: ...


class CatalogueFollower:
    """Applies the change log after ``start_seq`` to ``live``, holding ``lock`` (the one the replica's answers take)
    only while the catalogue changes (see the module docstring)."""

    def __init__(self, store: CatalogueLog, live: LiveCatalogue, lock: threading.Lock, start_seq: int,
                 compact_rows: int | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.live = live
        self.lock = lock
        self.compact_rows = compact_rows
        """``serve.catalogue_compact_rows``: past this many rows outside the main indices, rebuild them in the
        background (None: never)."""
        self.clock = clock
        self.compaction: threading.Thread | None = None
        self.live.cursor = max(self.live.cursor, start_seq)
        self.pending_since: float | None = None
        """When a catch-up first saw a change not yet applied (None: caught up)."""
        self.applied = {"put": 0, "delete": 0}
        """Puts and deletes that changed this replica's catalogue, in all."""
        self._catching_up = threading.Lock()  # the poll thread and a batch's catch-up take turns

    @property
    def cursor(self) -> int:
        return self.live.cursor

    def catch_up(self, wait_s: float | None = None) -> dict[str, int]:
        """Apply every change stored since the cursor; the puts and deletes that changed the catalogue.

        ``wait_s`` (a batch of requests'): while another catch-up is under way (the poll thread embedding a large
        sync), wait at most this long for it, then apply nothing: the batch is answered from the catalogue as it
        is, not held for minutes behind an embedding. A small change the poll thread is applying is done well
        within it, so a 200 from ``PUT`` still shows in the next answer."""
        applied = {"put": 0, "delete": 0}
        if not self._catching_up.acquire(timeout=-1 if wait_s is None else wait_s):
            return applied
        try:
            self._catch_up(applied)
        finally:
            self._catching_up.release()
        if (self.compact_rows is not None and self.live.catalogue.outdated() >= self.compact_rows
                and (self.compaction is None or not self.compaction.is_alive())):
            self.compaction = threading.Thread(target=self._compact, daemon=True, name="catalogue-compaction")
            self.compaction.start()
        return applied

    def _catch_up(self, applied: dict[str, int]) -> None:
        """:meth:`catch_up`'s work, its caller holding the turn."""
        last_seq, _ = self.store.last_catalogue_change()
        if last_seq <= self.live.cursor:
            self.pending_since = None
            return
        if self.pending_since is None:
            self.pending_since = self.clock()
        while True:
            changes = self.store.catalogue_changes(self.live.cursor, limit=PAGE)
            if not changes:
                break
            prepared = self.live.prepare(changes)  # normalising and embedding: outside the lock
            with self.lock:
                counts = self.live.commit(prepared)
            for op, count in counts.items():
                applied[op] += count
                self.applied[op] += count
            if len(changes) < PAGE:
                break
        if self.live.cursor >= last_seq:
            self.pending_since = None

    def _compact(self) -> None:
        started = time.monotonic()
        try:
            self.live.compact(self.lock)
        except Exception:  # answers stay right without it, only slower: the next catch-up tries again
            log.exception("catalogue compaction failed")
            return
        log.info("catalogue compacted: %d products in the main indices (%.1f s)", self.live.products,
                 time.monotonic() - started)

    def lag_s(self) -> float:
        """How long a change this replica knows of has waited to be applied (0: caught up)."""
        pending = self.pending_since
        return 0.0 if pending is None else max(0.0, self.clock() - pending)

    def describe(self) -> dict[str, float | int]:
        return {"products": self.live.products, "cursor": self.live.cursor, "lag_s": round(self.lag_s(), 3)}
