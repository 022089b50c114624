"""Settings of the analysis service."""

from __future__ import annotations

from typing import ClassVar, Literal

from atelier.kit.settings import Section, ServiceSettings


class AnalysisEngineSettings(Section):
    """The analysis engine."""

    model: str = "tiny://qwen3-vl"
    """The vision-language model: a ``tiny://`` name, ``store://`` prefix, local
    path or Hugging Face id (e.g. ``Qwen/Qwen3-VL-2B-Instruct``). The tiny
    default needs no download."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model runs; ``auto`` picks CUDA when available."""


class Settings(ServiceSettings):
    """Everything the analysis service reads at start (env prefix ``ATELIER_``)."""

    default_grpc_port: ClassVar[int] = 50053
    default_metrics_port: ClassVar[int] = 9093

    analysis: AnalysisEngineSettings = AnalysisEngineSettings()
