"""gRPC adapter of TrainingService.

Its RPCs are not implemented yet (the Training issue builds them on the
engine); the generated base class answers each with UNIMPLEMENTED.
"""

from __future__ import annotations

from atelier.training.engine import TrainingEngine
from atelier.v1 import training_pb2_grpc


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    """Maps TrainingService RPCs onto the engine."""

    def __init__(self, engine: TrainingEngine) -> None:
        self.engine = engine
