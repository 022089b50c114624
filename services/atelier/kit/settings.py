"""Typed service settings, resolved from defaults, an optional YAML file and the environment.

Precedence, highest first: explicit overrides passed in code, environment
variables (``ATELIER_<SECTION>__<FIELD>``, e.g. ``ATELIER_GRPC__PORT=50052``),
the YAML file named by ``--config`` or ``ATELIER_CONFIG_FILE``, then the
defaults documented on each field. Settings are validated once at start;
:func:`load_settings` raises :class:`ConfigError` naming every bad setting.
"""

from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

ENV_PREFIX = "ATELIER_"
ENV_NESTED_DELIMITER = "__"
CONFIG_FILE_ENV = "ATELIER_CONFIG_FILE"
MiB = 1024 * 1024


class Section(BaseModel):
    """Base of every settings section: unknown keys are errors, so typos surface at start."""

    model_config = ConfigDict(extra="forbid")


class GrpcSettings(Section):
    """The gRPC listener of a service."""

    host: str = "127.0.0.1"
    """Address to bind. Loopback by default so an embedded run never exposes a port;
    containers set ``0.0.0.0`` (or ``[::]``)."""
    port: int = Field(50051, ge=0, le=65535)
    """TCP port. 0 picks a free port (tests). Each service overrides the default."""
    max_message_bytes: int = Field(64 * MiB, ge=4 * MiB, le=2048 * MiB)
    """Largest request or response message, in bytes. 64 MiB because a request
    carries several encoded images and a response several PNGs; gRPC's 4 MiB
    default is too small for that."""
    keepalive_time_s: float = Field(30.0, gt=0)
    """Seconds between server keepalive pings on idle connections. 30 s keeps
    connections alive through typical 60 s load-balancer idle timeouts."""
    keepalive_timeout_s: float = Field(10.0, gt=0)
    """Seconds to wait for a ping ack before closing the connection."""
    min_client_ping_interval_s: float = Field(10.0, gt=0)
    """Shortest interval between client pings the server tolerates, in seconds;
    clients pinging faster are sent GOAWAY (too_many_pings)."""
    max_connection_age_s: float | None = Field(None, gt=0)
    """Close connections after this many seconds so clients re-resolve and
    rebalance across replicas (new pods after a scale-out get traffic). None
    keeps connections forever; the deploy configs set 300 for the scaled
    services."""
    max_connection_age_grace_s: float | None = Field(None, ge=0)
    """Seconds calls in flight on a connection past its age may still take before
    it is closed. None: shutdown_grace_s. Set it above the longest stream
    (a long generation) so that rebalancing never cuts one."""
    shutdown_grace_s: float = Field(30.0, ge=0)
    """Seconds in-flight RPCs get to finish after SIGTERM before they are
    cancelled. Kubernetes' terminationGracePeriodSeconds must exceed it."""
    max_concurrent_rpcs: int | None = Field(None, ge=1)
    """Cap on RPCs handled at once; further RPCs get RESOURCE_EXHAUSTED from
    gRPC. None: no cap (the engines bound their own queues)."""


class MetricsSettings(Section):
    """The Prometheus ``/metrics`` HTTP endpoint."""

    enabled: bool = True
    """Serve /metrics. Disable only when another process scrapes in-process."""
    host: str = "127.0.0.1"
    """Address to bind; containers set 0.0.0.0 so Prometheus can scrape."""
    port: int = Field(9091, ge=0, le=65535)
    """TCP port; 0 picks a free port. Each service overrides the default."""


class AuthSettings(Section):
    """Bearer-token authentication. Off when no token is configured."""

    tokens: list[SecretStr] = Field(default_factory=list)
    """Accepted tokens. From env as JSON: ``ATELIER_AUTH__TOKENS='["t1","t2"]'``."""
    tokens_file: Path | None = None
    """File of accepted tokens, one ``<principal> <token>`` per line (a bare
    ``<token>`` belongs to the principal ``default``; blank lines and ``#``
    comments ignored), e.g. a mounted Kubernetes Secret. Read at start. The
    principal is the owner recorded on the jobs and models a token creates."""
    admin_principals: list[str] = Field(default_factory=lambda: ["admin"])
    """Principals that see and manage every principal's jobs, models and uploads."""
    exempt_methods: list[str] = Field(
        default_factory=lambda: ["/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"]
    )
    """Full method names callable without a token. Health Check and Watch are
    exempt so kubelet probes work; ``Health/List`` (which names the services)
    is not."""
    reflection_requires_token: bool = True
    """Whether server reflection (v1 and v1alpha) needs a token when auth is on.
    Off lets grpcurl and IDEs discover the API anonymously."""

    @model_validator(mode="after")
    def _tokens_file_valid(self) -> AuthSettings:
        if self.tokens_file is not None:
            if not self.tokens_file.is_file():
                raise ValueError(f"tokens_file {str(self.tokens_file)!r} does not exist")
            from atelier.kit.auth import parse_tokens_file

            parse_tokens_file(self.tokens_file.read_text())
        return self


