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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator

from atelier.kit.auth import Principal, current_principal
from atelier.kit.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from atelier.kit.paging import paginate
from atelier.storage import ObjectStore, open_store
from atelier.subject_scores import Score
from atelier.training import priors
from atelier.training.config import Settings
from atelier.training.evaluation import read_scores
from atelier.training.faults import Faults
from atelier.training.jobs import TERMINAL, JobStore, job_key, now
from atelier.training.metrics import TrainingMetrics
from atelier.training.runner import (
    RunResult,
    describe_base,
    resolve_base,
    run_job,
    set_state,
    shutdown_ray,
)
from atelier.training.spec import MODEL_ID_RE, concepts_of
from atelier.training.submission import submit_job, sweep_orphans
from atelier.training.webhooks import WebhookDispatcher, copy_deliveries, read_secret, read_state
from atelier.v1 import training_pb2

log = logging.getLogger("atelier.training")
audit = logging.getLogger("atelier.audit")
S = training_pb2
#: Re-queue delays after a runner could not record a job's outcome, seconds.
REQUEUE_FIRST_S, REQUEUE_MAX_S = 1.0, 60.0
ACTIVE = (S.TRAINING_JOB_STATE_QUEUED, S.TRAINING_JOB_STATE_PREPARING,
          S.TRAINING_JOB_STATE_TRAINING, S.TRAINING_JOB_STATE_EXPORTING)


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
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._running: set[str] = set()
        self._tasks: list[asyncio.Task] = []
        self._seen_steps: dict[str, tuple[int, float]] = {}
        self._states: dict[str, int] = {}
        self._owners: dict[str, str] = {}
        self._submitting: dict[str, int] = {}  # per owner: submissions in progress
        self._lock = threading.Lock()  # _states, _owners and _submitting, across threads
        self._requeue_delay: dict[str, float] = {}
        self._requeues: set[asyncio.Task] = set()
        self._bases: dict[str, tuple] = {}
        self._last_retention_sweep = 0.0
        self._last_discovery = time.monotonic()
        self._draining_since: float | None = None
        self.faults = faults
        self.webhooks: WebhookDispatcher | None = None

    async def start(self) -> None:
        self.store = await asyncio.to_thread(open_store, self.settings.storage)
        self.jobs = JobStore(self.store)
        self.webhooks = WebhookDispatcher(self.jobs, self.config)
        await asyncio.to_thread(sweep_orphans, self.jobs)
        unfinished, hooked = await asyncio.to_thread(self._unfinished)
        for job in hooked:
            self.webhooks.follow(job)
        for job_id in unfinished:
            self._queue.put_nowait(job_id)
        if unfinished:
            log.info("resuming unfinished jobs", extra={"jobs": unfinished})
        self._tasks = [asyncio.create_task(self._worker(), name=f"training-slot-{i}")
                       for i in range(self.config.max_concurrent_jobs)]
        self._tasks.append(asyncio.create_task(self._poll(), name="training-progress"))

    def _unfinished(self) -> tuple[list[str], list[S.TrainingJob]]:
        """(ids of the unfinished jobs, oldest first; the jobs that have a webhook)."""
        out, hooked = [], []
        for job_id in self.jobs.ids():
            job = self._track(job_id)
            if job.state in ACTIVE:
                out.append((job.create_time.ToNanoseconds(), job_id))
            if job.spec.webhook.url:
                hooked.append(job)
        return [job_id for _, job_id in sorted(out)], hooked

    def _discover_jobs(self) -> list[S.TrainingJob]:
        """Track jobs this service did not submit (the standalone entrypoint's, another
        replica's): their state for the metrics; the ones with a webhook are returned to
        be delivered. They are not queued: whoever submitted them runs them."""
        hooked = []
        for job_id in self.jobs.ids():
            with self._lock:
                if job_id in self._states:
                    continue
            try:
                job = self._track(job_id)
            except NotFound:
                continue
            if job.spec.webhook.url:
                hooked.append(job)
        return hooked

    def _track(self, job_id: str) -> S.TrainingJob:
        """Load a job and record its state and owner (for the metrics and the limits)."""
        job = self.jobs.load(job_id)
        with self._lock:
            self._states[job_id] = job.state
            self._owners[job_id] = job.owner
        return job

    async def drain(self) -> None:
        """At the start of the drain: ask running jobs to checkpoint and stop, so they
        do it while the last RPCs finish."""
        self._draining_since = asyncio.get_running_loop().time()
        for job_id in list(self._running):
            try:
                await asyncio.to_thread(self.jobs.mark, job_id, "interrupt")
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
                delay = self._requeue_delay.get(job_id, REQUEUE_FIRST_S)
                self._requeue_delay[job_id] = min(REQUEUE_MAX_S, delay * 2)
                log.warning("training job could not record its outcome; re-queued",
                            extra={"job": job_id, "retry_in_s": delay}, exc_info=True)
                requeue = asyncio.create_task(self._requeue(job_id, delay))
                self._requeues.add(requeue)
                requeue.add_done_callback(self._requeues.discard)
            finally:
                self._running.discard(job_id)
                if self._seen_steps.pop(job_id, None) is not None:
                    self.metrics.loss.remove(job_id)  # only running jobs keep a loss series
                for score in Score:
                    with contextlib.suppress(KeyError):
                        self.metrics.subject_score.remove(job_id, score.value)

    async def _requeue(self, job_id: str, delay: float) -> None:
        await asyncio.sleep(delay)
        self._queue.put_nowait(job_id)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                await asyncio.to_thread(self._poll_once)
                if time.monotonic() - self._last_discovery > self.config.discover_jobs_interval_s:
                    self._last_discovery = time.monotonic()
                    for job in await asyncio.to_thread(self._discover_jobs):
                        self.webhooks.follow(job)
                if self.config.instance_image_retention_s is not None and \
                        time.monotonic() - self._last_retention_sweep > 60:
                    self._last_retention_sweep = time.monotonic()
                    await asyncio.to_thread(self.purge_expired_instance_images)
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
            for score in Score:
                if score.value in progress.get("scores", {}):
                    self.metrics.subject_score.labels(job_id, score.value).set(
                        float(progress["scores"][score.value]))
        for job_id, state in list(self._states.items()):
            if state not in TERMINAL:
                try:
                    self._states[job_id] = self.jobs.load(job_id).state
                except NotFound:
                    self._forget(job_id)
                except Exception:
                    continue
        counts = {name: 0 for name in S.TrainingJobState.keys()[1:]}
        for state in self._states.values():
            counts[S.TrainingJobState.Name(state)] += 1
        for name, count in counts.items():
            self.metrics.jobs.labels(name.removeprefix("TRAINING_JOB_STATE_")).set(count)

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
        self._admit_submission(principal)
        try:
            tokenizer, base = self._base(spec.base_model)
            job, created = submit_job(
                self.jobs, self.config, request_id, job_id, spec, principal=principal,
                tokenizer=tokenizer, should_stop=should_stop, base=base)
            if created:
                with self._lock:
                    self._states[JobStore.id_of(job)] = job.state
                    self._owners[JobStore.id_of(job)] = job.owner
                self._queue.put_nowait(JobStore.id_of(job))
            elif not principal.owns(job.owner):
                raise NotFound("training job", job.name)
        finally:
            with self._lock:
                self._submitting[principal.name] -= 1
        return job

    def _admit_submission(self, principal: Principal) -> None:
        """Count a submission against its owner's limit of unfinished jobs."""
        limit = self.config.max_active_jobs_per_principal
        with self._lock:
            active = sum(1 for job_id, state in self._states.items()
                         if state not in TERMINAL and self._owners.get(job_id) == principal.name)
            pending = self._submitting.get(principal.name, 0)
            if not principal.admin and active + pending >= limit:
                raise ResourceExhausted(
                    f"{principal.name} has {active} unfinished training jobs; the limit is "
                    f"{limit}. Retry when one has finished.", retry_after=30.0)
            self._submitting[principal.name] = pending + 1

    def _base(self, base_model: str):
        """The base model's tokenizer (for prompt-length checks) and ``BaseModelInfo``
        (loaded once per base)."""
        from atelier.model_sources import resolve_model_ref

        _, ref = resolve_base(base_model or f"models/{self.config.default_base_model}",
                              self.config)
        if ref not in self._bases:
            from transformers import CLIPTokenizer

            path = resolve_model_ref(ref, cache_dir=self.settings.models.cache_dir,
                                     store=self.store)
            self._bases[ref] = (CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
                                describe_base(path))
        return self._bases[ref]

    def _visible(self, job_id: str) -> S.TrainingJob:
        """The job if the caller may see it; NOT_FOUND (as if missing) otherwise."""
        job = self.jobs.load(job_id)
        if not current_principal().owns(job.owner):
            raise NotFound("training job", f"trainingJobs/{job_id}")
        return job

    async def get(self, name: str) -> S.TrainingJob:
        job_id = _job_id(name)
        return await asyncio.to_thread(lambda: self._with_progress(self._visible(job_id)))

    def _with_progress(self, job: S.TrainingJob) -> S.TrainingJob:
        job_id = JobStore.id_of(job)
        if job.spec.webhook.url:
            copy_deliveries(job, read_state(self.jobs, job_id))
        if job.state not in TERMINAL:
            progress = self.jobs.read_progress(job_id)
            if progress:
                from atelier.training.runner import _copy_progress, copy_scores

                _copy_progress(job, progress)
                copy_scores(job, read_scores(self.store, job_id))
            if self.jobs.marked(job_id, "cancel"):
                job.state = S.TRAINING_JOB_STATE_CANCELLING
        return job

    async def list(self, page_size: int, page_token: str, states: list[int]
                   ) -> tuple[list[S.TrainingJob], str]:
        """A page of the caller's jobs, newest first, optionally only in ``states``."""
        paginate([], page_size, page_token)  # validate before reading the store
        principal = current_principal()

        def load_all():
            jobs = []
            for job_id in self.jobs.ids():
                try:
                    job = self.jobs.load(job_id)
                except NotFound:  # deleted meanwhile
                    continue
                if principal.owns(job.owner):
                    jobs.append(self._with_progress(job))
            jobs = [j for j in jobs if not states or j.state in states]
            jobs.sort(key=lambda j: (j.create_time.ToNanoseconds(), j.name), reverse=True)
            return jobs

        return paginate(await asyncio.to_thread(load_all), page_size, page_token)

    async def cancel(self, name: str) -> S.TrainingJob:
        return await asyncio.to_thread(self._cancel, _job_id(name))

    def _cancel(self, job_id: str) -> S.TrainingJob:
        job = self._visible(job_id)
        if job.state in TERMINAL:
            raise FailedPrecondition(
                f"trainingJobs/{job_id} is already {S.TrainingJobState.Name(job.state)}")
        self.jobs.mark(job_id, "cancel")
        if job_id not in self._running:
            # Queued: cancel now; the queue skips it.
            set_state(self.jobs, job, S.TRAINING_JOB_STATE_CANCELLED)
            self._states[job_id] = job.state
        else:
            # Running: it stops at its next step; Watch reports CANCELLED then.
            job.state = S.TRAINING_JOB_STATE_CANCELLING
        return job

    async def delete(self, name: str) -> int:
        return await asyncio.to_thread(self._delete, _job_id(name))

    def _delete(self, job_id: str) -> int:
        job = self._visible(job_id)
        if job.state not in TERMINAL or job_id in self._running:
            raise FailedPrecondition(
                f"trainingJobs/{job_id} is {S.TrainingJobState.Name(job.state)}; cancel it "
                "and wait until it is CANCELLED before deleting it")
        priors_used = _prior_keys(self.jobs.read_mark(job_id, "class-priors"))
        record = job_key(job_id, "job.json")
        # The record goes last, so an interrupted delete leaves a listed job to
        # delete again rather than unlisted leftovers.
        removed = 0
        for info in list(self.store.list(job_key(job_id) + "/")):
            if info.key != record:
                self.store.delete(info.key)
                removed += 1
        if job.request_id and self.jobs.request_holder(job.owner, job.request_id) == job_id:
            self.jobs.forget_request(job.owner, job.request_id)
        model_id = job.spec.model_id or job_id
        if self.jobs.model_id_holder(model_id) == job_id:
            self.jobs.drop_model_id(model_id)
        self.store.delete(record)
        removed += 1
        self._forget(job_id)
        for key in priors_used:
            removed += self._collect_class_priors(key)
        audit.info("deleted training job", extra={
            "principal": current_principal().name, "job": job.name, "owner": job.owner,
            "objects": removed})
        return removed

    def _collect_class_priors(self, key: str) -> int:
        """Delete cached class images no job refers to any more (shared by content hash,
        so they go with the last job that used them). Kept while an unfinished job
        with prior preservation has not yet said which priors it uses."""
        for job_id in self.jobs.ids():
            mark = self.jobs.read_mark(job_id, "class-priors")
            if key in _prior_keys(mark):
                return 0
            with self._lock:
                state = self._states.get(job_id)
            if mark is None and state is not None and state not in TERMINAL and any(
                    c.prior_preservation.enabled for c in concepts_of(self.jobs.load(job_id).spec)):
                return 0
        removed = self.store.delete_prefix(priors.PRIORS + key + "/")
        audit.info("deleted unreferenced class priors", extra={
            "principal": current_principal().name, "class_priors": key, "objects": removed})
        return removed

    def purge_expired_instance_images(self) -> int:
        """Delete the instance images of jobs that ended more than the retention ago."""
        retention = self.config.instance_image_retention_s
        if retention is None:
            return 0
        cutoff = time.time() - retention
        removed = 0
        with self._lock:
            finished = [j for j, state in self._states.items() if state in TERMINAL]
        for job_id in finished:
            if self.jobs.marked(job_id, "instance-images-purged"):
                continue
            try:
                job = self.jobs.load(job_id)
            except NotFound:
                continue
            if not job.HasField("end_time") or job.end_time.ToSeconds() > cutoff:
                continue
            count = self.store.delete_prefix(job_key(job_id, "instance") + "/")
            self.jobs.mark(job_id, "instance-images-purged", {"objects": count})
            removed += count
            audit.info("purged instance images after retention", extra={
                "principal": "retention", "job": job.name, "owner": job.owner,
                "objects": count, "retention_s": retention})
        return removed

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._states.pop(job_id, None)
            self._owners.pop(job_id, None)

    async def watch(self, name: str) -> AsyncIterator[S.WatchTrainingJobResponse]:
        job_id = _job_id(name)
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


def _prior_keys(mark: dict | None) -> list[str]:
    """The class-prior cache keys a job's ``class-priors`` marker names."""
    if not mark:
        return []
    return list(mark.get("keys") or ([mark["key"]] if mark.get("key") else []))


def _job_id(name: str) -> str:
    if not name.startswith("trainingJobs/") or not MODEL_ID_RE.match(
            name.removeprefix("trainingJobs/")):
        raise InvalidArgument([FieldViolation("name", "must look like trainingJobs/{id}")])
    return name.removeprefix("trainingJobs/")
