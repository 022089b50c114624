"""Deleting a finished job with everything it stored, garbage-collecting the class
priors no job refers to, and purging instance images after the retention.

Each deletion and purge writes one line to the ``atelier.audit`` log.
"""

from __future__ import annotations

import logging
import time

from atelier.kit.errors import NotFound
from atelier.storage import ObjectStore
from atelier.training import priors
from atelier.training.job_table import JobTable
from atelier.training.jobs import CLASS_PRIORS, INSTANCE_IMAGES_PURGED, JobStore, job_key
from atelier.v1 import training_pb2

audit = logging.getLogger("atelier.audit")
S = training_pb2


def prior_keys(mark: dict | None) -> list[str]:
    """The class-prior cache keys a job's ``class-priors`` marker names."""
    if not mark:
        return []
    return list(mark.get("keys") or ([mark["key"]] if mark.get("key") else []))


def delete_job(jobs: JobStore, table: JobTable, job: S.TrainingJob, principal: str) -> int:
    """Delete a finished job's objects, its request and model-id claims, then its record
    (last: an interrupted delete leaves a listed job to delete again rather than
    unlisted leftovers), then the class priors no other job uses. Returns the count."""
    store = jobs.store
    job_id = JobStore.id_of(job)
    priors_used = prior_keys(jobs.read_mark(job_id, CLASS_PRIORS))
    record = job_key(job_id, "job.json")
    removed = 0
    for info in list(store.list(job_key(job_id) + "/")):
        if info.key != record:
            store.delete(info.key)
            removed += 1
    if job.request_id and jobs.request_holder(job.owner, job.request_id) == job_id:
        jobs.forget_request(job.owner, job.request_id)
    model_id = job.spec.model_id or job_id
    if jobs.model_id_holder(model_id) == job_id:
        jobs.drop_model_id(model_id)
    store.delete(record)
    removed += 1
    table.forget(job_id)
    for key in priors_used:
        removed += collect_class_priors(jobs, table, key, principal)
    audit.info("deleted training job", extra={
        "principal": principal, "job": job.name, "owner": job.owner, "objects": removed})
    return removed


def collect_class_priors(jobs: JobStore, table: JobTable, key: str, principal: str) -> int:
    """Delete cached class images no job refers to any more (shared by content hash,
    so they go with the last job that used them). Kept while an unfinished job
    with prior preservation has not yet said which priors it uses."""
    for job_id in jobs.ids():
        mark = jobs.read_mark(job_id, CLASS_PRIORS)
        if key in prior_keys(mark):
            return 0
        if mark is None and table.may_need_priors(job_id):
            return 0
    removed = jobs.store.delete_prefix(priors.PRIORS + key + "/")
    audit.info("deleted unreferenced class priors", extra={
        "principal": principal, "class_priors": key, "objects": removed})
    return removed


def purge_expired_instance_images(store: ObjectStore, table: JobTable,
                                  retention_s: float | None) -> int:
    """Delete the instance images of jobs that ended more than ``retention_s`` ago."""
    if retention_s is None:
        return 0
    jobs = table.jobs
    cutoff = time.time() - retention_s
    removed = 0
    for job_id in table.finished():
        if jobs.marked(job_id, INSTANCE_IMAGES_PURGED):
            continue
        try:
            job = jobs.load(job_id)
        except NotFound:
            continue
        if not job.HasField("end_time") or job.end_time.ToSeconds() > cutoff:
            continue
        count = store.delete_prefix(job_key(job_id, "instance") + "/")
        jobs.mark(job_id, INSTANCE_IMAGES_PURGED, {"objects": count})
        removed += count
        audit.info("purged instance images after retention", extra={
            "principal": "retention", "job": job.name, "owner": job.owner,
            "objects": count, "retention_s": retention_s})
    return removed
