"""The jobs this service knows: each one's state and owner, and the submissions in
flight per owner.

The table feeds the jobs-by-state metric, the per-owner limit of unfinished jobs,
and deletion's check for jobs that may still need shared class priors. It is
shared between the event loop and the runner threads, so every access holds its
lock. The store stays the source of truth: the table is refreshed from it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from atelier.kit.auth import Principal
from atelier.kit.errors import NotFound, ResourceExhausted
from atelier.training.jobs import TERMINAL, JobStore
from atelier.training.spec import concepts_of
from atelier.v1 import training_pb2

S = training_pb2
#: The states of a job that is neither finished nor lost: it is queued or runs.
ACTIVE = (S.TRAINING_JOB_STATE_QUEUED, S.TRAINING_JOB_STATE_PREPARING,
          S.TRAINING_JOB_STATE_TRAINING, S.TRAINING_JOB_STATE_EXPORTING)


class JobTable:
    """States and owners of the known jobs, and submissions in flight."""

    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs
        self._states: dict[str, int] = {}
        self._owners: dict[str, str] = {}
        self._submitting: dict[str, int] = {}  # per owner
        self._lock = threading.Lock()

    def track(self, job_id: str) -> S.TrainingJob:
        """Load a job from the store and record its state and owner."""
        job = self.jobs.load(job_id)
        self.record(job_id, job)
        return job

    def record(self, job_id: str, job: S.TrainingJob) -> None:
        with self._lock:
            self._states[job_id] = job.state
            self._owners[job_id] = job.owner

    def forget(self, job_id: str) -> None:
        with self._lock:
            self._states.pop(job_id, None)
            self._owners.pop(job_id, None)

    def state(self, job_id: str) -> int | None:
        with self._lock:
            return self._states.get(job_id)

    def finished(self) -> list[str]:
        with self._lock:
            return [j for j, state in self._states.items() if state in TERMINAL]

    def counts(self) -> dict[int, int]:
        """How many known jobs are in each state."""
        counts: dict[int, int] = {}
        with self._lock:
            for state in self._states.values():
                counts[state] = counts.get(state, 0) + 1
        return counts

    def unfinished(self) -> tuple[list[str], list[S.TrainingJob]]:
        """Track every job in the store: (the unfinished ones' ids, oldest first; the
        jobs that have a webhook)."""
        active, hooked = [], []
        for job_id in self.jobs.ids():
            job = self.track(job_id)
            if job.state in ACTIVE:
                active.append((job.create_time.ToNanoseconds(), job_id))
            if job.spec.webhook.url:
                hooked.append(job)
        return [job_id for _, job_id in sorted(active)], hooked

    def discover(self) -> list[S.TrainingJob]:
        """Track jobs this service did not submit (the standalone entrypoint's, another
        replica's); returns the ones with a webhook, to be delivered. They are not
        queued: whoever submitted them runs them."""
        hooked = []
        for job_id in self.jobs.ids():
            if self.state(job_id) is not None:
                continue
            try:
                job = self.track(job_id)
            except NotFound:
                continue
            if job.spec.webhook.url:
                hooked.append(job)
        return hooked

    def refresh(self) -> None:
        """Re-read the state of every unfinished job (a job deleted meanwhile is forgotten;
        one the store cannot read now keeps its last state)."""
        with self._lock:
            unfinished = [j for j, state in self._states.items() if state not in TERMINAL]
        for job_id in unfinished:
            try:
                job = self.jobs.load(job_id)
            except NotFound:
                self.forget(job_id)
                continue
            except Exception:
                continue
            with self._lock:
                if job_id in self._states:
                    self._states[job_id] = job.state

    @contextlib.contextmanager
    def submission(self, principal: Principal, limit: int) -> Iterator[None]:
        """Count a submission against its owner's limit of unfinished jobs while it runs;
        RESOURCE_EXHAUSTED when the owner is at the limit (admins have none)."""
        with self._lock:
            active = sum(1 for job_id, state in self._states.items()
                         if state not in TERMINAL and self._owners.get(job_id) == principal.name)
            pending = self._submitting.get(principal.name, 0)
            if not principal.admin and active + pending >= limit:
                raise ResourceExhausted(
                    f"{principal.name} has {active} unfinished training jobs; the limit is "
                    f"{limit}. Retry when one has finished.", retry_after=30.0)
            self._submitting[principal.name] = pending + 1
        try:
            yield
        finally:
            with self._lock:
                self._submitting[principal.name] -= 1

    def may_need_priors(self, job_id: str) -> bool:
        """Whether an unfinished job uses prior preservation but has not yet said which
        class priors (its marker), so shared priors must be kept for it."""
        state = self.state(job_id)
        if state is None or state in TERMINAL:
            return False
        return any(c.prior_preservation.enabled for c in concepts_of(self.jobs.load(job_id).spec))
