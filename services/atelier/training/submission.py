"""Submitting a training job: validate, claim its names, store images and record, once.

Shared by the service (CreateTrainingJob) and the standalone entrypoint, so a
job spec is checked the same way whichever way it arrives. Nothing is stored
for a request that fails validation.

Creation is atomic. In order:

1. validate everything, decode-check the images (no store writes yet);
2. claim the request id (per owner), so that concurrent retries of one
   request wait for the first one's job instead of creating their own;
3. reserve the model id, so that no two jobs export over one model;
4. upload the instance images into a folder of this submission's own;
5. write the job record only if the job id is free: the commit point.

A failure after step 2 undoes what this submission wrote (claims, uploads),
so no orphans remain; if the store is down even for that, the leftovers are
unreferenced objects that :func:`sweep_orphans` removes at the next start.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from atelier.kit.auth import Principal
from atelier.kit.errors import AlreadyExists, Cancelled, InvalidArgument, Unavailable
from atelier.models.manifest import MANIFEST_NAME, model_key
from atelier.models.pipelines import SD
from atelier.storage import ObjectNotFound
from atelier.storage.references import read_reference
from atelier.training import defaults, webhooks
from atelier.training.bases import BaseModelInfo, base_of_spec
from atelier.training.config import TrainingEngineSettings
from atelier.training.jobs import JOBS, MODEL_IDS, TERMINAL, Claim, JobStore, job_key, now
from atelier.training.spec import (
    MODEL_ID_RE,
    apply_defaults,
    check_images,
    check_masks,
    concept_fields,
    validate,
)
from atelier.v1 import common_pb2, training_pb2

log = logging.getLogger("atelier.training.submission")
S = training_pb2
#: How long a retry waits for the first attempt of its request to commit, seconds.
REQUEST_WAIT_S = 60.0
#: Age after which objects under a job folder without a record are orphans, seconds.
ORPHAN_AGE_S = 3600.0


def submit_job(jobs: JobStore, config: TrainingEngineSettings, request_id: str, job_id: str,
               spec: S.TrainingJobSpec, *, principal: Principal | None = None,
               tokenizer=None, should_stop: Callable[[], bool] | None = None,
               base: BaseModelInfo | None = None) -> tuple[S.TrainingJob, bool]:
    """(the job, whether it was created now). A known request_id returns its job.

    ``tokenizer`` (the base model's) checks prompt lengths; ``base`` gives the
    family (for its fields) and the default resolution (SD 1.x at 128 px when
    None); ``should_stop`` is
    polled between uploads, and a True stops the submission and undoes it (the
    RPC was cancelled)."""
    principal = principal or Principal("anonymous")
    owner = principal.name
    if len(request_id) > 128:
        raise InvalidArgument.field("request_id", "is longer than 128 characters")
    if request_id:
        known = _committed_job(jobs, owner, request_id)
        if known is not None:
            return known, False
    if job_id and not MODEL_ID_RE.match(job_id):
        raise InvalidArgument.field("training_job_id",
                                    "must be 1-63 chars of [a-z0-9-], starting with a letter")
    base_of_spec(spec, config)
    base = base or BaseModelInfo(SD, defaults.RESOLUTION)
    full = apply_defaults(spec, config, base.default_resolution, uuid.uuid4().int % (2**31),
                          base.family)
    validate(full, config, tokenizer, base.family)
    uploads = _read_images(jobs, full, config, principal)
    job_id = job_id or f"job-{uuid.uuid4().hex[:12]}"
    model_id = full.model_id or job_id

    undo: list[Callable[[], None]] = []
    try:
        if request_id:
            claim = jobs.claim_request(owner, request_id, job_id)
            if not claim.ours:
                return _wait_for_request(jobs, config, owner, request_id, job_id, spec,
                                         principal, tokenizer, should_stop, base), False
            undo.append(lambda: jobs.release_request(owner, request_id, claim))
        if jobs.exists(job_id):
            raise AlreadyExists(f"training job trainingJobs/{job_id} already exists")
        model_claim = _reserve_model_id(jobs, model_id, job_id, principal)
        undo.append(lambda: jobs.release_model_id(model_id, model_claim))

        upload = uuid.uuid4().hex[:12]
        for n, (target, data) in enumerate(uploads):
            if should_stop is not None and should_stop():
                raise Cancelled("the request was cancelled; nothing was submitted")
            key = job_key(job_id, "instance", upload, f"{n:03d}.img")
            undo.append(lambda key=key: jobs.store.delete(key))
            jobs.store.put_bytes(key, data)
            target.Clear()
            target.object.CopyFrom(common_pb2.ObjectRef(key=key))
        if full.webhook.url:
            undo.append(lambda: jobs.store.delete(webhooks.secret_key(job_id)))
            jobs.store.put_bytes(webhooks.secret_key(job_id), webhooks.new_secret().encode())
        job = S.TrainingJob(name=f"trainingJobs/{job_id}", spec=full,
                            state=S.TRAINING_JOB_STATE_QUEUED, request_id=request_id,
                            owner=owner)
        job.create_time.CopyFrom(now())
        job.progress.max_steps = full.max_train_steps
        if should_stop is not None and should_stop():
            raise Cancelled("the request was cancelled; nothing was submitted")
        if not jobs.create(job):
            raise AlreadyExists(f"training job trainingJobs/{job_id} already exists")
    except BaseException:
        _undo(undo, job_id)
        raise
    jobs.event(job_id, state_changed=S.TrainingStateChanged(state=S.TRAINING_JOB_STATE_QUEUED))
    return job, True


def _committed_job(jobs: JobStore, owner: str, request_id: str) -> S.TrainingJob | None:
    holder = jobs.request_holder(owner, request_id)
    if holder and jobs.exists(holder):
        return jobs.load(holder)
    return None


def _wait_for_request(jobs: JobStore, config, owner: str, request_id: str, job_id: str, spec,
                      principal, tokenizer, should_stop, base) -> S.TrainingJob:
    """Another call holds ``request_id``: its job, once committed. If that call fails
    and releases the claim, this one submits the request itself."""
    deadline = time.monotonic() + REQUEST_WAIT_S
    while time.monotonic() < deadline:
        if should_stop is not None and should_stop():
            raise Cancelled("the request was cancelled")
        holder = jobs.request_holder(owner, request_id)
        if holder is None:  # the first attempt failed and let go: try again ourselves
            return submit_job(jobs, config, request_id, job_id, spec, principal=principal,
                              tokenizer=tokenizer, should_stop=should_stop, base=base)[0]
        if jobs.exists(holder):
            return jobs.load(holder)
        time.sleep(0.05)
    raise Unavailable("an earlier call with this request_id is still being submitted; "
                      "retry with the same request_id")


def _reserve_model_id(jobs: JobStore, model_id: str, job_id: str,
                      principal: Principal) -> Claim:
    """Reserve ``model_id`` for ``job_id``; ALREADY_EXISTS while a model or a live job
    holds it (naming the job only to a principal who may see it). A reservation left
    by a finished job that exported nothing, or by a submission that never committed
    (older than ORPHAN_AGE_S), is taken over."""
    for _ in range(3):
        if jobs.store.exists(model_key(model_id, MANIFEST_NAME)):
            raise AlreadyExists(f"model models/{model_id} already exists",
                                metadata={"model": f"models/{model_id}"})
        claim = jobs.claim_model_id(model_id, job_id)
        if claim.ours:
            return claim
        holder = claim.job_id
        if holder and jobs.exists(holder):
            record = jobs.load(holder)
            if record.state not in TERMINAL:
                by = f"trainingJobs/{holder}" if principal.owns(record.owner) \
                    else "another principal's training job"
                raise AlreadyExists(f"model id {model_id!r} is held by {by}",
                                    metadata={"model": f"models/{model_id}"})
        elif not _stale(jobs, model_id):
            raise AlreadyExists(f"model id {model_id!r} is being reserved by another "
                                "submission", metadata={"model": f"models/{model_id}"})
        jobs.drop_model_id(model_id)
    raise AlreadyExists(f"model id {model_id!r} is contended; retry")


def _stale(jobs: JobStore, model_id: str) -> bool:
    try:
        info = jobs.store.stat(MODEL_IDS + model_id)
    except ObjectNotFound:  # released meanwhile
        return True
    if info.last_modified is None:
        return False
    return time.time() - info.last_modified.timestamp() > ORPHAN_AGE_S


def _undo(steps: list[Callable[[], None]], job_id: str) -> None:
    for step in reversed(steps):
        try:
            step()
        except Exception:
            log.warning("could not undo part of a failed submission; the next start sweeps it",
                        extra={"job": job_id}, exc_info=True)


def sweep_orphans(jobs: JobStore, older_than_s: float = ORPHAN_AGE_S) -> int:
    """Delete objects under job folders that have no job record and are older than
    ``older_than_s``: the leftovers of submissions that failed while the store was
    down. Returns how many objects went."""
    committed = set(jobs.ids())
    cutoff = time.time() - older_than_s
    removed = 0
    for info in list(jobs.store.list(JOBS)):
        job_id = info.key[len(JOBS):].split("/", 1)[0]
        if job_id in committed:
            continue
        if info.last_modified is not None and info.last_modified.timestamp() > cutoff:
            continue  # possibly a submission in progress
        jobs.store.delete(info.key)
        removed += 1
    if removed:
        log.info("swept orphaned submission objects", extra={"objects": removed})
    return removed


def _read_images(jobs: JobStore, full: S.TrainingJobSpec, config: TrainingEngineSettings,
                 principal: Principal) -> list[tuple[common_pb2.ImageInput, bytes]]:
    """Every instance image and mask of the spec, read (inline or from the caller's
    uploads) and checked: (the field to point at its stored copy, its bytes)."""
    images, masks = [], []
    for ci, concept in enumerate(full.concepts):
        names = concept_fields(full, ci)
        for j, item in enumerate(concept.images):
            images.append((names["image"].format(j=j), item.image))
            if item.HasField("mask"):
                masks.append((names["mask"].format(j=j), item.mask, len(images) - 1))
            elif item.mask_from_alpha:
                masks.append((names["mask"].format(j=j), None, len(images) - 1))
    if not full.concepts:
        images = [(f"instance_images[{j}]", image) for j, image in
                  enumerate(full.instance_images)]
    blobs = [(f"spec.{field}", _image_bytes(jobs, image, f"spec.{field}", principal))
             for field, image in images]
    decoded = check_images(blobs, config.max_instance_image_pixels)
    mask_blobs = [(f"spec.{field}", None if mask is None else
                   _image_bytes(jobs, mask, f"spec.{field}", principal), mask is None,
                   decoded[index]) for field, mask, index in masks]
    check_masks(mask_blobs, config.max_instance_image_pixels)
    out = [(image, data) for (_, image), (_, data) in zip(images, blobs, strict=True)]
    for (_, mask, _), (_, data, from_alpha, _) in zip(masks, mask_blobs, strict=True):
        if not from_alpha:
            out.append((mask, data))
    return out


def _image_bytes(jobs: JobStore, image: common_pb2.ImageInput, field: str,
                 principal: Principal) -> bytes:
    which = image.WhichOneof("source")
    if which == "data":
        return image.data
    if which == "object":
        return read_reference(jobs.store, image.object.key, image.object.bucket,
                              f"{field}.object", principal)
    raise InvalidArgument.field(field, "set data or object")
