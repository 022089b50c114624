"""Wires the training service into the service kit."""

from __future__ import annotations

import os

from atelier.kit.metrics import ServerMetrics
from atelier.kit.server import ServiceSpec
from atelier.training.config import Settings
from atelier.training.engine import TrainingEngine
from atelier.training.faults import Faults
from atelier.training.metrics import TrainingMetrics
from atelier.training.ray_cluster import ensure_ray
from atelier.training.servicer import TrainingServicer
from atelier.v1 import training_pb2, training_pb2_grpc

__all__ = ["Settings", "build_spec", "prepare_process"]

SERVICE_NAME = training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name


def build_spec(settings: Settings, metrics: ServerMetrics,
               faults: Faults | None = None) -> ServiceSpec:
    """The training servicer; opening the store and resuming jobs is the warm-up.
    ``faults``: for tests only (``faults.Faults``)."""
    engine = TrainingEngine(settings, TrainingMetrics(metrics.registry), faults)
    return ServiceSpec(
        name="training",
        service_names=[SERVICE_NAME],
        register=lambda server: training_pb2_grpc.add_TrainingServiceServicer_to_server(
            TrainingServicer(engine), server
        ),
        warmup=engine.start,
        drain=engine.drain,
        close=engine.close,
    )


def prepare_process(settings: Settings) -> None:
    """Start the embedded local Ray now, while the process still has one thread.

    Ray launches its daemons (GCS, raylet...) by fork() plus a Python preexec_fn;
    in a process that already runs gRPC and metrics threads that child can hang
    before exec, and Ray's start then times out. A configured cluster
    (``ray_address`` / ``RAY_ADDRESS``) starts no local daemons and is connected
    to when the first job runs."""
    if not (settings.training.ray_address or os.environ.get("RAY_ADDRESS")):
        ensure_ray(settings.training)