class TlsSettings(Section):
    """TLS for the gRPC listener; with a client CA and ``require_client_cert``, mTLS."""

    cert_file: Path | None = None
    """PEM server certificate chain. Set with key_file to enable TLS."""
    key_file: Path | None = None
    """PEM private key of cert_file."""
    client_ca_file: Path | None = None
    """PEM CA bundle that client certificates must chain to (mTLS)."""
    require_client_cert: bool = False
    """Reject clients without a valid certificate (mTLS). Needs client_ca_file."""

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None

    @model_validator(mode="after")
    def _consistent(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be set together")
        if self.require_client_cert and self.client_ca_file is None:
            raise ValueError("require_client_cert needs client_ca_file")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("client_ca_file needs cert_file and key_file (TLS) too")
        for name in ("cert_file", "key_file", "client_ca_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {str(path)!r} does not exist")
        return self


class LoggingSettings(Section):
    """Process logging."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Minimum level written."""
    format: Literal["json", "text"] = "json"
    """``json``: one JSON object per line, for log shippers. ``text``: for humans."""


class StorageSettings(Section):
    """The object store holding checkpoints, models, images and job records."""

    backend: Literal["local", "minio"] = "local"
    """``local``: a directory (the embedded default, no server needed).
    ``minio``: MinIO or any S3-compatible server."""
    local_root: Path = Path(".cache/atelier/store")
    """Root directory of the local backend; buckets are its subdirectories."""
    endpoint: str = "127.0.0.1:9000"
    """host:port of the MinIO/S3 server (no scheme; see ``secure``)."""
    access_key: SecretStr = SecretStr("")
    """S3 access key. Comes from a Secret in Kubernetes, never a ConfigMap."""
    secret_key: SecretStr = SecretStr("")
    """S3 secret key."""
    secure: bool = False
    """Use HTTPS to the endpoint."""
    region: str | None = None
    """Bucket region; None lets the SDK ask the server."""
    bucket: str = Field("atelier", min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.-]+$")
    """Bucket for everything atelier stores; created at start if missing."""
    part_size_bytes: int = Field(16 * MiB, ge=5 * MiB, le=5 * 1024 * MiB)
    """Multipart part size, bytes. Objects larger than this upload in parts;
    16 MiB keeps a 2 GiB UNet at 128 parts, well under S3's 10,000 limit."""
    max_retries: int = Field(4, ge=0, le=20)
    """Retries of a failed store operation on transient errors (connection
    resets, 5xx, SlowDown)."""
    retry_backoff_s: float = Field(0.25, ge=0)
    """First retry delay in seconds; doubles each retry."""
    connect_timeout_s: float = Field(5.0, gt=0, le=300)
    """Seconds to wait for a TCP connection to the store. Short: a store that does
    not accept within seconds is down, and the retries above take over."""
    read_timeout_s: float = Field(30.0, gt=0, le=3600)
    """Seconds a store call may wait for the next bytes on an open connection
    before it is abandoned and retried. Bounds a call stalled on a half-open
    connection (and so an RPC and the shutdown waiting on it); 30 s leaves room
    for a slow multi-part upload of one 16 MiB part."""

    @model_validator(mode="after")
    def _credentials(self) -> StorageSettings:
        if self.backend == "minio" and not (
            self.access_key.get_secret_value() and self.secret_key.get_secret_value()
        ):
            raise ValueError("backend 'minio' needs access_key and secret_key")
        return self


class ModelCacheSettings(Section):
    """Where model weights referenced by store prefix or ``tiny://`` are kept locally."""

    cache_dir: Path = Path(".cache/atelier/models")
    """Local cache for downloaded and built models. Point it at a volume in
    containers (the root filesystem is read-only there)."""


class ServiceSettings(BaseSettings):
    """Settings every service shares. Each service subclasses it with its own section."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="forbid",
        validate_default=True,
    )

    grpc: GrpcSettings = GrpcSettings()
    metrics: MetricsSettings = MetricsSettings()
    auth: AuthSettings = AuthSettings()
    tls: TlsSettings = TlsSettings()
    logging: LoggingSettings = LoggingSettings()
    storage: StorageSettings = StorageSettings()
    models: ModelCacheSettings = ModelCacheSettings()

    default_grpc_port: ClassVar[int] = 50051
    """The service's own gRPC port, used when ``grpc.port`` is not set."""
    default_metrics_port: ClassVar[int] = 9091
    """The service's own /metrics port, used when ``metrics.port`` is not set."""

    @model_validator(mode="before")
    @classmethod
    def _service_default_ports(cls, data: Any) -> Any:
        # Fill the per-service port defaults into partial sections, so that
        # ATELIER_GRPC__HOST=0.0.0.0 alone does not reset the port.
        if isinstance(data, dict):
            for section, port in (("grpc", cls.default_grpc_port),
                                  ("metrics", cls.default_metrics_port)):
                value = data.get(section)
                if value is None:
                    data[section] = {"port": port}
                elif isinstance(value, dict) and "port" not in value:
                    data[section] = {**value, "port": port}
        return data

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = _config_file.get()
        if config_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)


class ConfigError(Exception):
    """Settings failed validation; the message names each bad setting and its env var."""


S = TypeVar("S", bound=ServiceSettings)
_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "atelier_config_file", default=None
)


def load_settings(
    cls: type[S], config_file: Path | str | None = None, **overrides: Any
) -> S:
    """Resolve and validate ``cls`` from overrides, env, the YAML file and defaults."""
    path = config_file or os.environ.get(CONFIG_FILE_ENV) or None
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
    token = _config_file.set(path)
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, path)) from None
    finally:
        _config_file.reset(token)


def _describe(exc: ValidationError, path: Path | None) -> str:
    lines = ["invalid settings:"]
    for err in exc.errors():
        loc = [str(part) for part in err["loc"]]
        dotted = ".".join(loc) or "(root)"
        env = ENV_PREFIX + ENV_NESTED_DELIMITER.join(part.upper() for part in loc)
        given = err.get("input")
        # Echo only scalar values of non-secret fields; a section-level error's
        # input is the whole section, which may hold credentials.
        secret = any(word in dotted for word in ("secret", "token", "key", "password"))
        scalar = isinstance(given, str | int | float | bool)
        value = f" (got {given!r})" if scalar and not secret else ""
        lines.append(f"  {dotted}: {err['msg']}{value} [env {env}]")
    if path is not None:
        lines.append(f"  config file: {path}")
    return "\n".join(lines)
