"""Settings of the generation service."""

from __future__ import annotations

from typing import ClassVar, Literal

from atelier.kit.settings import Section, ServiceSettings


class GenerationEngineSettings(Section):
    """The generation engine."""

    default_model: str = "tiny://stable-diffusion"
    """Base model loaded at start and used when a request names none: a
    ``tiny://`` name, ``store://`` prefix, local path or Hugging Face id. The
    tiny default needs no download; deployments set e.g. an SD 1.5 checkpoint."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the pipelines run; ``auto`` picks CUDA when available."""


class Settings(ServiceSettings):
    """Everything the generation service reads at start (env prefix ``ATELIER_``)."""

    default_grpc_port: ClassVar[int] = 50052
    default_metrics_port: ClassVar[int] = 9092

    generation: GenerationEngineSettings = GenerationEngineSettings()
