"""Training clients: submit a DreamBooth job, watch it, list, cancel.

    from atelier.client import TrainingClient, dreambooth_spec

    with TrainingClient("127.0.0.1:50051") as client:
        spec = dreambooth_spec("photos/", identifier_token="sks", class_noun="dog",
                               max_train_steps=400)
        job = client.create_job(spec)                    # idempotent: carries a request_id
        for event in client.watch_job(job.name):
            if event.HasField("progress"):
                print(event.progress.step, event.progress.loss)
        job = client.get_job(job.name)
        print(job.state, job.model)                      # SUCCEEDED models/<id>
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable, Iterator

from atelier.client.connection import AsyncServiceClient, ServiceClient
from atelier.client.enums import enum_value
from atelier.client.media import ImageLike, image_inputs
from atelier.ports import local_target
from atelier.v1 import training_pb2 as T
from atelier.v1 import training_pb2_grpc

#: States after which a job never changes again.
FINAL_STATES = frozenset({T.TRAINING_JOB_STATE_SUCCEEDED, T.TRAINING_JOB_STATE_FAILED,
                          T.TRAINING_JOB_STATE_CANCELLED})


def dreambooth_spec(images: ImageLike | Iterable[ImageLike], *, identifier_token: str,
                    class_noun: str, prior_preservation: bool = True,
                    num_class_images: int = 0, method: str | int | None = None,
                    train_text_encoder: bool = False, **fields) -> T.TrainingJobSpec:
    """A TrainingJobSpec for 3-5 photos of one subject (paths, a folder, bytes or PIL images).

    The prompts follow DreamBooth: ``a photo of <token> <class>`` for the subject and
    ``a photo of a <class>`` for the class priors. ``method``: "full" or "lora".
    Any other TrainingJobSpec field can be passed by name (``max_train_steps=400``,
    ``resolution=512``, ``resources=T.TrainingResources(num_workers=2)``...)."""
    spec = T.TrainingJobSpec(
        instance_images=image_inputs(images), identifier_token=identifier_token,
        instance_prompt=fields.pop("instance_prompt", f"a photo of {identifier_token} "
                                                       f"{class_noun}"),
        class_prompt=fields.pop("class_prompt", f"a photo of a {class_noun}"),
        prior_preservation=T.PriorPreservation(enabled=prior_preservation,
                                               num_class_images=num_class_images),
        text_encoder=T.TextEncoderTraining(enabled=train_text_encoder),
        method=enum_value(T.FineTuneMethod, method, "FINE_TUNE_METHOD_"))
    for name, value in fields.items():
        if value is None:
            continue
        if hasattr(value, "DESCRIPTOR"):
            getattr(spec, name).CopyFrom(value)
        elif isinstance(value, list | tuple):
            getattr(spec, name).extend(value)
        else:
            setattr(spec, name, value)
    return spec


def job_name(job: str) -> str:
    """``trainingJobs/<id>`` from either ``<id>`` or ``trainingJobs/<id>``."""
    return job if job.startswith("trainingJobs/") else f"trainingJobs/{job}"


def _create_request(spec, job_id, request_id) -> T.CreateTrainingJobRequest:
    # A request id makes the submission idempotent, so retrying it is safe.
    return T.CreateTrainingJobRequest(spec=spec, training_job_id=job_id or "",
                                      request_id=request_id or uuid.uuid4().hex)


def _states(states: Iterable[str | int]) -> list[int]:
    return [enum_value(T.TrainingJobState, s, "TRAINING_JOB_STATE_") for s in states]


class TrainingClient(ServiceClient):
    """Sync client of TrainingService. Use as a context manager, or call close()."""

    stub_class = training_pb2_grpc.TrainingServiceStub
    default_target = local_target("training")

    def create_job(self, spec: T.TrainingJobSpec, *, job_id: str = "",
                   request_id: str | None = None) -> T.TrainingJob:
        """Submit a job. ``job_id`` names it (the server picks one otherwise);
        ``request_id`` deduplicates resubmissions (a fresh one per call by default)."""
        return self.create_job_response(spec, job_id=job_id,
                                        request_id=request_id).training_job

    def create_job_response(self, spec: T.TrainingJobSpec, *, job_id: str = "",
                            request_id: str | None = None) -> T.CreateTrainingJobResponse:
        """As create_job, the whole response: the job and, with ``spec.webhook``, the
        secret its events are signed with (only this response carries it)."""
        return self._conn.unary(self._stub.CreateTrainingJob,
                                _create_request(spec, job_id, request_id))

    def get_job(self, name: str) -> T.TrainingJob:
        return self._conn.unary(self._stub.GetTrainingJob,
                                T.GetTrainingJobRequest(name=job_name(name))).training_job

    def list_jobs(self, *, states: Iterable[str | int] = (),
                  page_size: int = 0) -> Iterator[T.TrainingJob]:
        """Jobs, newest first, across all pages; ``states`` filters ("failed", ...)."""
        token = ""
        while True:
            page = self._conn.unary(self._stub.ListTrainingJobs, T.ListTrainingJobsRequest(
                page_size=page_size, page_token=token, states=_states(states)))
            yield from page.training_jobs
            token = page.next_page_token
            if not token:
                return

    def cancel_job(self, name: str) -> T.TrainingJob:
        """Cancel a queued or running job; the last checkpoint is kept."""
        return self._conn.unary(self._stub.CancelTrainingJob,
                                T.CancelTrainingJobRequest(name=job_name(name))).training_job

    def delete_job(self, name: str) -> int:
        """Delete a finished job and everything stored for it; returns the objects
        removed. An unfinished job is FailedPrecondition: cancel it first."""
        return self._conn.unary(self._stub.DeleteTrainingJob, T.DeleteTrainingJobRequest(
            name=job_name(name))).deleted_objects

    def watch_job(self, name: str,
                  timeout: float | None = None) -> Iterator[T.WatchTrainingJobResponse]:
        """The job's snapshot, then its events until it ends."""
        return self._conn.stream(self._stub.WatchTrainingJob,
                                 T.WatchTrainingJobRequest(name=job_name(name)), timeout)

    def wait_for_job(self, name: str, timeout: float | None = None) -> T.TrainingJob:
        """Block until the job ends; returns its final state."""
        for _ in self.watch_job(name, timeout):
            pass
        return self.get_job(name)



