"""The kit's admission budget, without a server: FIFO waiting within a bounded line,
refusal at once when the line is full, cancellation that gives back what it held."""

from __future__ import annotations

import asyncio

import pytest

from atelier.kit.admission import ByteBudget, release_free_memory
from atelier.kit.errors import ResourceExhausted


def run(coro):
    return asyncio.run(coro)


def test_fits_waits_in_order_and_refuses_when_the_line_is_full():
    async def scenario():
        seen = []
        budget = ByteBudget(100, max_waiting=2, what="test", retry_after_s=lambda: 1.5,
                            on_change=seen.append)
        order = []
        release_first = asyncio.Event()

        async def user(name, cost, gate=None):
            async with budget.hold(cost):
                order.append(name)
                if gate is not None:
                    await gate.wait()

        first = asyncio.create_task(user("a", 80, release_first))
        await asyncio.sleep(0)
        second = asyncio.create_task(user("b", 30))  # does not fit: waits
        third = asyncio.create_task(user("c", 10))  # would fit, but waits its turn
        await asyncio.sleep(0)
        assert budget.waiting == 2 and order == ["a"]
        with pytest.raises(ResourceExhausted) as err:
            async with budget.hold(1):
                pass
        assert err.value.retry_after == 1.5
        release_first.set()
        await asyncio.gather(first, second, third)
        assert order == ["a", "b", "c"]
        assert budget.in_use == 0 and seen[-1] == 0 and max(seen) <= 100
        with pytest.raises(ValueError):
            async with budget.hold(101):
                pass

    run(scenario())


def test_a_cancelled_waiter_leaves_the_line_and_holds_nothing():
    async def scenario():
        budget = ByteBudget(10, max_waiting=4, what="test")
        hold = asyncio.Event()

        async def user(cost, gate=None):
            async with budget.hold(cost):
                if gate is not None:
                    await gate.wait()

        first = asyncio.create_task(user(10, hold))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(user(5))
        await asyncio.sleep(0)
        assert budget.waiting == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert budget.waiting == 0
        hold.set()
        await first
        assert budget.in_use == 0

    run(scenario())


def test_release_free_memory_is_safe_to_call():
    release_free_memory()
