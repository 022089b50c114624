"""The default ports of atelier's processes, in one place.

The services bind them when their settings name no port; the clients, the CLI
and the gateway dial them on a local stack; the local stack starts on them.
Deployments (deploy/k8s) use the same numbers.
"""

from __future__ import annotations

#: gRPC port of each service.
GRPC_PORTS = {"training": 50051, "generation": 50052, "analysis": 50053}
#: /metrics port of each service.
METRICS_PORTS = {"training": 9091, "generation": 9092, "analysis": 9093}
#: The OpenAI-compatible HTTP gateway.
GATEWAY_PORT = 8080


def local_target(service: str) -> str:
    """The service's address on this machine, on its default port."""
    return f"127.0.0.1:{GRPC_PORTS[service]}"
