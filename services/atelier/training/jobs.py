"""Training jobs in the object store: records, events, markers and checkpoints.

The store is the single source of truth, so a job survives a service restart
and a job run by the standalone entrypoint (a Kubernetes Job or RayJob) is
visible to the service and the CLI. Layout under ``training/``::

    jobs/<id>/job.json                  the TrainingJob record (proto JSON), written
                                        last and only if absent: the job's commit point
    jobs/<id>/instance/<upload>/<n>.img instance images, in a folder per submission
    jobs/<id>/events/<time>-<rand>.json WatchTrainingJob events, in time order
    jobs/<id>/progress.json             latest progress (written by rank 0)
    jobs/<id>/markers/<name>            cancel / interrupt requests, outcome
    jobs/<id>/checkpoints/step-<n>/...  full-state checkpoints
    jobs/<id>/validation/step-<n>-<i>.png
    jobs/<id>/tensorboard/...           TensorBoard event files
    requests/<sha256(owner, request_id)>  idempotency: the job a request claimed
    model-ids/<model_id>                the job that holds a model id until it exports
    class-priors/<key>/...              cached class images

Names are claimed with the store's conditional write (``create_bytes``), so
concurrent submissions cannot both take a request id, a job id or a model id.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf import json_format, timestamp_pb2

from atelier.kit.errors import NotFound
from atelier.storage import ObjectNotFound, ObjectStore
from atelier.v1 import training_pb2

ROOT = "training/"
JOBS = ROOT + "jobs/"
TERMINAL = frozenset({training_pb2.TRAINING_JOB_STATE_SUCCEEDED,
                      training_pb2.TRAINING_JOB_STATE_FAILED,
                      training_pb2.TRAINING_JOB_STATE_CANCELLED})


MODEL_IDS = ROOT + "model-ids/"

# Job markers (``jobs/<id>/markers/<name>``): small flags and records beside a job.
CANCEL = "cancel"
"""Asked to cancel: the runner and every rank stop at the next step."""
INTERRUPT = "interrupt"
"""Asked to stop and stay resumable (the service is draining)."""
OUTCOME = "outcome"
"""How the training loop ended (rank 0): ``{"status", "step", "seconds"}``."""
CLASS_PRIORS = "class-priors"
"""The class-prior cache keys the job uses (deletion keeps shared ones)."""
INSTANCE_IMAGES_PURGED = "instance-images-purged"
"""Retention has deleted the job's instance images."""
TRACKING = "tracking"
"""The job's MLflow and W&B run ids, so a resumed job logs to the same runs."""
INJECTED_FAILURE = "injected-failure"
"""Tests only: the fault ``faults.Faults`` injected, so it fires once."""


@dataclass(frozen=True)
class Claim:
    """The outcome of claiming a name: the job that holds it, and whether it is ours."""

    job_id: str
    attempt: str
    ours: bool


def _request_key(owner: str, request_id: str) -> str:
    digest = hashlib.sha256(f"{owner}\0{request_id}".encode()).hexdigest()
    return ROOT + "requests/" + digest


def job_key(job_id: str, *parts: str) -> str:
    return "/".join([JOBS + job_id, *parts])


def now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.now(UTC))
    return stamp


