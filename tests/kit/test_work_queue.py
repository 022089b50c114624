"""The kit's work queue: admission, refusal with a hint, cancel, selection, drain, events."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest

from atelier.kit.errors import ResourceExhausted
from atelier.kit.work_queue import Admission, EventChannel, Failed, WorkItem, WorkQueue


@dataclass(eq=False, kw_only=True)
class Item(WorkItem):
    name: str


def item(name: str, sink: list | None = None) -> Item:
    return Item(name=name, emit=(sink.append if sink is not None else lambda e: None))


def queue(limit: int = 2, **kw) -> WorkQueue[Item]:
    return WorkQueue(limit, what="test queue", retry_after_s=lambda: 1.5, **kw)


def test_a_full_queue_refuses_at_once_with_the_retry_hint():
    rejected, depths = [], []
    q = queue(on_reject=lambda: rejected.append(1), on_depth=depths.append)
    q.submit(item("a"))
    q.submit(item("b"))
    with pytest.raises(ResourceExhausted) as err:
        q.submit(item("c"))
    assert err.value.retry_after == 1.5
    assert "full" in str(err.value)
    assert rejected == [1]
    assert depths == [1, 2] and len(q) == 2


def test_arriving_requests_count_against_room_but_not_against_submit():
    q = queue(limit=2)
    q.arriving(+1)
    q.arriving(+1)
    assert not q.has_room()
    q.submit(item("a"))  # was admitted (arriving); the line itself has room
    q.arriving(-1)
    assert q.has_room() is False  # one waiting, one arriving
    q.arriving(-1)
    assert q.has_room() and not q.has_room(extra=1)


def test_cancel_frees_a_waiting_slot_and_take_skips_cancelled_items():
    q = queue(limit=2)
    a, b = item("a"), item("b")
    q.submit(a)
    q.submit(b)
    q.cancel(a)
    assert a.done and a.cancelled.is_set() and len(q) == 1
    q.submit(item("c"))
    b.cancelled.set()  # cancelled without leaving (as a race would): take drops it
    taken = q.take(lambda waiting: waiting)
    assert [i.name for i in taken] == ["c"] and b.done and len(q) == 0


def test_take_removes_only_what_the_policy_selects():
    q = queue(limit=5)
    for name in "abcd":
        q.submit(item(name))
    taken = q.take(lambda waiting: [w for w in waiting if w.name in "bd"])
    assert [i.name for i in taken] == ["b", "d"]
    assert [i.name for i in q.take(lambda w: w[:1])] == ["a"]
    assert len(q) == 1


def test_close_drains_waiting_items_with_failed_and_wakes_the_worker():
    q = queue(limit=3)
    events: list = []
    q.submit(item("a", events))
    woke = []
    worker = threading.Thread(target=lambda: woke.append(q.wait(busy=lambda: False)))
    q.take(lambda w: w)  # the line is empty: the worker blocks
    worker.start()
    q.submit(item("b", events))
    worker.join(5)
    assert woke == [True]
    q.close(RuntimeError("stopped"))
    assert [type(e) for e in events] == [Failed] and str(events[0].error) == "stopped"
    assert q.wait() is False
    with pytest.raises(RuntimeError):
        q.submit(item("late"))


def test_wait_for_arrivals_returns_when_enough_have_queued():
    q = queue(limit=5)
    q.arriving(+1)
    done = threading.Event()

    def worker():
        q.wait_for_arrivals(enough=1, timeout_s=30)
        done.set()

    thread = threading.Thread(target=worker)
    thread.start()
    assert not done.wait(0.1)
    q.submit(item("a"))
    assert done.wait(5)
    thread.join(5)


def test_admission_alone_refuses_past_its_limit():
    a = Admission(1, what="engine", retry_after_s=lambda: 0.7)
    assert a.has_room()
    a.arriving(+1)
    assert not a.has_room()
    error = a.refusal()
    assert isinstance(error, ResourceExhausted) and error.retry_after == 0.7


def test_event_channel_delivers_across_threads_and_raises_failures():
    @dataclass
    class Done:
        value: int
        final = True

    async def consume(events):
        channel = EventChannel()
        threading.Thread(target=lambda: [channel.emit(e) for e in events]).start()
        return [e async for e in channel.events()]

    assert asyncio.run(consume([1, 2, Done(3), 4])) == [1, 2, Done(3)]
    with pytest.raises(ValueError, match="bad"):
        asyncio.run(consume([1, Failed(ValueError("bad"))]))
