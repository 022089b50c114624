"""The bounded work queue between a service's event loop and its worker thread.

Generation and analysis both run their model on one worker thread and take
requests from the asyncio side. This module is that hand-off, written once:

- :class:`Admission`: a count of admitted requests against a limit; past it a
  request is refused at once with RESOURCE_EXHAUSTED and a retry hint. A backend
  whose engine keeps its own queue (vLLM) needs only this part.
- :class:`WorkQueue`: admission plus the line itself: ``submit`` (or refuse),
  ``cancel`` (a waiting item leaves at once), ``take`` on the worker (under the
  queue's lock, so a cancel never races the selection) and ``close`` (the items
  still waiting are drained with :class:`Failed`).
- :class:`EventChannel`: the worker thread's events back to the request's
  coroutine, in one vocabulary: intermediate events, then one event whose class
  sets ``final = True``, or :class:`Failed` (raised in the coroutine).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from atelier.kit.errors import ResourceExhausted


# -- the event vocabulary ------------------------------------------------------------------
@dataclass
class Failed:
    """The item failed; ``error`` is raised in the waiting coroutine."""

    error: BaseException
    final = True


class Cancelled(Exception):
    """The item was cancelled by its caller; nobody waits for an answer."""


@dataclass(eq=False, kw_only=True)
class WorkItem:
    """What a queue holds: a request's cancel flag, arrival time and event sink."""

    emit: Callable[[Any], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueue_time: float = field(default_factory=time.perf_counter)
    done: bool = False

    def finish(self, event: Any | None) -> None:
        """Mark the item done and send its last event (None: send nothing). Once only."""
        if not self.done:
            self.done = True
            if event is not None:
                self.emit(event)


class EventChannel:
    """Events from the worker thread to one coroutine. Create it on the event loop."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

    def emit(self, event: Any) -> None:
        """Thread-safe: queue ``event`` for the coroutine."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def events(self) -> AsyncIterator[Any]:
        """Yield events up to and including the final one; raise a Failed one's error."""
        while True:
            event = await self._queue.get()
            if isinstance(event, Failed):
                raise event.error
            yield event
            if getattr(event, "final", False):
                return


# -- admission -----------------------------------------------------------------------------
class Admission:
    """At most ``limit`` requests admitted at once; refusals carry a retry hint.

    ``count`` is what the owner says is inside (``arriving(+1)`` on admission,
    ``arriving(-1)`` on leaving); ``occupied`` adds what else fills the capacity
    (a work queue adds its waiting items)."""

    def __init__(self, limit: int, *, what: str, retry_after_s: Callable[[], float],
                 on_reject: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self.what = what
        self.retry_after_s = retry_after_s
        self.on_reject = on_reject
        self.count = 0
        self._lock = threading.RLock()

    def occupied(self) -> int:
        return self.count

    def has_room(self, extra: int = 0) -> bool:
        """Whether one more request fits, counting ``extra`` waiting elsewhere."""
        with self._lock:
            return self.occupied() + extra < self.limit

    def arriving(self, delta: int) -> None:
        with self._lock:
            self.count += delta
            self._changed()

    def refusal(self, detail: str = "") -> ResourceExhausted:
        """The RESOURCE_EXHAUSTED to raise for a request that does not fit."""
        if self.on_reject is not None:
            self.on_reject()
        return ResourceExhausted(detail or f"{self.what} is at capacity ({self.limit})",
                                 retry_after=self.retry_after_s())

    def _changed(self) -> None:
        """Hook for subclasses (the lock is held)."""


T = TypeVar("T", bound=WorkItem)


class WorkQueue(Admission, Generic[T]):
    """A bounded line of :class:`WorkItem` for one worker thread.

    ``limit`` bounds the items waiting plus those being prepared (``arriving``);
    ``submit`` itself refuses only when the line proper is full, since arriving
    requests were admitted already. ``on_depth`` sees the line's length after
    every change (a queue-depth gauge)."""

    def __init__(self, limit: int, *, what: str, retry_after_s: Callable[[], float],
                 on_reject: Callable[[], None] | None = None,
                 on_depth: Callable[[int], None] | None = None) -> None:
        super().__init__(limit, what=what, retry_after_s=retry_after_s, on_reject=on_reject)
        self.on_depth = on_depth
        self._cv = threading.Condition(self._lock)
        self._items: deque[T] = deque()
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def occupied(self) -> int:
        return self.count + len(self._items)

    # -- the event loop's side -------------------------------------------------------------
    def submit(self, item: T) -> None:
        """Queue ``item``, or raise RESOURCE_EXHAUSTED at once when the line is full."""
        with self._cv:
            if self.closed:
                raise RuntimeError(f"{self.what} has stopped")
            if len(self._items) >= self.limit:
                raise self.refusal(f"{self.what} is full ({self.limit} requests waiting)")
            self._items.append(item)
            self._changed()

    def cancel(self, item: T) -> None:
        """Cancel ``item``: a waiting one leaves the line now (done, no event); a taken
        one sees ``item.cancelled`` at the worker's next check."""
        item.cancelled.set()
        with self._cv:
            if item in self._items:
                self._items.remove(item)
                item.done = True
                self._changed()

    # -- the worker's side -----------------------------------------------------------------
    def wake(self) -> None:
        """Wake a worker blocked in :meth:`wait` (it has other work, say)."""
        with self._cv:
            self._cv.notify_all()

    def wait(self, busy: Callable[[], bool] = lambda: False,
             timeout: float | None = None) -> bool:
        """Block until an item waits, ``busy()`` is true, the queue closes or ``timeout``
        passes; False once closed. ``busy`` is evaluated under the queue's lock."""
        with self._cv:
            self._cv.wait_for(lambda: self.closed or self._items or busy(), timeout)
            return not self.closed

    def wait_for_arrivals(self, enough: int, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` while fewer than ``enough`` items wait and some are
        still arriving (being prepared), so they can join the next batch."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while len(self._items) < enough and self.count > 0 and not self.closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cv.wait(remaining)

    def take(self, select: Callable[[list[T]], list[T]]) -> list[T]:
        """Remove and return what ``select`` picks from the waiting items (in line
        order). Cancelled items are dropped first (done, no event)."""
        with self._cv:
            for item in [i for i in self._items if i.cancelled.is_set()]:
                self._items.remove(item)
                item.done = True
            chosen = select(list(self._items)) if self._items else []
            if chosen:
                ids = {id(i) for i in chosen}
                self._items = deque(i for i in self._items if id(i) not in ids)
            self._changed()
            return chosen

    def close(self, error: BaseException) -> None:
        """Stop taking work; every item still waiting finishes with ``Failed(error)``."""
        with self._cv:
            self.closed = True
            items, self._items = list(self._items), deque()
            self._changed()
            self._cv.notify_all()
        for item in items:
            item.finish(Failed(error))

    def _changed(self) -> None:
        if self.on_depth is not None:
            self.on_depth(len(self._items))
        self._cv.notify_all()
