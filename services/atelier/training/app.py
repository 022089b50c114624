"""Wires the training service into the service kit."""

from __future__ import annotations

from atelier.kit.metrics import ServerMetrics
from atelier.kit.server import ServiceSpec
from atelier.training.config import Settings
from atelier.training.engine import TrainingEngine
from atelier.training.metrics import TrainingMetrics
from atelier.training.servicer import TrainingServicer
from atelier.v1 import training_pb2, training_pb2_grpc

__all__ = ["Settings", "build_spec"]

SERVICE_NAME = training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name


def build_spec(settings: Settings, metrics: ServerMetrics) -> ServiceSpec:
    """The training servicer; opening the store and resuming jobs is the warm-up."""
    engine = TrainingEngine(settings, TrainingMetrics(metrics.registry))
    return ServiceSpec(
        name="training",
        service_names=[SERVICE_NAME],
        register=lambda server: training_pb2_grpc.add_TrainingServiceServicer_to_server(
            TrainingServicer(engine), server
        ),
        warmup=engine.start,
        close=engine.close,
    )
