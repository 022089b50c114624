"""gRPC adapter of AnalysisService.

Its RPCs are not implemented yet (the Analysis issue builds them on the
engine); the generated base class answers each with UNIMPLEMENTED.
"""

from __future__ import annotations

from atelier.analysis.engine import AnalysisEngine
from atelier.v1 import analysis_pb2_grpc


class AnalysisServicer(analysis_pb2_grpc.AnalysisServiceServicer):
    """Maps AnalysisService RPCs onto the engine."""

    def __init__(self, engine: AnalysisEngine) -> None:
        self.engine = engine
