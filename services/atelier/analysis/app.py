"""Wires the analysis service into the service kit."""

from __future__ import annotations

from atelier.analysis.config import Settings
from atelier.analysis.engine import AnalysisEngine
from atelier.analysis.metrics import AnalysisMetrics
from atelier.analysis.servicer import AnalysisServicer
from atelier.kit.metrics import ServerMetrics
from atelier.kit.server import ServiceSpec
from atelier.v1 import analysis_pb2, analysis_pb2_grpc

__all__ = ["Settings", "build_spec"]

SERVICE_NAME = analysis_pb2.DESCRIPTOR.services_by_name["AnalysisService"].full_name


def build_spec(settings: Settings, metrics: ServerMetrics) -> ServiceSpec:
    """The analysis servicer; loading the model is the warm-up that gates health."""
    engine = AnalysisEngine(settings, AnalysisMetrics(metrics.registry))
    return ServiceSpec(
        name="analysis",
        service_names=[SERVICE_NAME],
        register=lambda server: analysis_pb2_grpc.add_AnalysisServiceServicer_to_server(
            AnalysisServicer(engine), server
        ),
        warmup=engine.start,
        close=engine.close,
    )
