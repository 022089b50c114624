"""The batch scheduler's policy, without a server, a model or a tensor."""

from __future__ import annotations

from atelier.generation.batch_scheduler import (
    BatchScheduler,
    SequenceState,
    StepPlan,
    WaitingRequest,
)


def add(scheduler, request_id, group, *steps, first_id=None):
    base = first_id if first_id is not None else len(scheduler.running) * 10 + 100
    states = [SequenceState(base + i, request_id, group, n) for i, n in enumerate(steps)]
    scheduler.add(states)
    return [s.seq_id for s in states]


def test_admission_is_first_come_first_served_within_the_batch():
    scheduler = BatchScheduler(max_batch_size=4, decode_wait_steps=0)
    waiting = [WaitingRequest("a", 2), WaitingRequest("b", 1), WaitingRequest("c", 2),
               WaitingRequest("d", 1)]
    # "c" does not fit beside a and b; "d" would, but does not overtake it.
    assert [r.request_id for r in scheduler.admit(waiting)] == ["a", "b"]
    add(scheduler, "a", "g", 5, 5)
    add(scheduler, "b", "g", 5)
    assert scheduler.room == 1
    assert scheduler.admit(waiting[2:]) == []
    assert scheduler.admit([]) == []


def test_a_request_larger_than_the_room_waits_until_it_fits():
    scheduler = BatchScheduler(max_batch_size=3, decode_wait_steps=0)
    add(scheduler, "a", "g", 2, first_id=1)
    big = [WaitingRequest("big", 3)]
    assert scheduler.admit(big) == []
    plan = scheduler.schedule()
    scheduler.update_after_step(plan)
    scheduler.update_after_step(scheduler.schedule())  # "a" finished and decoded
    assert scheduler.running == {}
    assert scheduler.admit(big) == big


def test_groups_split_by_key_and_keep_admission_order():
    scheduler = BatchScheduler(max_batch_size=8, decode_wait_steps=0)
    add(scheduler, "sd-1", ("sd", 64), 3, first_id=1)
    add(scheduler, "xl", ("xl", 128), 3, first_id=2)
    add(scheduler, "sd-2", ("sd", 64), 3, 3, first_id=3)
    plan = scheduler.schedule()
    assert plan.groups == {("sd", 64): [1, 3, 4], ("xl", 128): [2]}
    assert plan.batch_size == 4


def test_steps_are_counted_and_finished_sequences_decode_and_leave():
    scheduler = BatchScheduler(max_batch_size=8, decode_wait_steps=0)
    add(scheduler, "short", "g", 1, first_id=1)
    add(scheduler, "long", "g", 3, first_id=2)
    decodes = scheduler.update_after_step(scheduler.schedule())
    assert decodes.groups == {"g": [1]}
    assert list(scheduler.running) == [2]
    assert scheduler.running[2].steps_done == 1
    assert scheduler.schedule().groups == {"g": [2]}


def test_finished_sequences_wait_briefly_to_share_a_decode():
    scheduler = BatchScheduler(max_batch_size=8, decode_wait_steps=2)
    add(scheduler, "a", "g", 1, first_id=1)
    add(scheduler, "b", "g", 3, first_id=2)  # finishes two steps after "a"
    add(scheduler, "c", "other", 1, first_id=3)  # nobody in its group: decodes at once
    decodes = scheduler.update_after_step(scheduler.schedule())
    assert decodes.groups == {"other": [3]}
    assert scheduler.update_after_step(scheduler.schedule()).groups == {}
    assert scheduler.update_after_step(scheduler.schedule()).groups == {"g": [1, 2]}
    assert scheduler.running == {}


def test_a_sequence_waiting_for_its_decode_holds_no_place_in_the_forward():
    scheduler = BatchScheduler(max_batch_size=2, decode_wait_steps=2)
    add(scheduler, "a", "g", 1, first_id=1)
    add(scheduler, "b", "g", 3, first_id=2)
    assert scheduler.room == 0
    assert scheduler.update_after_step(scheduler.schedule()).groups == {}  # a waits for b
    assert list(scheduler.running) == [1, 2]
    assert scheduler.room == 1  # a no longer steps: a waiting request may start
    assert scheduler.admit([WaitingRequest("c", 1), WaitingRequest("d", 1)]) == [
        WaitingRequest("c", 1)]


def test_the_wait_is_bounded():
    scheduler = BatchScheduler(max_batch_size=8, decode_wait_steps=1)
    add(scheduler, "a", "g", 1, first_id=1)
    add(scheduler, "b", "g", 10, first_id=2)  # too far from finishing: no wait
    assert scheduler.update_after_step(scheduler.schedule()).groups == {"g": [1]}
    scheduler = BatchScheduler(max_batch_size=8, decode_wait_steps=1)
    add(scheduler, "a", "g", 1, first_id=1)
    add(scheduler, "b", "g", 2, first_id=2)
    add(scheduler, "late", "g", 3, first_id=3)
    scheduler.update_after_step(scheduler.schedule())  # a waits one step for b
    # b finishes; a has waited its one step, late is one step away: both decode now
    assert scheduler.update_after_step(scheduler.schedule()).groups == {"g": [1, 2]}


def test_abort_removes_a_requests_sequences_only():
    scheduler = BatchScheduler(max_batch_size=8, decode_wait_steps=0)
    add(scheduler, "a", "g", 4, 4, first_id=1)
    add(scheduler, "b", "g", 4, first_id=5)
    assert scheduler.abort("a") == [1, 2]
    assert scheduler.abort("a") == []
    assert scheduler.schedule().groups == {"g": [5]}
    assert scheduler.room == 7


def test_a_step_plan_for_sequences_gone_meanwhile_is_ignored():
    scheduler = BatchScheduler(max_batch_size=8, decode_wait_steps=0)
    add(scheduler, "a", "g", 2, first_id=1)
    plan = scheduler.schedule()
    scheduler.abort("a")
    assert scheduler.update_after_step(plan).groups == {}
    assert scheduler.update_after_step(StepPlan()).groups == {}
