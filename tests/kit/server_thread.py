"""Run a ServiceServer on its own event loop in a thread, for synchronous tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

from atelier.kit.metrics import ServerMetrics
from atelier.kit.server import ServiceServer, ServiceSpec
from atelier.kit.settings import ServiceSettings


class ServerThread:
    def __init__(self, settings: ServiceSettings, spec: ServiceSpec,
                 metrics: ServerMetrics | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ServiceServer(settings, spec, metrics or ServerMetrics())
        self.run(self.server.start())

    def run(self, coro: Coroutine, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Coroutine):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def stop(self, grace: float = 0) -> None:
        try:
            self.run(self.server.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def start_app(module, *, storage, model_cache, section: str, engine: dict,
              ready_timeout: float = 120, grpc: dict | None = None,
              **sections) -> ServerThread:
    """Start a real atelier service (``module`` is its ``app`` module) on free ports
    (or ``grpc["port"]``), with ``engine`` as its own settings section and any other
    ``sections`` (auth, tls...), and wait until it is SERVING."""
    from atelier.kit.settings import load_settings

    settings = load_settings(module.Settings, grpc={"port": 0, **(grpc or {})},
                             metrics={"port": 0}, storage=storage,
                             models={"cache_dir": model_cache}, **{section: engine},
                             **sections)
    metrics = ServerMetrics()
    thread = ServerThread(settings, module.build_spec(settings, metrics), metrics)
    thread.run(thread.server.wait_ready(ready_timeout), timeout=ready_timeout + 10)
    return thread
