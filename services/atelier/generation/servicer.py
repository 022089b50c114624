"""gRPC adapter of GenerationService.

Its RPCs are not implemented yet (the Generation issue builds them on the
engine); the generated base class answers each with UNIMPLEMENTED.
"""

from __future__ import annotations

from atelier.generation.engine import GenerationEngine
from atelier.v1 import generation_pb2_grpc


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    """Maps GenerationService RPCs onto the engine."""

    def __init__(self, engine: GenerationEngine) -> None:
        self.engine = engine
