"""The job record's fields that the runner and the engine write: state changes,
progress and subject scores copied onto the record, and failure reasons."""

from __future__ import annotations

from atelier.training.evaluation import StepScores
from atelier.training.jobs import CANCEL, TERMINAL, JobStore, now
from atelier.v1 import training_pb2

S = training_pb2

#: The progress fields (``progress.json``, rank 0) a job record carries.
PROGRESS_FIELDS = ("step", "max_steps", "loss", "instance_loss", "prior_loss", "learning_rate",
                   "steps_per_second", "samples_per_second")


def set_state(jobs: JobStore, job: S.TrainingJob, state: int, reason: str = "") -> None:
    """Move the job to ``state`` (with its reason when FAILED), stamp its start and end,
    save the record and write the StateChanged event."""
    job.state = state
    if state == S.TRAINING_JOB_STATE_FAILED:
        job.failure_reason = reason
    if state != S.TRAINING_JOB_STATE_QUEUED and not job.HasField("start_time"):
        job.start_time.CopyFrom(now())
    if state in TERMINAL:
        job.end_time.CopyFrom(now())
    jobs.save(job)
    jobs.event(JobStore.id_of(job),
               state_changed=S.TrainingStateChanged(state=state, reason=reason))


def copy_progress(job: S.TrainingJob, progress: dict) -> None:
    """The latest progress (``progress.json``) onto the record."""
    for name in PROGRESS_FIELDS:
        if name in progress:
            setattr(job.progress, name, progress[name])
    if progress.get("latest_checkpoint"):
        job.latest_checkpoint = progress["latest_checkpoint"]


def copy_scores(job: S.TrainingJob, scores: list[StepScores]) -> None:
    """Every scored checkpoint's subject scores onto the record."""
    del job.scores[:]
    job.scores.extend(s.to_proto() for s in scores)


def failure_reason(exc: BaseException) -> str:
    """A one-line failure reason without stack traces or paths. A failure of Ray's
    worker group is told by the first failing rank's own error, which is the cause."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        exc = failures[min(failures)]
        exc = getattr(exc, "cause", None) or exc  # a RayTaskError wraps the user's error
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:500]


def with_progress(jobs: JobStore, job: S.TrainingJob) -> S.TrainingJob:
    """The record as a caller sees it: with its webhook deliveries, and while it runs
    its latest progress and scores, and CANCELLING once a cancel is asked."""
    from atelier.training.evaluation import read_scores
    from atelier.training.webhooks import copy_deliveries, read_state

    job_id = JobStore.id_of(job)
    if job.spec.webhook.url:
        copy_deliveries(job, read_state(jobs, job_id))
    if job.state not in TERMINAL:
        progress = jobs.read_progress(job_id)
        if progress:
            copy_progress(job, progress)
            copy_scores(job, read_scores(jobs.store, job_id))
        if jobs.marked(job_id, CANCEL):
            job.state = S.TRAINING_JOB_STATE_CANCELLING
    return job
