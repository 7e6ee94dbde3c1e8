"""A work queue in the style of client-go's: keys, not events.

Any number of triggers (a run changed, one of its Jobs or Pods changed, a backoff expired) add
the run's key; a key waits in the queue at most once, is handed to one worker at a time, and a
key added while it is being processed is processed once more afterwards. So every run is
reconciled serially, bursts of events collapse into one reconcile, and nothing polls: delayed
keys sleep in the event loop's timer heap until due.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    """A queue of keys of type `K` (the controller's: `cache.RunKey`, (namespace, name))."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[K] = asyncio.Queue()
        self._queued: set[K] = set()
        self._active: set[K] = set()
        self._dirty: set[K] = set()
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._failures: dict[K, int] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    def add(self, key: K) -> None:
        if key in self._active:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._idle.clear()
        self._queue.put_nowait(key)

    def add_after(self, key: K, delay: float) -> None:
        """Add `key` after `delay` seconds; an earlier pending wake-up of the key is kept."""
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        timer = self._timers.get(key)
        if timer is not None and not timer.cancelled() and timer.when() <= when:
            return
        if timer is not None:
            timer.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    async def get(self) -> K:
        key = await self._queue.get()
        self._queued.discard(key)
        self._active.add(key)
        return key

    def done(self, key: K) -> None:
        self._active.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)
        elif not self._active and not self._queued:
            self._idle.set()

    # ---------------------------------------------------------------- failures
    def failed(self, key: K, base: float, cap: float) -> float:
        """Count a failed reconcile of `key` and schedule it again with exponential backoff;
        returns the delay."""
        n = self._failures.get(key, 0) + 1
        self._failures[key] = n
        delay = min(cap, base * 2 ** (n - 1))
        self.add_after(key, delay)
        return delay

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)

    def succeeded(self, key: K) -> None:
        self._failures.pop(key, None)

    def forget(self, key: K) -> None:
        """The object is gone: drop its timer and failure count (a queued key is harmless)."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._failures.pop(key, None)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    # ---------------------------------------------------------------- reading (read-only views)
    def pending(self) -> frozenset[K]:
        """Keys waiting for a worker (not those being processed, nor delayed ones)."""
        return frozenset(self._queued)

    def processing(self) -> frozenset[K]:
        """Keys a worker holds now; `requeued` tells which of them run once more afterwards."""
        return frozenset(self._active)

    def requeued(self, key: K) -> bool:
        """True when `key` was added while being processed: it is processed again after `done`."""
        return key in self._dirty

    def delay_of(self, key: K) -> float | None:
        """Seconds until the delayed wake-up of `key` (None when there is none)."""
        timer = self._timers.get(key)
        if timer is None or timer.cancelled():
            return None
        return max(0.0, timer.when() - asyncio.get_running_loop().time())

    async def wait_idle(self) -> None:
        """Until nothing is queued or being processed (timers may still be pending)."""
        await self._idle.wait()

    def __len__(self) -> int:
        return len(self._queued) + len(self._active)
