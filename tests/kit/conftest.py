from __future__ import annotations

import asyncio

import grpc
import pytest

from atelier.kit.settings import ServiceSettings
from tests.kit.probe_service import probe_spec
from tests.kit.server_thread import ServerThread


def make_settings(**sections) -> ServiceSettings:
    sections.setdefault("grpc", {})
    sections["grpc"] = {"port": 0, **sections["grpc"]}
    sections.setdefault("metrics", {"port": 0})
    return ServiceSettings(**sections)


@pytest.fixture
def start_server():
    """Start probe servers with given settings; stops them after the test."""
    started: list[ServerThread] = []

    def start(settings: ServiceSettings | None = None, warmup=None, wait=True) -> ServerThread:
        thread = ServerThread(settings or make_settings(), probe_spec(warmup))
        started.append(thread)
        if wait:
            thread.run(thread.server.wait_ready(30))
        return thread

    yield start
    for thread in started:
        thread.stop()


@pytest.fixture
def probe(start_server):
    """A running probe server with default settings, and a channel to it."""
    server = start_server()
    with grpc.insecure_channel(server.target) as channel:
        yield server, channel


def gate() -> tuple[asyncio.Event | None, object]:
    """A warm-up that blocks until released, to observe NOT_SERVING."""
    holder: dict[str, asyncio.Event] = {}

    async def warmup():
        holder["event"] = asyncio.Event()
        await holder["event"].wait()

    return holder, warmup
