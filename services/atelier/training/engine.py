"""The training engine: job submission, the job queue, and watching jobs.

Jobs live in the object store (``jobs.py``). The engine validates and persists
a job before answering, runs up to ``max_concurrent_jobs`` at once (each in a
thread that drives Ray Train through ``runner.run_job``), and on start resumes
every job it finds unfinished. A failing job is recorded as FAILED; it never
takes the service down. Stopping the service interrupts running jobs without
changing their state, so the next start resumes them from their checkpoints.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator

from atelier.kit.errors import FailedPrecondition, FieldViolation, InvalidArgument
from atelier.kit.paging import paginate
from atelier.storage import ObjectStore, open_store
from atelier.training.config import Settings
from atelier.training.jobs import TERMINAL, JobStore, now
from atelier.training.metrics import TrainingMetrics
from atelier.training.runner import run_job, set_state, shutdown_ray
from atelier.training.spec import MODEL_ID_RE
from atelier.training.submission import submit_job
from atelier.v1 import training_pb2

#: Environment variable through which the test suite injects faults into a service
#: process (a JSON object of runner.run_job hooks). Never set it in a deployment.
TEST_HOOKS_ENV = "ATELIER_TRAINING_TEST_HOOKS"

log = logging.getLogger("atelier.training")
S = training_pb2
ACTIVE = (S.TRAINING_JOB_STATE_QUEUED, S.TRAINING_JOB_STATE_PREPARING,
          S.TRAINING_JOB_STATE_TRAINING, S.TRAINING_JOB_STATE_EXPORTING)


class TrainingEngine:
    """Owns the store, the job queue and the runner threads."""

    def __init__(self, settings: Settings, metrics: TrainingMetrics) -> None:
        self.settings = settings
        self.config = settings.training
        self.metrics = metrics
        self.store: ObjectStore | None = None
        self.jobs: JobStore | None = None
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._running: set[str] = set()
        self._tasks: list[asyncio.Task] = []
        self._seen_steps: dict[str, tuple[int, float]] = {}
        self._states: dict[str, int] = {}
        # Fault injection for the test suite, passed to run_job (see runner.run_job).
        self.hooks: dict = json.loads(os.environ.get(TEST_HOOKS_ENV) or "{}")

    async def start(self) -> None:
        self.store = await asyncio.to_thread(open_store, self.settings.storage)
        self.jobs = JobStore(self.store)
        unfinished = await asyncio.to_thread(self._unfinished)
        for job_id in unfinished:
            self._queue.put_nowait(job_id)
        if unfinished:
            log.info("resuming unfinished jobs", extra={"jobs": unfinished})
        self._tasks = [asyncio.create_task(self._worker(), name=f"training-slot-{i}")
                       for i in range(self.config.max_concurrent_jobs)]
        self._tasks.append(asyncio.create_task(self._poll(), name="training-progress"))

    def _unfinished(self) -> list[str]:
        out = []
        for job_id in self.jobs.ids():
            job = self.jobs.load(job_id)
            self._states[job_id] = job.state
            if job.state in ACTIVE:
                out.append((job.create_time.ToNanoseconds(), job_id))
        return [job_id for _, job_id in sorted(out)]

    async def close(self) -> None:
        for job_id in list(self._running):
            await asyncio.to_thread(self.jobs.mark, job_id, "interrupt")
        deadline = asyncio.get_running_loop().time() + 120
        while self._running and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.2)
        for task in self._tasks:
            task.cancel()
        await asyncio.to_thread(shutdown_ray)

    # -- the queue --------------------------------------------------------------------------
    async def _worker(self) -> None:
        while True:
            job_id = await self._queue.get()
            self._running.add(job_id)
            try:
                result = await asyncio.to_thread(
                    run_job, self.store, self.settings.storage, self.config,
                    self.settings.models.cache_dir, job_id, hooks=self.hooks)
                if result == "TRAINING_JOB_STATE_FAILED":
                    self.metrics.failures.inc()
            except Exception:
                log.exception("training job runner crashed", extra={"job": job_id})
            finally:
                self._running.discard(job_id)
                if self._seen_steps.pop(job_id, None) is not None:
                    self.metrics.loss.remove(job_id)  # only running jobs keep a loss series

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                await asyncio.to_thread(self._poll_once)
            except Exception:
                log.warning("progress poll failed", exc_info=True)

    def _poll_once(self) -> None:
        for job_id in list(self._running):
            progress = self.jobs.read_progress(job_id)
            if not progress:
                continue
            step = int(progress.get("step", 0))
            last_step, last_ckpt = self._seen_steps.get(job_id, (0, 0.0))
            if step > last_step:
                self.metrics.steps.inc(step - last_step)
                self.metrics.step_seconds.observe(float(progress.get("step_seconds", 0.0)))
            ckpt = float(progress.get("checkpoint_seconds", 0.0))
            if ckpt and ckpt != last_ckpt:
                self.metrics.checkpoint_seconds.observe(ckpt)
            self._seen_steps[job_id] = (max(step, last_step), ckpt)
            self.metrics.loss.labels(job_id).set(float(progress.get("loss", 0.0)))
        for job_id, state in list(self._states.items()):
            if state not in TERMINAL:
                try:
                    self._states[job_id] = self.jobs.load(job_id).state
                except Exception:
                    continue
        counts = {name: 0 for name in S.TrainingJobState.keys()[1:]}
        for state in self._states.values():
            counts[S.TrainingJobState.Name(state)] += 1
        for name, count in counts.items():
            self.metrics.jobs.labels(name.removeprefix("TRAINING_JOB_STATE_")).set(count)

    # -- API --------------------------------------------------------------------------------
    async def create(self, request_id: str, job_id: str,
                     spec: S.TrainingJobSpec) -> S.TrainingJob:
        return await asyncio.to_thread(self._create, request_id, job_id, spec)

    def _create(self, request_id: str, job_id: str, spec: S.TrainingJobSpec) -> S.TrainingJob:
        job, created = submit_job(self.jobs, self.config, request_id, job_id, spec)
        if created:
            self._states[JobStore.id_of(job)] = job.state
            self._queue.put_nowait(JobStore.id_of(job))
        return job

    async def get(self, name: str) -> S.TrainingJob:
        return await asyncio.to_thread(self._load_with_progress, _job_id(name))

    def _load_with_progress(self, job_id: str) -> S.TrainingJob:
        job = self.jobs.load(job_id)
        if job.state not in TERMINAL:
            progress = self.jobs.read_progress(job_id)
            if progress:
                from atelier.training.runner import _copy_progress

                _copy_progress(job, progress)
        return job

    async def list(self, page_size: int, page_token: str, states: list[int]
                   ) -> tuple[list[S.TrainingJob], str]:
        """A page of jobs, newest first, optionally only in ``states``."""
        paginate([], page_size, page_token)  # validate before reading the store

        def load_all():
            jobs = [self._load_with_progress(i) for i in self.jobs.ids()]
            jobs = [j for j in jobs if not states or j.state in states]
            jobs.sort(key=lambda j: (j.create_time.ToNanoseconds(), j.name), reverse=True)
            return jobs

        return paginate(await asyncio.to_thread(load_all), page_size, page_token)

    async def cancel(self, name: str) -> S.TrainingJob:
        return await asyncio.to_thread(self._cancel, _job_id(name))

    def _cancel(self, job_id: str) -> S.TrainingJob:
        job = self.jobs.load(job_id)
        if job.state in TERMINAL:
            raise FailedPrecondition(
                f"trainingJobs/{job_id} is already {S.TrainingJobState.Name(job.state)}")
        self.jobs.mark(job_id, "cancel")
        if job_id not in self._running:
            # Queued: cancel now; the queue skips it.
            set_state(self.jobs, job, S.TRAINING_JOB_STATE_CANCELLED)
            self._states[job_id] = job.state
        return job

    async def watch(self, name: str) -> AsyncIterator[S.WatchTrainingJobResponse]:
        job_id = _job_id(name)
        last = await asyncio.to_thread(self.jobs.last_event_key, job_id)
        job = await self.get(name)
        yield S.WatchTrainingJobResponse(event_time=now(), snapshot=job)
        if job.state in TERMINAL:
            return
        while True:
            events = await asyncio.to_thread(self.jobs.events_after, job_id, last)
            for key, event in events:
                last = key
                yield event
                if event.HasField("state_changed") and event.state_changed.state in TERMINAL:
                    return
            await asyncio.sleep(self.config.poll_interval_s)


def _job_id(name: str) -> str:
    if not name.startswith("trainingJobs/") or not MODEL_ID_RE.match(
            name.removeprefix("trainingJobs/")):
        raise InvalidArgument([FieldViolation("name", "must look like trainingJobs/{id}")])
    return name.removeprefix("trainingJobs/")
