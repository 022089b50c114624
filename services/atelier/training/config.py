"""Settings of the training service."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from atelier.kit.settings import Section, ServiceSettings


class TrainingEngineSettings(Section):
    """The training engine."""

    default_base_model: str = "tiny://stable-diffusion"
    """Base model for jobs that name none: a ``tiny://`` name, ``store://``
    prefix, local path or Hugging Face id."""
    ray_address: str | None = None
    """Ray cluster to submit to (e.g. ``ray://raycluster-head:10001``). None
    starts a local Ray in the service process (the embedded default). The
    standard ``RAY_ADDRESS`` variable is honoured too."""
    max_concurrent_jobs: int = Field(1, ge=1, le=64)
    """Jobs that run at once; the rest wait in QUEUED. 1 because one job
    usually fills the cluster's GPUs."""


class Settings(ServiceSettings):
    """Everything the training service reads at start (env prefix ``ATELIER_``)."""

    default_grpc_port: ClassVar[int] = 50051
    default_metrics_port: ClassVar[int] = 9091

    training: TrainingEngineSettings = TrainingEngineSettings()
