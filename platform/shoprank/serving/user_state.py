"""Users' live events as each variant replica sees them: a bounded cache fed from the event store.

The store is the one source of truth (``/events`` answers 200 only once an event is
committed there), and every answering replica keeps its own cache of the users it
answered lately, so a request needs no round trip to a shared user-state service:

* **catch up** (:meth:`UserCache.catch_up`), once per batch of requests: the events
  stored since the cache's cursor (one indexed query on the store's sequence number),
  appended to the users the cache holds. Run before a batch is answered, it makes a
  purchase that ``/events`` acknowledged show in the very next answer, on any replica;
* **miss**: a user the cache does not hold is read from the store (their last
  ``features.history_events`` events, one indexed query) when first asked for;
* **erasure**: a user erased from the store (``DELETE /users/{id}``) leaves a tombstone
  there; catching up reads the tombstones too and forgets those users, so no replica
  answers from an erased user's events. ``forget_elsewhere`` hears of each erased user
  as well (every tombstone at start, then the new ones): the variant drops them from the
  run's history it personalises from, so they are cold, not only without live events;
* **bounds**: at most ``features.history_events`` events per user (what the features read),
  and at most ``serve.user_cache_events`` events in all; past that, the users asked for
  least recently leave the cache (LRU), to be read again on their next request;
* **hides** ("not interested", ``NEGATIVE_EVENT_TYPES``) are kept apart from that window:
  every one the user ever sent (read on a miss by ``EventStore.hidden_of``, appended by
  catching up), so a hidden product stays hidden however many events follow; they are
  no behaviour, so the window (:meth:`UserCache.events_of`) never holds one.

Ray-free: the variant deployment holds one, and the tests drive it directly too.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from shoprank.data.schema import NEGATIVE_EVENT_TYPES
from shoprank.recsys.messages import LiveEvent
from shoprank.store.events import EventStore

Hide = tuple[str, str]
"""(event_type, product_id) of one "not interested" (the shape of ``Asked.hidden``)."""


@dataclass
class _Cached:
    events: deque[LiveEvent]
    hidden: dict[Hide, None]
    """Every hide of the user, in the order sent, each once (a dict as an ordered set)."""
    loaded_through: int
    """The store's sequence number up to which ``events`` and ``hidden`` are complete: later changes are appended,
    earlier ones were in the reads that loaded the user."""

    def __len__(self) -> int:
        """What the user holds of the cache's bound: their events and their hides."""
        return len(self.events) + len(self.hidden)


@dataclass
class UserCache:
    """Recent live events per user, LRU over users, bounded in events (see the module docstring)."""

    store: EventStore
    per_user: int
    max_events: int
    forget_elsewhere: Callable[[str], object] = lambda user: None
    """Called with each erased user: what else the replica holds of users (the run's history) forgets them too."""
    users: OrderedDict[str, _Cached] = field(default_factory=OrderedDict)
    held: int = 0

    def __post_init__(self) -> None:
        self.cursor = self.store.last_seq()
        """The last sequence number read; earlier events are read per user, on a miss."""
        self.erasure_cursor = 0
        self._read_erasures()  # every tombstone so far: a replica started after an erasure forgets that user too

    def catch_up(self) -> int:
        """Read what the store received since the last call (erasures, then events); how many events that was."""
        self._read_erasures()
        read = 0
        while True:
            changes = self.store.changes(self.cursor, limit=10_000)
            for change in changes:
                cached = self.users.get(change.user_id)
                if cached is not None and change.seq > cached.loaded_through:
                    if change.event_type in NEGATIVE_EVENT_TYPES:
                        self._hide(cached, (change.event_type, change.product_id))
                    else:
                        self._append(cached, (change.product_id, change.event_type, change.ts_s))
                    cached.loaded_through = change.seq
            read += len(changes)
            if changes:
                self.cursor = changes[-1].seq
            if len(changes) < 10_000:
                return read

    def _read_erasures(self) -> None:
        """Forget the users erased since the last read (their cached events, and ``forget_elsewhere``)."""
        for self.erasure_cursor, erased in self.store.erasures(self.erasure_cursor):
            gone = self.users.pop(erased, None)
            if gone is not None:
                self.held -= len(gone)
            self.forget_elsewhere(erased)

    def events_of(self, user_id: str | None) -> list[LiveEvent]:
        """``user_id``'s live behaviour events, oldest first (read from the store on a miss); none for an anonymous
        request."""
        cached = self._user(user_id)
        return list(cached.events) if cached is not None else []

    def hidden_of(self, user_id: str | None) -> tuple[Hide, ...]:
        """Every "not interested" ``user_id`` sent, in the order sent (read from the store on a miss); none for an
        anonymous request."""
        cached = self._user(user_id)
        return tuple(cached.hidden) if cached is not None else ()

    def _user(self, user_id: str | None) -> _Cached | None:
        """``user_id``'s entry, read from the store on a miss: their window of behaviour, then every hide. The next
        catch-up appends what was stored after the behaviour read; a hide the second read already holds is not
        added twice (hides are a set). None for an anonymous request."""
        if not user_id:
            return None
        cached = self.users.get(user_id)
        if cached is not None:
            self.users.move_to_end(user_id)
            return cached
        stored = self.store.recent_of(user_id, self.per_user)
        hidden = self.store.hidden_of(user_id)
        cached = _Cached(deque(((e.product_id, e.event_type, e.ts_s) for e in stored), maxlen=self.per_user),
                         dict.fromkeys(hidden), max([e.seq for e in stored], default=self.cursor))
        self.users[user_id] = cached
        self.held += len(cached)
        self._evict()
        return cached

    def summary(self) -> dict[str, int]:
        return {"users": len(self.users), "events": self.held, "cursor": self.cursor}

    def _append(self, cached: _Cached, event: LiveEvent) -> None:
        if len(cached.events) < self.per_user:
            self.held += 1
        cached.events.append(event)
        self._evict()

    def _hide(self, cached: _Cached, hide: Hide) -> None:
        if hide not in cached.hidden:
            cached.hidden[hide] = None
            self.held += 1
            self._evict()

    def _evict(self) -> None:
        while self.held > self.max_events and len(self.users) > 1:
            _, gone = self.users.popitem(last=False)
            self.held -= len(gone)
