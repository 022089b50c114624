"""Submitting a training job: validate, store the images and the record, once.

Shared by the service (CreateTrainingJob) and the standalone entrypoint, so a
job spec is checked the same way whichever way it arrives. Nothing is stored
for a request that fails validation.
"""

from __future__ import annotations

import uuid

from atelier.kit.errors import AlreadyExists, InvalidArgument
from atelier.storage import ObjectNotFound
from atelier.training.config import TrainingEngineSettings
from atelier.training.jobs import JobStore, job_key, now
from atelier.training.runner import resolve_base
from atelier.training.spec import MODEL_ID_RE, apply_defaults, check_images, validate
from atelier.v1 import common_pb2, training_pb2

S = training_pb2
DEFAULT_RESOLUTION = 128


def submit_job(jobs: JobStore, config: TrainingEngineSettings, request_id: str, job_id: str,
               spec: S.TrainingJobSpec) -> tuple[S.TrainingJob, bool]:
    """(the job, whether it was created now). A known request_id returns its job."""
    store = jobs.store
    if len(request_id) > 128:
        raise InvalidArgument.field("request_id", "is longer than 128 characters")
    if request_id:
        existing = jobs.job_for_request(request_id)
        if existing:
            return jobs.load(existing), False
    if job_id and not MODEL_ID_RE.match(job_id):
        raise InvalidArgument.field("training_job_id",
                                    "must be 1-63 chars of [a-z0-9-], starting with a letter")
    resolve_base(spec.base_model or f"models/{config.default_base_model}", config)
    full = apply_defaults(spec, config, DEFAULT_RESOLUTION, uuid.uuid4().int % (2**31))
    validate(full, config)
    blobs = [_image_bytes(jobs, img, i) for i, img in enumerate(full.instance_images)]
    check_images(blobs)
    job_id = job_id or f"job-{uuid.uuid4().hex[:12]}"
    if store.exists(job_key(job_id, "job.json")):
        raise AlreadyExists(f"training job trainingJobs/{job_id} already exists")
    del full.instance_images[:]
    for i, data in enumerate(blobs):
        key = job_key(job_id, "instance", f"{i:03d}.img")
        store.put_bytes(key, data)
        full.instance_images.add(object=common_pb2.ObjectRef(key=key))
    job = S.TrainingJob(name=f"trainingJobs/{job_id}", spec=full,
                        state=S.TRAINING_JOB_STATE_QUEUED, request_id=request_id)
    job.create_time.CopyFrom(now())
    job.progress.max_steps = full.max_train_steps
    jobs.save(job)
    if request_id:
        jobs.bind_request(request_id, job_id)
    jobs.event(job_id, state_changed=S.TrainingStateChanged(state=S.TRAINING_JOB_STATE_QUEUED))
    return job, True


def _image_bytes(jobs: JobStore, image: common_pb2.ImageInput, i: int) -> bytes:
    which = image.WhichOneof("source")
    if which == "data":
        return image.data
    if which == "object":
        store = jobs.store
        if image.object.bucket and image.object.bucket != store.bucket:
            raise InvalidArgument.field(f"spec.instance_images[{i}].object.bucket",
                                        f"must be empty or {store.bucket!r}")
        try:
            return store.get_bytes(image.object.key)
        except ObjectNotFound:
            raise InvalidArgument.field(f"spec.instance_images[{i}].object.key",
                                        "no such object") from None
    raise InvalidArgument.field(f"spec.instance_images[{i}]", "set data or object")
