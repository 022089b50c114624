"""Running one training job through its phases, against the object store.

PREPARING (class priors) -> TRAINING (Ray Train) -> EXPORTING -> SUCCEEDED, or
FAILED with a reason, or CANCELLED. The service and the standalone entrypoint
both call :func:`run_job`; every state change is written to the job record and
as a Watch event, so whoever watches the store sees the same job.

Each phase (:func:`_prepare`, :func:`_train`, :func:`_finish`) loads what it
needs once and owns its failure path: an error fails the job with a one-line
reason; only a store that cannot record the failure escapes to the caller.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path

from atelier.kit.errors import AtelierError
from atelier.kit.settings import StorageSettings
from atelier.models.manifest import MANIFEST_NAME, model_key
from atelier.models.sources import resolve_model_ref
from atelier.storage import ObjectStore
from atelier.training import evaluation, priors
from atelier.training.bases import base_family, resolve_base, serving_bases
from atelier.training.config import TrainingEngineSettings
from atelier.training.export import ExportTarget, checkpoint_to_export, export_model
from atelier.training.faults import Faults
from atelier.training.jobs import CANCEL, CLASS_PRIORS, INTERRUPT, OUTCOME, JobStore
from atelier.training.loop import Outcome
from atelier.training.ray_cluster import ensure_ray, fit
from atelier.training.records import copy_progress, copy_scores, failure_reason, set_state
from atelier.training.tracking import log_export
from atelier.training.train_config import TrainConfig
from atelier.training.worker_config import TrackingTargets, WorkerConfig, worker_storage
from atelier.v1 import training_pb2

log = logging.getLogger("atelier.training.runner")
S = training_pb2


class RunResult(StrEnum):
    """How :func:`run_job` left a job: a terminal state, or interrupted (resumable)."""

    SUCCEEDED = "TRAINING_JOB_STATE_SUCCEEDED"
    FAILED = "TRAINING_JOB_STATE_FAILED"
    CANCELLED = "TRAINING_JOB_STATE_CANCELLED"
    INTERRUPTED = "INTERRUPTED"


_TERMINAL_RESULTS = {S.TRAINING_JOB_STATE_SUCCEEDED: RunResult.SUCCEEDED,
                     S.TRAINING_JOB_STATE_FAILED: RunResult.FAILED,
                     S.TRAINING_JOB_STATE_CANCELLED: RunResult.CANCELLED}


@dataclass
class Prepared:
    """What the prepare phase resolved, for the later phases."""

    job: S.TrainingJob
    train: TrainConfig
    target: ExportTarget
    worker: WorkerConfig


def run_job(store: ObjectStore, storage: StorageSettings, settings: TrainingEngineSettings,
            cache_dir: Path, job_id: str, *, faults: Faults | None = None) -> RunResult:
    """Run (or resume) a job to its end, or to an interrupt (it stays resumable).

    ``faults`` is for tests only (see ``faults.Faults``)."""
    jobs = JobStore(store)
    job = jobs.load(job_id)
    if job.state in _TERMINAL_RESULTS:
        return _TERMINAL_RESULTS[job.state]
    jobs.clear(job_id, INTERRUPT)
    jobs.clear(job_id, OUTCOME)
    prepared = _prepare(jobs, job, storage, settings, Path(cache_dir).resolve(), faults)
    if isinstance(prepared, RunResult):
        return prepared
    result = _train(jobs, prepared, settings)
    if result is not None:
        return result
    return _finish(jobs, prepared, settings)


def _prepare(jobs: JobStore, job: S.TrainingJob, storage: StorageSettings,
             settings: TrainingEngineSettings, cache_dir: Path,
             faults: Faults | None) -> Prepared | RunResult:
    """PREPARING: the base model, the training config, Ray, and the class priors."""
    job_id = JobStore.id_of(job)
    try:
        if jobs.marked(job_id, CANCEL):
            set_state(jobs, job, S.TRAINING_JOB_STATE_CANCELLED)
            return RunResult.CANCELLED
        spec = job.spec
        base_id, base_ref = resolve_base(spec.base_model, settings)
        path = resolve_model_ref(base_ref, cache_dir=cache_dir, store=jobs.store)
        train = TrainConfig.from_spec(spec, base_family(path))
        ensure_ray(settings)
        set_state(jobs, job, S.TRAINING_JOB_STATE_PREPARING)
        worker = WorkerConfig(
            job_id=job_id, train=train, storage=worker_storage(storage),
            cache_dir=str(cache_dir), base_ref=base_ref,
            tracking=TrackingTargets.of(settings), clip_model=settings.clip_model,
            dino_model=settings.dino_model, faults=faults)
        worker = replace(worker, class_keys=_class_priors(jobs, worker, path, spec.resources))
        target = ExportTarget(spec.model_id or job_id, base_id, base_ref, path,
                              also_fits=tuple(serving_bases(base_id, settings)[1:]))
        return Prepared(job, train, target, worker)
    except Exception as exc:
        return _failed(jobs, job_id, exc)


def _train(jobs: JobStore, prepared: Prepared,
           settings: TrainingEngineSettings) -> RunResult | None:
    """TRAINING: the Ray Train run; then the outcome the loop recorded. None when it
    completed (the export follows)."""
    job_id = prepared.worker.job_id
    try:
        set_state(jobs, prepared.job, S.TRAINING_JOB_STATE_TRAINING)
        fit(prepared.worker, prepared.job.spec.resources, settings)
        outcome = (jobs.read_mark(job_id, OUTCOME) or {}).get("status")
        job = prepared.job = jobs.load(job_id)
        copy_progress(job, jobs.read_progress(job_id) or {})
        copy_scores(job, evaluation.read_scores(jobs.store, job_id))  # kept when cancelled too
        if outcome == Outcome.CANCELLED or jobs.marked(job_id, CANCEL):
            set_state(jobs, job, S.TRAINING_JOB_STATE_CANCELLED)
            return RunResult.CANCELLED
        if outcome == Outcome.INTERRUPTED:
            jobs.save(job)
            return RunResult.INTERRUPTED
        if outcome != Outcome.COMPLETED:
            raise RuntimeError("training ended without reporting an outcome")
        return None
    except Exception as exc:
        return _failed(jobs, job_id, exc)


def _finish(jobs: JobStore, prepared: Prepared, settings: TrainingEngineSettings) -> RunResult:
    """The quality gate, then EXPORTING the chosen checkpoint as a model, SUCCEEDED."""
    job, train, target = prepared.job, prepared.train, prepared.target
    job_id = prepared.worker.job_id
    try:
        step, scores = checkpoint_to_export(jobs.store, job_id, train)
        failure = evaluation.gate_failure(scores.scores, train.evaluation.gate) \
            if scores is not None else None
        if failure:
            set_state(jobs, job, S.TRAINING_JOB_STATE_FAILED,
                      f"checkpoint step {step} failed the quality gate: {failure}")
            return RunResult.FAILED
        set_state(jobs, job, S.TRAINING_JOB_STATE_EXPORTING)
        export_model(jobs.store, job, train, target, step, scores)
        try:  # the model is exported: a tracker outage must not fail the job now
            log_export(jobs.store, job_id, settings.mlflow_tracking_uri,
                       model_key(target.model_id, MANIFEST_NAME))
        except Exception:
            log.warning("could not add the manifest to the MLflow run",
                        extra={"job": job_id}, exc_info=True)
        job.model = f"models/{target.model_id}"
        job.exported_step = step
        set_state(jobs, job, S.TRAINING_JOB_STATE_SUCCEEDED)
        return RunResult.SUCCEEDED
    except Exception as exc:
        return _failed(jobs, job_id, exc)


def _failed(jobs: JobStore, job_id: str, exc: Exception) -> RunResult:
    """Record a phase's failure on the job (re-read: the phase may have left it half
    changed). A store that cannot record it raises to the caller, which re-queues."""
    reason = exc.message if isinstance(exc, AtelierError) else failure_reason(exc)
    log.error("training job failed", extra={"job": job_id}, exc_info=exc)
    set_state(jobs, jobs.load(job_id), S.TRAINING_JOB_STATE_FAILED, reason)
    return RunResult.FAILED


def _class_priors(jobs: JobStore, worker: WorkerConfig, path: str,
                  resources: S.TrainingResources) -> dict[int, list[str]]:
    """Each class-image concept's class images (by concept index), generated or cached."""
    train = worker.train
    out: dict[int, list[str]] = {}
    keys, generated = [], 0
    fingerprint = None
    for index, concept in enumerate(train.concepts):
        pp = concept.prior
        if not pp.uses_class_images:
            continue
        fingerprint = fingerprint or priors.model_fingerprint(path)
        key = priors.cache_key(worker.base_ref, fingerprint, concept.class_prompt,
                               train.resolution, pp.class_image_steps,
                               pp.class_image_guidance_scale, train.seed)
        out[index], made = priors.ensure_class_priors(
            jobs.store, key=key, count=pp.num_class_images, model_path=path,
            prompt=concept.class_prompt, resolution=train.resolution,
            steps=pp.class_image_steps, guidance=pp.class_image_guidance_scale,
            seed=train.seed, storage=worker.storage, workers=resources.num_workers,
            cpus=resources.cpus_per_worker, gpus=resources.gpus_per_worker)
        keys.append(key)
        generated += made
    if keys:
        jobs.mark(worker.job_id, CLASS_PRIORS, {
            "keys": keys, "generated": generated, "count": sum(len(v) for v in out.values())})
    return out
