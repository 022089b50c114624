"""Settings of the gateway (env prefix ``ATELIER_``, e.g. ``ATELIER_GATEWAY__PORT``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from atelier.kit.settings import ENV_NESTED_DELIMITER, ENV_PREFIX, LoggingSettings, Section

MiB = 1024 * 1024


class GatewaySection(Section):
    """Where the gateway listens and which services it calls."""

    host: str = "127.0.0.1"
    """Interface to listen on; ``0.0.0.0`` in a container."""
    port: int = Field(8080, ge=0, le=65535)
    """HTTP port of the OpenAI API, ``/metrics`` and ``/healthz``."""
    generation_target: str = "127.0.0.1:50052"
    """GenerationService address (``dns:///atelier-generation-headless:50052`` spreads
    calls over its pods)."""
    analysis_target: str = "127.0.0.1:50053"
    """AnalysisService address."""
    tls_ca_file: Path | None = None
    """CA bundle of the services' TLS certificates; None calls them in plaintext."""
    analysis_model: str = "qwen3-vl"
    """The id /v1/models lists for the analysis model, and that chat completions
    accept as ``model``."""
    max_request_bytes: int = Field(64 * MiB, ge=1 * MiB, le=1024 * MiB)
    """Largest request body (Content-Length); larger is 413. Images arrive base64
    encoded in chat bodies, a third larger than the files."""
    request_timeout_s: float = Field(600.0, gt=0, le=3600)
    """Deadline of each gRPC call the gateway makes, seconds."""


class GatewaySettings(BaseSettings):
    """Everything the gateway reads at start."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX,
                                      env_nested_delimiter=ENV_NESTED_DELIMITER,
                                      extra="forbid", validate_default=True)

    gateway: GatewaySection = GatewaySection()
    logging: LoggingSettings = LoggingSettings()
