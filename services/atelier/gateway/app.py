"""The gateway's ASGI app (FastAPI on uvicorn) and its console script, ``atelier-gateway``.

Endpoints: ``POST /v1/images/generations``, ``POST /v1/images/edits``
(multipart), ``POST /v1/chat/completions`` (``stream: true`` for server-sent
events), ``GET /v1/models`` and ``GET /v1/models/{id}``; ``GET /healthz``
(liveness: the process answers) and ``GET /metrics`` (Prometheus).

The caller's ``Authorization: Bearer`` header and ``x-request-id`` go with each
gRPC call, so the services authenticate and log the caller, not the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from contextlib import asynccontextmanager

import grpc
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from uvicorn.protocols.http.h11_impl import H11Protocol

from atelier.gateway.config import GatewaySettings
from atelier.gateway.edge import Edge
from atelier.gateway.errors import OpenAIError, install_handlers
from atelier.gateway.routes import router
from atelier.kit.structured_logging import configure_logging
from atelier.v1 import analysis_pb2_grpc, generation_pb2_grpc

log = logging.getLogger("atelier.gateway")


class Backends:
    """The gRPC channels and stubs of the services the gateway calls."""

    def __init__(self, settings: GatewaySettings) -> None:
        section = settings.gateway
        options = [("grpc.max_receive_message_length", section.max_request_bytes * 2),
                   ("grpc.max_send_message_length", section.max_request_bytes * 2),
                   ("grpc.lb_policy_name", "round_robin")]
        if section.tls_ca_file is not None:
            credentials = grpc.ssl_channel_credentials(section.tls_ca_file.read_bytes())
            make = lambda target: grpc.aio.secure_channel(target, credentials, options)  # noqa: E731
        else:
            make = lambda target: grpc.aio.insecure_channel(target, options)  # noqa: E731
        self.channels = [make(section.generation_target), make(section.analysis_target)]
        self.generation = generation_pb2_grpc.GenerationServiceStub(self.channels[0])
        self.analysis = analysis_pb2_grpc.AnalysisServiceStub(self.channels[1])
        self.timeout = section.request_timeout_s

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


def create_app(settings: GatewaySettings) -> FastAPI:
    """The gateway app: ``edge.Edge`` outermost, CORS when origins are set, the routes."""
    section = settings.gateway

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.backends = Backends(settings)
        yield
        await app.state.backends.close()

    app = FastAPI(title="atelier OpenAI-compatible gateway", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.registry = CollectorRegistry()
    install_handlers(app)
    app.include_router(router)
    if section.cors_allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=section.cors_allow_origins,
                           allow_methods=["GET", "POST"], allow_headers=["*"],
                           expose_headers=["x-request-id", "retry-after", "retry-after-ms"])
    app.add_middleware(Edge, max_request_bytes=section.max_request_bytes,
                       max_header_bytes=section.max_header_bytes,
                       registry=app.state.registry)
    return app


class OpenAIShapedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, whose 400 for a malformed request (before any route
    sees it) is JSON in OpenAI's shape instead of plain text."""

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(OpenAIError(400, f"malformed HTTP request: {msg}").body()).encode()
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(body), body))
        self.transport.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atelier-gateway", description=__doc__.split("\n")[0])
    parser.parse_args(argv)  # --help; settings come from ATELIER_* variables
    try:
        settings = GatewaySettings()
    except ValidationError as exc:
        print(f"invalid settings: {exc}")
        return 2
    configure_logging(settings.logging, "gateway")
    import uvicorn

    config = uvicorn.Config(create_app(settings), host=settings.gateway.host,
                            port=settings.gateway.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=30, http=OpenAIShapedH11,
                            h11_max_incomplete_event_size=16 * 1024)
    asyncio.run(uvicorn.Server(config).serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
