"""gRPC adapter of TrainingService: messages in and out, nothing else."""

from __future__ import annotations

from atelier.kit.errors import InvalidArgument
from atelier.training.engine import TrainingEngine
from atelier.v1 import training_pb2, training_pb2_grpc


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    """Maps TrainingService RPCs onto the engine."""

    def __init__(self, engine: TrainingEngine) -> None:
        self.engine = engine

    async def CreateTrainingJob(self, request, context):
        if not request.HasField("spec"):
            raise InvalidArgument.field("spec", "is required")
        job, secret = await self.engine.create(request.request_id, request.training_job_id,
                                               request.spec)
        return training_pb2.CreateTrainingJobResponse(training_job=job, webhook_secret=secret)

    async def GetTrainingJob(self, request, context):
        return training_pb2.GetTrainingJobResponse(training_job=await self.engine.get(request.name))

    async def ListTrainingJobs(self, request, context):
        jobs, token = await self.engine.list(request.page_size, request.page_token,
                                             list(request.states))
        return training_pb2.ListTrainingJobsResponse(training_jobs=jobs, next_page_token=token)

    async def CancelTrainingJob(self, request, context):
        job = await self.engine.cancel(request.name)
        return training_pb2.CancelTrainingJobResponse(training_job=job)

    async def DeleteTrainingJob(self, request, context):
        removed = await self.engine.delete(request.name)
        return training_pb2.DeleteTrainingJobResponse(deleted_objects=removed)

    async def WatchTrainingJob(self, request, context):
        async for event in self.engine.watch(request.name):
            yield event
