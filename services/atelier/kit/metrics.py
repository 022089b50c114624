"""Prometheus metrics: the standard gRPC server metrics plus the /metrics endpoint.

Metric and label names follow go-grpc-prometheus (``grpc_server_started_total``,
``grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}``,
``grpc_server_handling_seconds``), so stock dashboards and alerts work. Labels
are bounded: only methods the server registered are recorded. Each server owns
its own registry, so several can live in one process (tests); engines register
their ``atelier_<service>_*`` metrics into the same registry.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from google.protobuf import descriptor_pool
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    platform_collector,
    process_collector,
    start_http_server,
)

from atelier.kit.settings import MetricsSettings

#: Handling-time buckets, seconds: sub-millisecond health checks up to
#: multi-minute generations and streams.
HANDLING_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
)


@dataclass(frozen=True)
class RpcMethod:
    """One RPC method as the metrics label it."""

    service: str
    method: str
    grpc_type: str  # unary, client_stream, server_stream or bidi_stream

    @property
    def full_name(self) -> str:
        return f"/{self.service}/{self.method}"


def describe_methods(service_names: list[str]) -> dict[str, RpcMethod]:
    """Map ``/pkg.Service/Method`` to its labels for each service in the default pool."""
    pool = descriptor_pool.Default()
    methods: dict[str, RpcMethod] = {}
    for name in service_names:
        for m in pool.FindServiceByName(name).methods:
            if m.client_streaming and m.server_streaming:
                kind = "bidi_stream"
            elif m.client_streaming:
                kind = "client_stream"
            elif m.server_streaming:
                kind = "server_stream"
            else:
                kind = "unary"
            info = RpcMethod(name, m.name, kind)
            methods[info.full_name] = info
    return methods


class ServerMetrics:
    """The kit's gRPC server metrics, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        process_collector.ProcessCollector(registry=self.registry)
        platform_collector.PlatformCollector(registry=self.registry)
        gc_collector.GCCollector(registry=self.registry)
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started_total", "RPCs started on the server.", labels,
            registry=self.registry,
        )
        self.handled = Counter(
            "grpc_server_handled_total", "RPCs completed on the server, by status code.",
            [*labels, "grpc_code"], registry=self.registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from RPC start to completion on the server, in seconds.",
            labels, buckets=HANDLING_BUCKETS, registry=self.registry,
        )
        self.msg_received = Counter(
            "grpc_server_msg_received_total", "Request messages received.", labels,
            registry=self.registry,
        )
        self.msg_sent = Counter(
            "grpc_server_msg_sent_total", "Response messages sent.", labels,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "atelier_grpc_server_in_flight_rpcs", "RPCs being handled right now.",
            ["grpc_service", "grpc_method"], registry=self.registry,
        )
        self.ready = Gauge(
            "atelier_service_ready",
            "1 once the service's models are loaded and health is SERVING, else 0.",
            ["service"], registry=self.registry,
        )

    def initialize(self, methods: dict[str, RpcMethod]) -> None:
        """Create zero-valued series for every method so rates exist before traffic."""
        for m in methods.values():
            label_values = (m.grpc_type, m.service, m.method)
            self.started.labels(*label_values)
            self.handled.labels(*label_values, "OK")
            self.handling_seconds.labels(*label_values)
            self.msg_received.labels(*label_values)
            self.msg_sent.labels(*label_values)
            self.in_flight.labels(m.service, m.method)


class MetricsEndpoint:
    """The HTTP server exposing ``/metrics`` for one registry."""

    def __init__(self, settings: MetricsSettings, registry: CollectorRegistry) -> None:
        self._settings = settings
        self._registry = registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Start serving; returns the bound port."""
        self._server, self._thread = start_http_server(
            self._settings.port, addr=self._settings.host, registry=self._registry
        )
        return self._server.server_port

    @property
    def port(self) -> int | None:
        return self._server.server_port if self._server else None

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
