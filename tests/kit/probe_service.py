"""A small test servicer on the real GenerationService API, for testing the kit.

It is not the generation service: each model name triggers one kit behaviour
(domain errors, a crash, a slow call, an endless stream of large messages) so the
tests can watch the kit handle it; a model's display name is the caller's
principal. Run as a script (``probe_service.py PORT_FILE [GRACE_S]``) it serves
until SIGTERM, for the shutdown tests.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from atelier.kit.auth import current_principal
from atelier.kit.errors import InvalidArgument, NotFound, ResourceExhausted
from atelier.kit.metrics import ServerMetrics
from atelier.kit.server import ServiceServer, ServiceSpec, run_process
from atelier.kit.settings import ServiceSettings
from atelier.v1 import generation_pb2, generation_pb2_grpc, model_pb2

SERVICE = "atelier.v1.GenerationService"


class ProbeServicer(generation_pb2_grpc.GenerationServiceServicer):
    async def GetModel(self, request, context):
        name = request.name
        if not name:
            raise InvalidArgument.field("name", "is required")
        if name == "models/missing":
            raise NotFound("model", name)
        if name == "models/busy":
            raise ResourceExhausted("queue is full", retry_after=2.5)
        if name == "models/crash":
            raise RuntimeError("secret detail: /etc/atelier/credentials")
        if name.startswith("models/echo-"):
            raise NotFound("model", name)
        if name == "models/hang":  # a blocking call that never returns (a silent store)
            await asyncio.to_thread(time.sleep, 3600)
        if name.startswith("models/slow-"):
            await asyncio.sleep(float(name.removeprefix("models/slow-")))
        principal = current_principal()
        return generation_pb2.GetModelResponse(model=model_pb2.Model(
            name=name, display_name=principal.name + (" (admin)" if principal.admin else "")))

    async def GenerateStream(self, request, context):
        if request.request.model == "models/flood":
            # Faster than any client reads: the stream is suspended in a write
            # whenever the server stops.
            while True:
                yield generation_pb2.GenerateStreamResponse(
                    result=generation_pb2.GenerateResponse(model="x" * 1_000_000))
        steps = request.request.num_inference_steps or 3
        for step in range(1, steps + 1):
            yield generation_pb2.GenerateStreamResponse(
                progress=generation_pb2.GenerationProgress(step=step, total_steps=steps)
            )
        yield generation_pb2.GenerateStreamResponse(result=generation_pb2.GenerateResponse())


def probe_spec(warmup=None) -> ServiceSpec:
    return ServiceSpec(
        name="probe",
        service_names=[SERVICE],
        register=lambda server: generation_pb2_grpc.add_GenerationServiceServicer_to_server(
            ProbeServicer(), server
        ),
        warmup=warmup,
    )


async def _serve(port_file: Path, grace_s: float) -> int:
    settings = ServiceSettings(
        grpc={"port": 0, "shutdown_grace_s": grace_s}, metrics={"port": 0},
        logging={"format": "json"},
    )
    server = ServiceServer(settings, probe_spec(), ServerMetrics())

    async def announce():
        await server.wait_ready(30)
        port_file.write_text(f"{server.port} {server.metrics_port}")

    task = asyncio.create_task(announce())
    code = await server.run_until_signal()
    task.cancel()
    return code


if __name__ == "__main__":
    from atelier.kit.settings import LoggingSettings
    from atelier.kit.structured_logging import configure_logging

    configure_logging(LoggingSettings(format="json"), "probe")
    grace = float(sys.argv[2]) if len(sys.argv) > 2 else 10
    sys.exit(run_process(lambda: _serve(Path(sys.argv[1]), grace)))
