"""One channel to one atelier service: TLS, bearer token, deadlines and retries.

:class:`ConnectionOptions` is what every client takes. :class:`Connection` (sync)
and :class:`AsyncConnection` (asyncio) own the channel and run each call with the
options' deadline, the ``authorization`` header, and the retry policy; failures
leave them as :class:`~atelier.client.errors.AtelierRpcError`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import grpc

from atelier.client.errors import from_rpc_error
from atelier.client.retry import RetryPolicy
from atelier.ports import local_target

#: The services accept messages up to 64 MiB (photos, videos, image batches).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ConnectionOptions:
    """How to reach one service.

    ``target`` is ``host:port``, or any gRPC target; in a cluster use the service's
    headless Service, ``dns:///atelier-generation-headless.atelier:50052``, so that
    the name resolves to every pod. ``load_balancing`` is the gRPC policy over the
    resolved addresses: ``round_robin`` (default) spreads calls across all of them,
    where ``pick_first`` keeps one connection to one pod however far the service
    scales out.
    ``token`` is sent as ``authorization: Bearer <token>`` on every call.
    ``tls`` turns on TLS; ``ca_file`` pins the server's CA (system roots otherwise);
    ``cert_file``/``key_file`` add a client certificate for mTLS; ``server_name``
    overrides the name checked against the server's certificate.
    ``timeout_s`` is the default deadline of unary calls, ``stream_timeout_s`` of
    streams (a training watch or a long generation), both in seconds.
    """

    target: str = local_target("generation")
    token: str | None = None
    tls: bool = False
    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None
    server_name: str | None = None
    timeout_s: float = 120.0
    stream_timeout_s: float = 6 * 3600.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    load_balancing: str = "round_robin"

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("cert_file and key_file go together (mTLS needs both)")
        if (self.ca_file or self.cert_file) and not self.tls:
            object.__setattr__(self, "tls", True)

    def channel_options(self) -> list[tuple[str, object]]:
        options: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.service_config",
             json.dumps({"loadBalancingConfig": [{self.load_balancing: {}}]})),
        ]
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return options

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path):
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(root_certificates=read(self.ca_file),
                                            private_key=read(self.key_file),
                                            certificate_chain=read(self.cert_file))

    def open_channel(self, api=grpc):
        """A channel to ``target``: ``api`` is ``grpc`` (sync) or ``grpc.aio``."""
        if self.tls:
            return api.secure_channel(self.target, self.credentials(), self.channel_options())
        return api.insecure_channel(self.target, self.channel_options())

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


class Connection:
    """A sync channel plus the call discipline (deadline, token, retries)."""

    def __init__(self, options: ConnectionOptions) -> None:
        self.options = options
        self.channel = options.open_channel(grpc)

    def unary(self, method: Callable, request, timeout: float | None = None):
        """Call a unary method, retried per policy (every unary call of the API is safe
        to repeat: reads, cancellation, and submission with a request_id)."""
        attempt = 1
        while True:
            try:
                return method(request, timeout=timeout or self.options.timeout_s,
                              metadata=self.options.metadata())
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
            delay = self.options.retry.delay(attempt, error)
            if delay is None:
                raise error from None
            time.sleep(delay)
            attempt += 1

    def stream(self, method: Callable, request, timeout: float | None = None) -> Iterator:
        """Call a server-streaming method; retried per policy until the first message."""
        attempt = 1
        while True:
            call = method(request, timeout=timeout or self.options.stream_timeout_s,
                          metadata=self.options.metadata())
            received = False
            try:
                for message in call:
                    received = True
                    yield message
                return
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
            finally:
                call.cancel()
            delay = None if received else self.options.retry.delay(attempt, error)
            if delay is None:
                raise error
            time.sleep(delay)
            attempt += 1

    def close(self) -> None:
        self.channel.close()


class AsyncConnection:
    """The asyncio twin of :class:`Connection` (create it inside a running loop)."""

    def __init__(self, options: ConnectionOptions) -> None:
        self.options = options
        self.channel = options.open_channel(grpc.aio)

    async def unary(self, method: Callable, request, timeout: float | None = None):
        attempt = 1
        while True:
            try:
                return await method(request, timeout=timeout or self.options.timeout_s,
                                    metadata=self.options.metadata())
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
            delay = self.options.retry.delay(attempt, error)
            if delay is None:
                raise error from None
            await asyncio.sleep(delay)
            attempt += 1

    async def stream(self, method: Callable, request,
                     timeout: float | None = None) -> AsyncIterator:
        attempt = 1
        while True:
            call = method(request, timeout=timeout or self.options.stream_timeout_s,
                          metadata=self.options.metadata())
            received = False
            try:
                async for message in call:
                    received = True
                    yield message
                return
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
            finally:
                call.cancel()
            delay = None if received else self.options.retry.delay(attempt, error)
            if delay is None:
                raise error
            await asyncio.sleep(delay)
            attempt += 1

    async def close(self) -> None:
        await self.channel.close()


def _options(target: str | ConnectionOptions | None, default: str,
             options: dict) -> ConnectionOptions:
    if isinstance(target, ConnectionOptions):
        return target
    return ConnectionOptions(target=target or default, **options)


class ServiceClient:
    """Base of the sync clients: a Connection and the service's stub.
    ``target`` is ``host:port`` (keywords are ConnectionOptions fields) or a
    ConnectionOptions. Use as a context manager, or call close()."""

    stub_class: ClassVar[type]
    default_target: ClassVar[str]

    def __init__(self, target: str | ConnectionOptions | None = None, **options) -> None:
        self._conn = Connection(_options(target, self.default_target, options))
        self._stub = self.stub_class(self._conn.channel)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncServiceClient:
    """Base of the asyncio clients (create them inside a running event loop);
    ``async with`` closes them."""

    stub_class: ClassVar[type]
    default_target: ClassVar[str]

    def __init__(self, target: str | ConnectionOptions | None = None, **options) -> None:
        self._conn = AsyncConnection(_options(target, self.default_target, options))
        self._stub = self.stub_class(self._conn.channel)

    async def close(self) -> None:
        await self._conn.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