class JobStore:
    """Typed access to the training layout of the object store."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    # -- records ----------------------------------------------------------------------------
    def save(self, job: training_pb2.TrainingJob) -> None:
        job.update_time.CopyFrom(now())
        self.store.put_bytes(job_key(self.id_of(job), "job.json"),
                             json_format.MessageToJson(job).encode(), "application/json")

    def load(self, job_id: str) -> training_pb2.TrainingJob:
        try:
            data = self.store.get_bytes(job_key(job_id, "job.json"))
        except ObjectNotFound:
            raise NotFound("training job", f"trainingJobs/{job_id}") from None
        return json_format.Parse(data, training_pb2.TrainingJob())

    def ids(self) -> list[str]:
        return sorted(info.key.split("/")[2] for info in self.store.list(JOBS)
                      if info.key.endswith("/job.json") and info.key.count("/") == 3)

    @staticmethod
    def id_of(job: training_pb2.TrainingJob) -> str:
        return job.name.removeprefix("trainingJobs/")

    def create(self, job: training_pb2.TrainingJob) -> bool:
        """Write a new job's record only if its id is free (the submission's commit)."""
        job.update_time.CopyFrom(now())
        return self.store.create_bytes(job_key(self.id_of(job), "job.json"),
                                       json_format.MessageToJson(job).encode(),
                                       "application/json")

    def exists(self, job_id: str) -> bool:
        return self.store.exists(job_key(job_id, "job.json"))

    # -- claims: request ids and model ids ---------------------------------------------------
    def claim_request(self, owner: str, request_id: str, job_id: str) -> Claim:
        """Claim ``request_id`` (per owner) for ``job_id``; the claim says who holds it."""
        return self._claim(_request_key(owner, request_id), job_id)

    def release_request(self, owner: str, request_id: str, claim: Claim) -> None:
        self._release(_request_key(owner, request_id), claim)

    def forget_request(self, owner: str, request_id: str) -> None:
        """Drop a request-id claim (its job is being deleted)."""
        try:
            self.store.delete(_request_key(owner, request_id))
        except ObjectNotFound:
            pass

    def request_holder(self, owner: str, request_id: str) -> str | None:
        """The job id holding ``request_id``, or None when it is not claimed."""
        return self._holder(_request_key(owner, request_id))

    def claim_model_id(self, model_id: str, job_id: str) -> Claim:
        return self._claim(MODEL_IDS + model_id, job_id)

    def release_model_id(self, model_id: str, claim: Claim) -> None:
        self._release(MODEL_IDS + model_id, claim)

    def model_id_holder(self, model_id: str) -> str | None:
        return self._holder(MODEL_IDS + model_id)

    def drop_model_id(self, model_id: str) -> None:
        """Forget a stale model-id reservation (its job is gone or finished without it)."""
        try:
            self.store.delete(MODEL_IDS + model_id)
        except ObjectNotFound:
            pass

    def _claim(self, key: str, job_id: str) -> Claim:
        attempt = uuid.uuid4().hex  # makes this attempt's bytes unique (see create_bytes)
        data = json.dumps({"job": job_id, "attempt": attempt}).encode()
        if self.store.create_bytes(key, data, "application/json"):
            return Claim(job_id, attempt, True)
        holder = self._holder(key)
        return Claim(holder or "", "", False)

    def _holder(self, key: str) -> str | None:
        try:
            return json.loads(self.store.get_bytes(key))["job"]
        except ObjectNotFound:
            return None

    def _release(self, key: str, claim: Claim) -> None:
        if not claim.ours:
            return
        try:
            if json.loads(self.store.get_bytes(key)).get("attempt") == claim.attempt:
                self.store.delete(key)
        except ObjectNotFound:
            pass

    # -- events -----------------------------------------------------------------------------
    def event(self, job_id: str, **fields) -> None:
        """Append a WatchTrainingJobResponse event (fields as in the message)."""
        message = training_pb2.WatchTrainingJobResponse(event_time=now(), **fields)
        key = job_key(job_id, "events", f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json")
        self.store.put_bytes(key, json_format.MessageToJson(message).encode(),
                             "application/json")

    def events_after(self, job_id: str, last_key: str = ""
                     ) -> list[tuple[str, training_pb2.WatchTrainingJobResponse]]:
        out = []
        for info in self.store.list(job_key(job_id, "events") + "/"):
            if info.key > last_key:
                message = json_format.Parse(self.store.get_bytes(info.key),
                                            training_pb2.WatchTrainingJobResponse())
                out.append((info.key, message))
        return out

    def last_event_key(self, job_id: str) -> str:
        keys = [info.key for info in self.store.list(job_key(job_id, "events") + "/")]
        return keys[-1] if keys else ""

    # -- progress and markers -----------------------------------------------------------------
    def write_progress(self, job_id: str, progress: dict) -> None:
        self.store.put_json(job_key(job_id, "progress.json"), progress)

    def read_progress(self, job_id: str) -> dict | None:
        try:
            return self.store.get_json(job_key(job_id, "progress.json"))
        except ObjectNotFound:
            return None

    def mark(self, job_id: str, name: str, value: dict | None = None) -> None:
        self.store.put_bytes(job_key(job_id, "markers", name), json.dumps(value or {}).encode())

    def marked(self, job_id: str, name: str) -> bool:
        return self.store.exists(job_key(job_id, "markers", name))

    def read_mark(self, job_id: str, name: str) -> dict | None:
        try:
            return json.loads(self.store.get_bytes(job_key(job_id, "markers", name)))
        except ObjectNotFound:
            return None

    def clear(self, job_id: str, name: str) -> None:
        if self.marked(job_id, name):
            self.store.delete(job_key(job_id, "markers", name))
