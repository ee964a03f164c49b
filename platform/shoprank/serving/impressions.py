"""Impressions off the answer's critical path: a bounded queue flushed to the event store in batches.

An answer does not wait for a disk sync: the ingress puts its impressions here and a
background task writes them in one transaction every ``serve.impression_flush_s``
(and when the replica shuts down, and before the A/B report is read). When the store is
slower than the traffic for long enough to fill the queue (``serve.impression_queue``),
the oldest impressions are dropped and counted; the count is written with the next batch,
and the A/B report shows the total (``impressions_dropped``) instead of silently counting
fewer impressions. ``/events`` stays durable before its 200: only impressions are queued.

Exactly once: each batch has an id, and a batch the sink failed to take is sent again whole,
under the same id, before anything newer; the store ignores a batch id it has (the first try
may have committed with only its answer lost), so a retry never counts impressions twice.
What waits here when the replica dies without a graceful shutdown is lost: the queue's size is
reported as it changes (``on_waiting``: the app's ``shoprank_impressions_waiting`` gauge, one
series per replica), so such a loss shows in Prometheus as the series' last value.

Ray-free: the sink is any async function taking (impressions, dropped since the last
batch, batch id); the ingress passes the event store writer's deployment handle.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from shoprank.store.events import Impression

log = logging.getLogger(__name__)

Sink = Callable[[list[Impression], int, str], Awaitable[object]]
Counter = Callable[[int], None]


@dataclass(frozen=True)
class Batch:
    """Impressions sent to the store in one transaction, with the drops counted before it, under one id."""

    batch_id: str
    impressions: list[Impression]
    dropped: int


class ImpressionQueue:
    """At most ``capacity`` impressions waiting for ``sink``; the oldest are dropped (and counted) beyond that.

    ``on_drop`` hears of each drop as it happens (the app's metrics), not only with the next batch the sink takes,
    which may be long in coming when the store is down; ``on_waiting`` hears how many impressions the queue holds
    whenever that changes."""

    def __init__(self, sink: Sink, capacity: int, on_drop: Counter = lambda count: None,
                 on_waiting: Counter = lambda count: None) -> None:
        self.sink = sink
        self.capacity = capacity
        self.on_drop = on_drop
        self.on_waiting = on_waiting
        self.waiting: deque[Impression] = deque()
        self.unsent: Batch | None = None
        """A batch a failed flush sent: sent again whole, under its id, before anything newer. It is never cut by
        a drop: the store may have it already, and its impressions are then neither waiting nor lost."""
        self.dropped_unreported = 0
        """Dropped since the last batch was formed: sent with the next one."""
        self.dropped = 0
        """Dropped by this queue since it started."""
        self._flushing = asyncio.Lock()

    @property
    def held(self) -> int:
        """Impressions not yet in the store as far as this queue knows (waiting, or in the unsent batch)."""
        return len(self.waiting) + (len(self.unsent.impressions) if self.unsent is not None else 0)

    def put(self, impressions: list[Impression]) -> None:
        """Queue ``impressions`` (never waits); past capacity the oldest waiting ones go."""
        self.waiting.extend(impressions)
        self._drop_overflow()
        self.on_waiting(self.held)

    async def flush(self) -> int:
        """Send the batch a failed flush left, if any, then everything waiting, as one batch each; how many
        impressions went. On failure the batch stays unsent (sent again by the next flush, same id) and the error
        is raised."""
        async with self._flushing:
            sent = 0
            for _ in range(2 if self.unsent is not None else 1):
                if self.unsent is None:
                    if not self.waiting and not self.dropped_unreported:
                        break
                    self.unsent = Batch(uuid.uuid4().hex, list(self.waiting), self.dropped_unreported)
                    self.waiting.clear()
                    self.dropped_unreported = 0
                await self.sink(self.unsent.impressions, self.unsent.dropped, self.unsent.batch_id)
                sent += len(self.unsent.impressions)
                self.unsent = None
                self.on_waiting(self.held)
            return sent

    async def run(self, every_s: float) -> None:
        """Flush every ``every_s`` seconds, for ever; a failed flush is logged and retried at the next tick."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("impressions not written yet (%d waiting); retrying", self.held)

    def summary(self) -> dict[str, int]:
        return {"waiting": self.held, "dropped": self.dropped, "capacity": self.capacity}

    def _drop_overflow(self) -> None:
        overflow = min(self.held - self.capacity, len(self.waiting))
        for _ in range(max(0, overflow)):
            self.waiting.popleft()
        if overflow > 0:
            self.dropped += overflow
            self.dropped_unreported += overflow
            self.on_drop(overflow)