class AsyncTrainingClient(AsyncServiceClient):
    """asyncio client of TrainingService; the same calls as TrainingClient, awaited."""

    stub_class = training_pb2_grpc.TrainingServiceStub
    default_target = local_target("training")

    async def create_job(self, spec: T.TrainingJobSpec, *, job_id: str = "",
                         request_id: str | None = None) -> T.TrainingJob:
        return (await self.create_job_response(spec, job_id=job_id,
                                               request_id=request_id)).training_job

    async def create_job_response(self, spec: T.TrainingJobSpec, *, job_id: str = "",
                                  request_id: str | None = None
                                  ) -> T.CreateTrainingJobResponse:
        return await self._conn.unary(self._stub.CreateTrainingJob,
                                      _create_request(spec, job_id, request_id))

    async def get_job(self, name: str) -> T.TrainingJob:
        return (await self._conn.unary(self._stub.GetTrainingJob, T.GetTrainingJobRequest(
            name=job_name(name)))).training_job

    async def list_jobs(self, *, states: Iterable[str | int] = (),
                        page_size: int = 0) -> list[T.TrainingJob]:
        jobs, token = [], ""
        while True:
            page = await self._conn.unary(self._stub.ListTrainingJobs, T.ListTrainingJobsRequest(
                page_size=page_size, page_token=token, states=_states(states)))
            jobs += page.training_jobs
            token = page.next_page_token
            if not token:
                return jobs

    async def cancel_job(self, name: str) -> T.TrainingJob:
        return (await self._conn.unary(self._stub.CancelTrainingJob, T.CancelTrainingJobRequest(
            name=job_name(name)))).training_job

    async def delete_job(self, name: str) -> int:
        return (await self._conn.unary(self._stub.DeleteTrainingJob, T.DeleteTrainingJobRequest(
            name=job_name(name)))).deleted_objects

    def watch_job(self, name: str,
                  timeout: float | None = None) -> AsyncIterator[T.WatchTrainingJobResponse]:
        return self._conn.stream(self._stub.WatchTrainingJob,
                                 T.WatchTrainingJobRequest(name=job_name(name)), timeout)

    async def wait_for_job(self, name: str, timeout: float | None = None) -> T.TrainingJob:
        async for _ in self.watch_job(name, timeout):
            pass
        return await self.get_job(name)
