"""The training engine: job submission, the job queue, watching and deleting jobs.

Jobs live in the object store (``jobs.py``). The engine validates and persists
a job before answering (atomically, ``submission.py``), runs up to
``max_concurrent_jobs`` at once (each in a thread that drives Ray Train
through ``runner.run_job``), and on start resumes every job it finds
unfinished. A failing job is recorded as FAILED; it never takes the service
down. When even that record cannot be written (the store is down), the job is
re-queued with backoff, so no job is left running forever. Stopping the
service interrupts running jobs without changing their state, so the next
start resumes them from their checkpoints.

Every job has an owner, the principal that created it; other principals see
no such job (NOT_FOUND), admins see all. Deleting a finished job removes all
it stored; a retention setting purges instance images some time after a job
ends. Deletions and purges write one line each to the ``atelier.audit`` log.

The engine keeps the lifecycle, the queue and the API; around it: ``job_table``
(states, owners, submissions, discovery), ``cleanup`` (deletion, prior garbage
collection, retention), ``records``, ``bases`` and ``runner`` (one job's phases).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator

from atelier.kit.auth import current_principal
from atelier.kit.errors import FailedPrecondition, NotFound
from atelier.kit.paging import check_page_request, paginate
from atelier.storage import ObjectStore, open_store
from atelier.training import cleanup
from atelier.training.bases import BaseModels
from atelier.training.config import Settings
from atelier.training.faults import Faults
from atelier.training.job_table import JobTable
from atelier.training.jobs import CANCEL, INTERRUPT, TERMINAL, JobStore, now
from atelier.training.metrics import TrainingMetrics
from atelier.training.ray_cluster import shutdown_ray
from atelier.training.records import set_state, with_progress
from atelier.training.runner import RunResult, run_job
from atelier.training.spec import job_id_of
from atelier.training.submission import submit_job, sweep_orphans
from atelier.training.webhooks import WebhookDispatcher, read_secret
from atelier.v1 import training_pb2

log = logging.getLogger("atelier.training")
S = training_pb2
#: Re-queue delays after a runner could not record a job's outcome, seconds.
REQUEUE_FIRST_S, REQUEUE_MAX_S = 1.0, 60.0
#: Seconds between two retention sweeps of finished jobs' instance images.
RETENTION_SWEEP_S = 60.0


class TrainingEngine:
    """Owns the store, the job queue and the runner threads."""

    def __init__(self, settings: Settings, metrics: TrainingMetrics,
                 faults: Faults | None = None) -> None:
        """``faults``: for tests only, injected into every job run (``faults.Faults``)."""
        self.settings = settings
        self.config = settings.training
        self.metrics = metrics
        self.store: ObjectStore | None = None
        self.jobs: JobStore | None = None
        self.table: JobTable | None = None
        self.webhooks: WebhookDispatcher | None = None
        self.bases = BaseModels(self.config, settings.models.cache_dir)
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._running: set[str] = set()
        self._tasks: list[asyncio.Task] = []
        self._requeue_delay: dict[str, float] = {}
        self._requeues: set[asyncio.Task] = set()
        self._last_retention_sweep = 0.0
        self._last_discovery = time.monotonic()
        self._draining_since: float | None = None
        self.faults = faults

    def attach(self, store: ObjectStore) -> None:
        """Use ``store`` (``start`` opens the configured one; tests attach their own)."""
        self.store = store
        self.jobs = JobStore(store)
        self.table = JobTable(self.jobs)
        self.webhooks = WebhookDispatcher(self.jobs, self.config)

    async def start(self) -> None:
        """Open the store, resume every unfinished job, follow every webhook."""
        self.attach(await asyncio.to_thread(open_store, self.settings.storage))
        await asyncio.to_thread(sweep_orphans, self.jobs)
        unfinished, hooked = await asyncio.to_thread(self.table.unfinished)
        for job in hooked:
            self.webhooks.follow(job)
        for job_id in unfinished:
            self._queue.put_nowait(job_id)
        if unfinished:
            log.info("resuming unfinished jobs", extra={"jobs": unfinished})
        self._tasks = [asyncio.create_task(self._worker(), name=f"training-slot-{i}")
                       for i in range(self.config.max_concurrent_jobs)]
        self._tasks.append(asyncio.create_task(self._poll(), name="training-progress"))

    async def drain(self) -> None:
        """At the start of the drain: ask running jobs to checkpoint and stop, so they
        do it while the last RPCs finish."""
        self._draining_since = asyncio.get_running_loop().time()
        for job_id in list(self._running):
            try:
                await asyncio.to_thread(self.jobs.mark, job_id, INTERRUPT)
            except Exception:  # the store is down: the job resumes from its last checkpoint
                log.warning("could not ask a job to stop", extra={"job": job_id})

    async def close(self) -> None:
        """Wait (within the shutdown grace) for interrupted jobs to stop, then stop Ray."""
        loop = asyncio.get_running_loop()
        if self._draining_since is None:
            await self.drain()
        deadline = self._draining_since + max(5.0, self.settings.grpc.shutdown_grace_s - 5.0)
        while self._running and loop.time() < deadline:
            await asyncio.sleep(0.2)
        for task in [*self._tasks, *self._requeues]:
            task.cancel()
        if self.webhooks is not None:
            await self.webhooks.close()
        await asyncio.to_thread(shutdown_ray)

    # -- the queue --------------------------------------------------------------------------
    async def _worker(self) -> None:
        while True:
            job_id = await self._queue.get()
            self._running.add(job_id)
            try:
                result = await asyncio.to_thread(
                    run_job, self.store, self.settings.storage, self.config,
                    self.settings.models.cache_dir, job_id, faults=self.faults)
                self._requeue_delay.pop(job_id, None)
                if result is RunResult.FAILED:
                    self.metrics.failures.inc()
            except Exception:
                # The runner could not even record the outcome (the store is down
                # longer than its retries): the job is neither finished nor lost.
                self._requeue_later(job_id)
            finally:
                self._running.discard(job_id)
                self.metrics.job_stopped(job_id)

    def _requeue_later(self, job_id: str) -> None:
        delay = self._requeue_delay.get(job_id, REQUEUE_FIRST_S)
        self._requeue_delay[job_id] = min(REQUEUE_MAX_S, delay * 2)
        log.warning("training job could not record its outcome; re-queued",
                    extra={"job": job_id, "retry_in_s": delay}, exc_info=True)

        async def requeue() -> None:
            await asyncio.sleep(delay)
            self._queue.put_nowait(job_id)

        task = asyncio.create_task(requeue())
        self._requeues.add(task)
        task.add_done_callback(self._requeues.discard)

    async def _poll(self) -> None:
        """Progress into the metrics; now and then, discovery and retention."""
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                await asyncio.to_thread(self._poll_once)
                if time.monotonic() - self._last_discovery > self.config.discover_jobs_interval_s:
                    self._last_discovery = time.monotonic()
                    for job in await asyncio.to_thread(self.table.discover):
                        self.webhooks.follow(job)
                if self.config.instance_image_retention_s is not None and \
                        time.monotonic() - self._last_retention_sweep > RETENTION_SWEEP_S:
                    self._last_retention_sweep = time.monotonic()
                    await asyncio.to_thread(self.purge_expired_instance_images)
            except Exception:
                log.warning("progress poll failed", exc_info=True)

    def _poll_once(self) -> None:
        for job_id in list(self._running):
            progress = self.jobs.read_progress(job_id)
            if progress:
                self.metrics.observe_progress(job_id, progress)
        self.table.refresh()
        self.metrics.count_states(self.table.counts())

    # -- API --------------------------------------------------------------------------------
    async def create(self, request_id: str, job_id: str,
                     spec: S.TrainingJobSpec) -> tuple[S.TrainingJob, str]:
        """(the job, its webhook secret: empty without a webhook)."""
        stop = threading.Event()
        try:
            job = await asyncio.to_thread(self._create, request_id, job_id, spec, stop.is_set)
        except asyncio.CancelledError:
            stop.set()  # the thread undoes what it wrote at its next upload
            raise
        if not job.spec.webhook.url:
            return job, ""
        self.webhooks.follow(job)
        return job, await asyncio.to_thread(read_secret, self.jobs, JobStore.id_of(job))

    def _create(self, request_id: str, job_id: str, spec: S.TrainingJobSpec,
                should_stop) -> S.TrainingJob:
        principal = current_principal()
        with self.table.submission(principal, self.config.max_active_jobs_per_principal):
            tokenizer, base = self.bases.of_spec(spec, self.store)
            job, created = submit_job(
                self.jobs, self.config, request_id, job_id, spec, principal=principal,
                tokenizer=tokenizer, should_stop=should_stop, base=base)
            if created:
                self.table.record(JobStore.id_of(job), job)
                self._queue.put_nowait(JobStore.id_of(job))
            elif not principal.owns(job.owner):
                raise NotFound("training job", job.name)
        return job

    def _visible(self, job_id: str) -> S.TrainingJob:
        """The job if the caller may see it; NOT_FOUND (as if missing) otherwise."""
        job = self.jobs.load(job_id)
        if not current_principal().owns(job.owner):
            raise NotFound("training job", f"trainingJobs/{job_id}")
        return job

    async def get(self, name: str) -> S.TrainingJob:
        job_id = job_id_of(name)
        return await asyncio.to_thread(lambda: with_progress(self.jobs, self._visible(job_id)))

    async def list(self, page_size: int, page_token: str, states: list[int]
                   ) -> tuple[list[S.TrainingJob], str]:
        """A page of the caller's jobs, newest first, optionally only in ``states``."""
        check_page_request(page_size, page_token)  # before reading the store
        principal = current_principal()

        def load_all():
            jobs = []
            for job_id in self.jobs.ids():
                try:
                    job = self.jobs.load(job_id)
                except NotFound:  # deleted meanwhile
                    continue
                if principal.owns(job.owner):
                    jobs.append(with_progress(self.jobs, job))
            jobs = [j for j in jobs if not states or j.state in states]
            jobs.sort(key=lambda j: (j.create_time.ToNanoseconds(), j.name), reverse=True)
            return jobs

        return paginate(await asyncio.to_thread(load_all), page_size, page_token)

    async def cancel(self, name: str) -> S.TrainingJob:
        return await asyncio.to_thread(self._cancel, job_id_of(name))

    def _cancel(self, job_id: str) -> S.TrainingJob:
        job = self._visible(job_id)
        if job.state in TERMINAL:
            raise FailedPrecondition(
                f"trainingJobs/{job_id} is already {S.TrainingJobState.Name(job.state)}")
        self.jobs.mark(job_id, CANCEL)
        if job_id not in self._running:
            # Queued: cancel now; the queue skips it.
            set_state(self.jobs, job, S.TRAINING_JOB_STATE_CANCELLED)
            self.table.record(job_id, job)
        else:
            # Running: it stops at its next step; Watch reports CANCELLED then.
            job.state = S.TRAINING_JOB_STATE_CANCELLING
        return job

    async def delete(self, name: str) -> int:
        return await asyncio.to_thread(self._delete, job_id_of(name))

    def _delete(self, job_id: str) -> int:
        job = self._visible(job_id)
        if job.state not in TERMINAL or job_id in self._running:
            raise FailedPrecondition(
                f"trainingJobs/{job_id} is {S.TrainingJobState.Name(job.state)}; cancel it "
                "and wait until it is CANCELLED before deleting it")
        return cleanup.delete_job(self.jobs, self.table, job, current_principal().name)

    def purge_expired_instance_images(self) -> int:
        """Delete the instance images of jobs that ended more than the retention ago."""
        return cleanup.purge_expired_instance_images(
            self.store, self.table, self.config.instance_image_retention_s)

    async def watch(self, name: str) -> AsyncIterator[S.WatchTrainingJobResponse]:
        job_id = job_id_of(name)
        await asyncio.to_thread(self._visible, job_id)
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

