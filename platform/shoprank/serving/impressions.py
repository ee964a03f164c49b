"""Impressions off the answer's critical path: a bounded queue flushed to the event store in batches.

An answer does not wait for a disk sync: the ingress puts its impressions here and a
background task writes them in one transaction every ``serve.impression_flush_s``
(and when the replica shuts down, and before the A/B report is read). When the store is
slower than the traffic for long enough to fill the queue (``serve.impression_queue``),
the oldest impressions are dropped and counted; the count is written with the next batch,
and the A/B report shows the total (``impressions_dropped``) instead of silently counting
fewer impressions. ``/events`` stays durable before its 200: only impressions are queued.

Ray-free: the sink is any async function taking (impressions, dropped since the last
batch); the ingress passes the event store writer's deployment handle.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from shoprank.store.events import Impression

log = logging.getLogger(__name__)

Sink = Callable[[list[Impression], int], Awaitable[object]]
DropCounter = Callable[[int], None]


class ImpressionQueue:
    """At most ``capacity`` impressions waiting for ``sink``; the oldest are dropped (and counted) beyond that.

    ``on_drop`` hears of each drop as it happens (the app's metrics), not only with the next batch the sink takes,
    which may be long in coming when the store is down."""

    def __init__(self, sink: Sink, capacity: int, on_drop: DropCounter = lambda count: None) -> None:
        self.sink = sink
        self.capacity = capacity
        self.on_drop = on_drop
        self.waiting: deque[Impression] = deque()
        self.dropped_unreported = 0
        """Dropped since the last batch the sink accepted: sent with the next one."""
        self.dropped = 0
        """Dropped by this queue since it started."""
        self._flushing = asyncio.Lock()

    def put(self, impressions: list[Impression]) -> None:
        """Queue ``impressions`` (never waits); past capacity the oldest waiting ones go."""
        self.waiting.extend(impressions)
        self._drop_overflow()

    async def flush(self) -> int:
        """Send everything waiting in one batch; how many impressions went. On failure they wait again (the oldest
        dropped if new ones filled the queue meanwhile) and the error is raised."""
        async with self._flushing:
            if not self.waiting and not self.dropped_unreported:
                return 0
            batch, dropped = list(self.waiting), self.dropped_unreported
            self.waiting.clear()
            self.dropped_unreported = 0
            try:
                await self.sink(batch, dropped)
            except BaseException:
                self.waiting.extendleft(reversed(batch))
                self.dropped_unreported += dropped
                self._drop_overflow()
                raise
            return len(batch)

    async def run(self, every_s: float) -> None:
        """Flush every ``every_s`` seconds, for ever; a failed flush is logged and retried at the next tick."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("impressions not written yet (%d waiting); retrying", len(self.waiting))

    def summary(self) -> dict[str, int]:
        return {"waiting": len(self.waiting), "dropped": self.dropped, "capacity": self.capacity}

    def _drop_overflow(self) -> None:
        overflow = len(self.waiting) - self.capacity
        for _ in range(max(0, overflow)):
            self.waiting.popleft()
        if overflow > 0:
            self.dropped += overflow
            self.dropped_unreported += overflow
            self.on_drop(overflow)
