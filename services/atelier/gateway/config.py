"""Settings of the gateway (env prefix ``ATELIER_``, e.g. ``ATELIER_GATEWAY__PORT``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from atelier.kit.settings import ENV_NESTED_DELIMITER, ENV_PREFIX, LoggingSettings, Section
from atelier.ports import GATEWAY_PORT, local_target

MiB = 1024 * 1024


class GatewaySection(Section):
    """Where the gateway listens and which services it calls."""

    host: str = "127.0.0.1"
    """Interface to listen on; ``0.0.0.0`` in a container."""
    port: int = Field(GATEWAY_PORT, ge=0, le=65535)
    """HTTP port of the OpenAI API, ``/metrics`` and ``/healthz``."""
    generation_target: str = local_target("generation")
    """GenerationService address (``dns:///atelier-generation-headless:50052`` spreads
    calls over its pods)."""
    analysis_target: str = local_target("analysis")
    """AnalysisService address."""
    tls_ca_file: Path | None = None
    """CA bundle of the services' TLS certificates; None calls them in plaintext."""
    analysis_model: str = "qwen3-vl"
    """The id /v1/models lists for the analysis model, and that chat completions
    accept as ``model``."""
    max_request_bytes: int = Field(64 * MiB, ge=1 * MiB, le=1024 * MiB)
    """Largest request body, bytes, counted as it arrives whatever the transfer
    encoding (a chunked body is cut off there too); larger is 413. Images arrive
    base64 encoded in chat bodies, a third larger than the files."""
    max_json_depth: int = Field(32, ge=4, le=256)
    """Deepest nesting of arrays and objects a JSON body may have (a JSON Schema in
    ``response_format`` counts); deeper is 400. Parsing and checking a structure
    costs stack in proportion to its depth, and no OpenAI request needs more."""
    max_form_fields: int = Field(32, ge=4, le=1000)
    """Most non-file fields of a multipart edit; more is 400."""
    max_form_files: int = Field(5, ge=2, le=16)
    """Most files of a multipart edit (an image and a mask, or up to the generation
    service's max_reference_images reference images); more is 400."""
    max_field_bytes: int = Field(64 * 1024, ge=1024, le=1 * MiB)
    """Largest non-file field of a multipart edit, bytes (a prompt is far shorter)."""
    max_image_pixels: int = Field(4096 * 4096, ge=64 * 64, le=16384 * 16384)
    """Largest image or mask, width x height, read from the file's header before it
    is decoded; larger is 400. A small compressed file can decode to gigabytes."""
    max_header_bytes: int = Field(4096, ge=256, le=8192)
    """Longest ``authorization`` or ``x-request-id`` value, bytes. These travel as gRPC
    metadata, which holds printable ASCII only and refuses large totals; a value
    that is longer or not printable ASCII is 400."""
    cors_allow_origins: list[str] = []
    """Origins browsers may call the API from (``https://app.example.com``, or ``*``).
    Empty (the default): no CORS headers, and a browser's preflight is refused."""
    request_timeout_s: float = Field(600.0, gt=0, le=3600)
    """Deadline of each gRPC call the gateway makes, seconds."""


class GatewaySettings(BaseSettings):
    """Everything the gateway reads at start."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX,
                                      env_nested_delimiter=ENV_NESTED_DELIMITER,
                                      extra="forbid", validate_default=True)

    gateway: GatewaySection = GatewaySection()
    logging: LoggingSettings = LoggingSettings()
