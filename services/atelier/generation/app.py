"""Wires the generation service into the service kit."""

from __future__ import annotations

from atelier.generation.config import Settings
from atelier.generation.engine import GenerationEngine
from atelier.generation.metrics import GenerationMetrics
from atelier.generation.servicer import GenerationServicer
from atelier.kit.metrics import ServerMetrics
from atelier.kit.server import ServiceSpec
from atelier.v1 import generation_pb2, generation_pb2_grpc

__all__ = ["Settings", "build_spec"]

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name


def build_spec(settings: Settings, metrics: ServerMetrics) -> ServiceSpec:
    """The generation servicer; loading the default model is the warm-up that gates health."""
    engine = GenerationEngine(settings, GenerationMetrics(metrics.registry))
    return ServiceSpec(
        name="generation",
        service_names=[SERVICE_NAME],
        register=lambda server: generation_pb2_grpc.add_GenerationServiceServicer_to_server(
            GenerationServicer(engine), server
        ),
        warmup=engine.start,
        close=engine.close,
    )
