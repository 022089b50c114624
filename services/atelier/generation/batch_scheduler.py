"""Which sequences run in this denoising iteration: admission and grouping, as plain data.

No model and no tensors here (tests/generation/test_batch_scheduler.py runs it
alone). The worker loop asks, each iteration:

1. :meth:`BatchScheduler.admit`: which waiting requests start now. First come,
   first served, while their images fit ``max_batch_size`` beside the sequences
   still denoising (one waiting for its decode holds no place); a request that
   does not fit waits, and so does everyone behind it (no overtaking, so a large
   request is never starved by small ones).
2. :meth:`BatchScheduler.schedule`: the step plan, one group per (model, latent
   shape, input layout): each group is one UNet forward.
3. :meth:`BatchScheduler.update_after_step`: counts the steps taken and returns
   the decode plan. A finished sequence waits up to ``decode_wait_steps`` for
   others of its group that finish by then, so they share one VAE pass.

A sequence is named by an integer id the caller chooses; a request by any
hashable id.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class WaitingRequest:
    """A request in line: its id and how many sequences (images) it brings."""

    request_id: Hashable
    sequences: int


@dataclass
class SequenceState:
    """What the scheduler knows of one running sequence."""

    seq_id: int
    request_id: Hashable
    group: Hashable
    total_steps: int
    steps_done: int = 0
    decode_wait: int = 0

    @property
    def finished(self) -> bool:
        return self.steps_done >= self.total_steps

    @property
    def steps_left(self) -> int:
        return self.total_steps - self.steps_done


@dataclass
class StepPlan:
    """This iteration's forwards: group key -> the sequence ids it steps, in admission
    order."""

    groups: dict[Hashable, list[int]] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return sum(len(ids) for ids in self.groups.values())


@dataclass
class DecodePlan:
    """Sequences to decode now, one VAE pass per group."""

    groups: dict[Hashable, list[int]] = field(default_factory=dict)


class BatchScheduler:
    """Admission and grouping for step-level continuous batching."""

    def __init__(self, max_batch_size: int, decode_wait_steps: int) -> None:
        self.max_batch_size = max_batch_size
        self.decode_wait_steps = decode_wait_steps
        self.running: dict[int, SequenceState] = {}

    @property
    def room(self) -> int:
        """Sequences that may start: a finished sequence waiting for its decode no
        longer steps, so it holds no place in the forward."""
        return self.max_batch_size - sum(not s.finished for s in self.running.values())

    def admit(self, waiting: Iterable[WaitingRequest]) -> list[WaitingRequest]:
        """The longest prefix of ``waiting`` whose sequences fit beside those running."""
        room = self.room
        admitted = []
        for request in waiting:
            if request.sequences > room:
                break
            room -= request.sequences
            admitted.append(request)
        return admitted

    def add(self, sequences: Iterable[SequenceState]) -> None:
        """Start scheduling sequences (their requests were admitted and started)."""
        for seq in sequences:
            self.running[seq.seq_id] = seq

    def abort(self, request_id: Hashable) -> list[int]:
        """Forget a request's sequences (cancelled or failed); returns their ids."""
        gone = [s.seq_id for s in self.running.values() if s.request_id == request_id]
        for seq_id in gone:
            del self.running[seq_id]
        return gone

    def schedule(self) -> StepPlan:
        """Every unfinished sequence, grouped; finished ones may be waiting to decode."""
        plan = StepPlan()
        for seq in self.running.values():
            if not seq.finished:
                plan.groups.setdefault(seq.group, []).append(seq.seq_id)
        return plan

    def update_after_step(self, plan: StepPlan) -> DecodePlan:
        """Count one step for each sequence of ``plan``; return what to decode now.

        A group's finished sequences wait (at most ``decode_wait_steps`` steps) while
        another of its sequences will finish within that many steps. Decoded
        sequences leave the scheduler."""
        for ids in plan.groups.values():
            for seq_id in ids:
                if seq_id in self.running:
                    self.running[seq_id].steps_done += 1
        finished: dict[Hashable, list[SequenceState]] = {}
        for seq in self.running.values():
            if seq.finished:
                finished.setdefault(seq.group, []).append(seq)
        decodes = DecodePlan()
        for group, seqs in finished.items():
            soon = any(not s.finished and s.group == group
                       and s.steps_left <= self.decode_wait_steps
                       for s in self.running.values())
            if soon and max(s.decode_wait for s in seqs) < self.decode_wait_steps:
                for s in seqs:
                    s.decode_wait += 1
                continue
            decodes.groups[group] = [s.seq_id for s in seqs]
            for s in seqs:
                del self.running[s.seq_id]
        return decodes
