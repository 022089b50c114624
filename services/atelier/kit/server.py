"""The grpc.aio server every service runs in.

``ServiceServer`` wires a :class:`ServiceSpec` (the service's servicers and its
warm-up) into a server with health, reflection, metrics, auth, TLS, keepalive
and message-size limits. Health reports NOT_SERVING until the warm-up (model
loading) has finished, then SERVING. ``stop`` drains: health flips to
NOT_SERVING, new RPCs are refused, in-flight RPCs get the grace period.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from atelier.kit.auth import TokenSet
from atelier.kit.discovery import (
    HEALTH_SERVICE,
    REFLECTION_V1,
    REFLECTION_V1ALPHA,
    HealthService,
    add_reflection,
    register_reflection_v1,
)
from atelier.kit.interceptors import RpcInterceptor
from atelier.kit.metrics import MetricsEndpoint, ServerMetrics, describe_methods
from atelier.kit.settings import ServiceSettings
from atelier.kit.tls import server_credentials

log = logging.getLogger("atelier.server")
#: Seconds the process waits at exit for threads still inside blocking calls.
THREADS_AT_EXIT_S = 2.0
#: Seconds ``close`` may take at least, even when the drain used the whole grace.
CLOSE_MIN_S = 10.0

_REFLECTION_METHODS = frozenset(f"/{name}/ServerReflectionInfo"
                                for name in (REFLECTION_V1, REFLECTION_V1ALPHA))


@dataclass
class ServiceSpec:
    """What a service plugs into the kit.

    ``register`` adds the servicers to the server; ``service_names`` are their
    full proto names (for health, reflection and metrics). ``warmup`` loads
    models and other dependencies; health turns SERVING only after it
    returns. ``drain`` runs when the drain begins (e.g. to ask long jobs to
    checkpoint and stop while RPCs finish); ``close`` releases resources after
    the drain, within what is left of the grace period.
    """

    name: str
    service_names: list[str]
    register: Callable[[grpc.aio.Server], None]
    warmup: Callable[[], Awaitable[None]] | None = None
    close: Callable[[], Awaitable[None]] | None = None
    drain: Callable[[], Awaitable[None]] | None = None
    quiet_methods: frozenset[str] = field(default_factory=frozenset)


class ServiceServer:
    """One service's gRPC server plus its /metrics endpoint."""

    def __init__(
        self, settings: ServiceSettings, spec: ServiceSpec, metrics: ServerMetrics | None = None
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.metrics = metrics or ServerMetrics()
        self.health = HealthService()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics_endpoint = MetricsEndpoint(settings.metrics, self.metrics.registry)
        self._ready = asyncio.Event()
        self._warmup_task: asyncio.Task | None = None
        self._warmup_error: BaseException | None = None
        self._stopped = asyncio.Event()

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_endpoint.port

    @property
    def address(self) -> str:
        return f"{self.settings.grpc.host}:{self.port}"

    def _options(self) -> list[tuple[str, int]]:
        g = self.settings.grpc
        options = [
            ("grpc.max_receive_message_length", g.max_message_bytes),
            ("grpc.max_send_message_length", g.max_message_bytes),
            ("grpc.keepalive_time_ms", int(g.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(g.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms",
             int(g.min_client_ping_interval_s * 1000)),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.so_reuseport", 0),
        ]
        if g.max_connection_age_s is not None:
            options.append(("grpc.max_connection_age_ms", int(g.max_connection_age_s * 1000)))
            grace = g.shutdown_grace_s if g.max_connection_age_grace_s is None \
                else g.max_connection_age_grace_s
            options.append(("grpc.max_connection_age_grace_ms", int(grace * 1000)))
        return options

    async def start(self) -> None:
        """Bind, start serving (NOT_SERVING), and begin the warm-up in the background."""
        register_reflection_v1()
        auth = self.settings.auth
        methods = describe_methods(
            [*self.spec.service_names, HEALTH_SERVICE, REFLECTION_V1, REFLECTION_V1ALPHA])
        self.metrics.initialize(methods)
        self.metrics.ready.labels(self.spec.name).set(0)
        tokens = TokenSet.from_settings(auth)
        exempt = frozenset(auth.exempt_methods)
        if not auth.reflection_requires_token:
            exempt |= _REFLECTION_METHODS
        interceptor = RpcInterceptor(
            methods,
            self.metrics,
            tokens,
            auth_exempt=exempt,
            # Probes and tool discovery log at DEBUG, not one INFO line each.
            quiet_methods=self.spec.quiet_methods | _REFLECTION_METHODS
            | {f"/{HEALTH_SERVICE}/{m}" for m in ("Check", "Watch", "List")},
        )
        server = grpc.aio.server(
            interceptors=[interceptor],
            options=self._options(),
            maximum_concurrent_rpcs=self.settings.grpc.max_concurrent_rpcs,
        )
        self.spec.register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        add_reflection(server, [*self.spec.service_names, HEALTH_SERVICE])
        for name in ["", *self.spec.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

        bind = f"{self.settings.grpc.host}:{self.settings.grpc.port}"
        credentials = server_credentials(self.settings.tls)
        if credentials is None:
            self.port = server.add_insecure_port(bind)
        else:
            self.port = server.add_secure_port(bind, credentials)
        if self.port == 0:
            raise OSError(f"could not bind gRPC port {bind}")
        if self.settings.metrics.enabled:
            self._metrics_endpoint.start()
        await server.start()
        self._server = server
        log.info(
            "service started",
            extra={
                "service": self.spec.name,
                "grpc_address": self.address,
                "metrics_port": self.metrics_port,
                "tls": self.settings.tls.enabled,
                "mtls": self.settings.tls.require_client_cert,
                "auth": tokens.enabled,
            },
        )
        self._warmup_task = asyncio.create_task(self._warm_up(), name=f"{self.spec.name}-warmup")

    async def _warm_up(self) -> None:
        try:
            if self.spec.warmup is not None:
                await self.spec.warmup()
        except Exception as exc:
            self._warmup_error = exc
            log.exception("warm-up failed; the service stays NOT_SERVING",
                          extra={"service": self.spec.name})
            self._stopped.set()
            return
        for name in ["", *self.spec.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.metrics.ready.labels(self.spec.name).set(1)
        self._ready.set()
        log.info("service ready", extra={"service": self.spec.name})

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until health is SERVING; raises the warm-up's error if it failed."""
        waiter = asyncio.create_task(self._ready.wait())
        stopped = asyncio.create_task(self._stopped.wait())
        try:
            await asyncio.wait({waiter, stopped}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            stopped.cancel()
        if self._warmup_error is not None:
            raise RuntimeError(f"{self.spec.name} warm-up failed") from self._warmup_error
        if not self._ready.is_set():
            raise TimeoutError(f"{self.spec.name} not ready after {timeout} s")

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop: NOT_SERVING, refuse new RPCs, let in-flight ones finish."""
        if self._server is None:
            return
        grace = self.settings.grpc.shutdown_grace_s if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        log.info("draining", extra={"service": self.spec.name, "grace_s": grace})
        self.metrics.ready.labels(self.spec.name).set(0)
        await self.health.enter_graceful_shutdown()
        if self._warmup_task is not None and not self._warmup_task.done():
            self._warmup_task.cancel()
        if self.spec.drain is not None:
            await self.spec.drain()
        await self._server.stop(grace)
        self._server = None
        if self.spec.close is not None:
            budget = max(CLOSE_MIN_S, deadline - loop.time())
            try:
                await asyncio.wait_for(self.spec.close(), budget)
            except TimeoutError:
                log.warning("closing took longer than the grace period; stopping anyway",
                            extra={"service": self.spec.name, "waited_s": round(budget, 1)})
        self._metrics_endpoint.stop()
        self._stopped.set()
        log.info("service stopped", extra={"service": self.spec.name})

    async def run_until_signal(self) -> int:
        """Serve until SIGTERM or SIGINT, then drain. Returns the process exit code."""
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_requested.set)
        await self.start()
        stop_wait = asyncio.create_task(stop_requested.wait())
        failed_wait = asyncio.create_task(self._stopped.wait())
        await asyncio.wait({stop_wait, failed_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        failed_wait.cancel()
        await self.stop()
        return 1 if self._warmup_error is not None else 0


def run_process(serve: Callable[[], Awaitable[int]]) -> int:
    """Run ``serve`` (a server's life, from start to drained) on a new event loop and
    return its exit code.

    Blocking calls run in threads (``asyncio.to_thread``), and a thread stuck in
    one (a store call on a silent connection) cannot be interrupted. Python
    would wait for it at exit, past any grace period; instead such threads get
    THREADS_AT_EXIT_S, then the process ends without them (logs flushed)."""
    loop = asyncio.new_event_loop()
    executor = ThreadPoolExecutor(thread_name_prefix=_BLOCKING_THREADS)
    loop.set_default_executor(executor)
    asyncio.set_event_loop(loop)
    try:
        code = loop.run_until_complete(serve())
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    executor.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + THREADS_AT_EXIT_S
    while _blocked_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    if _blocked_threads():
        log.warning("threads are still blocked in calls at exit; leaving without them",
                    extra={"threads": len(_blocked_threads())})
        logging.shutdown()
        os._exit(code)
    return code


_BLOCKING_THREADS = "atelier-blocking"


def _blocked_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate()
            if t.name.startswith(_BLOCKING_THREADS) and t.is_alive()]
