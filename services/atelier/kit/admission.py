"""Admission before any work: a bounded line of waiters and a byte budget in flight.

A service decides whether to take a request *before* it decodes or allocates
anything for it, so a flood costs each refused request microseconds and no
memory. :class:`ByteBudget` holds the bytes that admitted requests may use at
once (decoded pixels, say): a request that fits goes on; one that does not
waits, first come first served, in a line of bounded length; when the line is
full it is refused at once with RESOURCE_EXHAUSTED and a retry hint. A request
that could never fit is the caller's to refuse (it is larger than the budget).

:func:`release_free_memory` hands freed memory back to the operating system;
the kit's interceptor calls it once a server has no call in flight, so a
process's footprint comes back down after a burst instead of staying at its
peak (and never mid-traffic, where the trim would cost latency).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from atelier.kit.errors import ResourceExhausted

log = logging.getLogger("atelier.admission")


class ByteBudget:
    """At most ``budget_bytes`` in flight; at most ``max_waiting`` requests waiting."""

    def __init__(self, budget_bytes: int, max_waiting: int, *, what: str,
                 retry_after_s: Callable[[], float] = lambda: 0.5,
                 on_change: Callable[[int], None] | None = None) -> None:
        self.budget_bytes = budget_bytes
        self.max_waiting = max_waiting
        self.what = what
        self.retry_after_s = retry_after_s
        self.on_change = on_change  # called with the bytes in use after each change
        self.in_use = 0
        self._waiting: deque[tuple[int, asyncio.Future]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @asynccontextmanager
    async def hold(self, cost: int) -> AsyncIterator[None]:
        """Hold ``cost`` bytes of the budget for the body; wait or refuse as above."""
        cost = max(0, cost)
        if cost > self.budget_bytes:
            raise ValueError("a cost above the whole budget can never be admitted")
        if self._waiting or self.in_use + cost > self.budget_bytes:
            if len(self._waiting) >= self.max_waiting:
                raise ResourceExhausted(
                    f"{self.what} is at capacity ({len(self._waiting)} requests waiting)",
                    retry_after=self.retry_after_s())
            turn = asyncio.get_running_loop().create_future()
            entry = (cost, turn)
            self._waiting.append(entry)
            try:
                await turn
            except BaseException:
                if entry in self._waiting:
                    self._waiting.remove(entry)
                elif turn.done() and not turn.cancelled():
                    self._release(cost)  # granted just as we were cancelled
                raise
        else:
            self.in_use += cost
            self._changed()
        try:
            yield
        finally:
            self._release(cost)

    def _release(self, cost: int) -> None:
        self.in_use -= cost
        while self._waiting and self.in_use + self._waiting[0][0] <= self.budget_bytes:
            cost_next, turn = self._waiting.popleft()
            if turn.done():
                continue
            self.in_use += cost_next
            turn.set_result(None)
        self._changed()


    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.in_use)


def release_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim``); no-op elsewhere.

    Large decoded images are freed into glibc's arenas, which keep them: without
    this an idle service stays at its burst peak."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_trim_fn: list = []


def _malloc_trim():
    if not _trim_fn:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _trim_fn.append(getattr(libc, "malloc_trim", None))
        except OSError:
            _trim_fn.append(None)
    return _trim_fn[0]
