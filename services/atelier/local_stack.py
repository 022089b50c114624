"""Run the three services locally on the embedded defaults: ``make up`` and ``make demo``.

``up`` starts training, generation and analysis as separate processes (local
object store under .cache/, tiny models), waits until each reports SERVING on
grpc.health.v1, prints where they listen, and stops them cleanly on Ctrl-C or
SIGTERM. ``demo`` does the same start, then shows what each service offers
(health, its API via server reflection, a /metrics scrape, one RPC) and stops
them. Exit code 0 only if every service came up and answered.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from rich.console import Console

console = Console(stderr=False, highlight=False)


@dataclass(frozen=True)
class LocalService:
    name: str
    grpc_port: int
    metrics_port: int
    proto_service: str

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


SERVICES = (
    LocalService("training", 50051, 9091, "atelier.v1.TrainingService"),
    LocalService("generation", 50052, 9092, "atelier.v1.GenerationService"),
    LocalService("analysis", 50053, 9093, "atelier.v1.AnalysisService"),
)


def start(services=SERVICES, log_level: str = "INFO") -> dict[str, subprocess.Popen]:
    """Start each service as its own process on its default ports, logging as text."""
    procs = {}
    for svc in services:
        env = {"ATELIER_LOGGING__FORMAT": "text", "ATELIER_LOGGING__LEVEL": log_level,
               **os.environ}
        procs[svc.name] = subprocess.Popen(
            [sys.executable, "-m", f"atelier.{svc.name}"], env=env, start_new_session=True
        )
    return procs


def wait_serving(services, procs, timeout: float = 600) -> None:
    """Poll grpc.health.v1 until every service is SERVING; fail fast if one exits."""
    deadline = time.monotonic() + timeout
    pending = list(services)
    with console.status("waiting for the services to load their models...") as status:
        while pending:
            for svc in list(pending):
                code = procs[svc.name].poll()
                if code is not None:
                    raise RuntimeError(f"{svc.name} exited with code {code} during start")
                if health_status(svc) == health_pb2.HealthCheckResponse.SERVING:
                    pending.remove(svc)
                    console.print(f"[green]✓[/] {svc.name} is SERVING on {svc.target}")
            if pending:
                if time.monotonic() > deadline:
                    names = ", ".join(s.name for s in pending)
                    raise TimeoutError(f"not SERVING after {timeout:.0f} s: {names}")
                status.update(f"waiting for {', '.join(s.name for s in pending)}...")
                time.sleep(0.5)


def health_status(svc: LocalService) -> int | None:
    try:
        with grpc.insecure_channel(svc.target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=svc.proto_service), timeout=2
            )
            return reply.status
    except grpc.RpcError:
        return None


def stop(procs: dict[str, subprocess.Popen], timeout: float = 60) -> dict[str, int]:
    """SIGTERM every service (they drain), then wait; kill stragglers."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    codes = {}
    for name, proc in procs.items():
        try:
            codes[name] = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            codes[name] = proc.wait()
    return codes


def describe(svc: LocalService) -> tuple[list[str], int, str]:
    """(methods of the service via reflection, grpc_server_* series scraped, RPC outcome)."""
    with grpc.insecure_channel(svc.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = db.get_services()
        if svc.proto_service not in services:
            raise RuntimeError(f"{svc.name}: reflection does not list {svc.proto_service}")
        from google.protobuf.descriptor_pool import DescriptorPool

        pool = DescriptorPool(db)
        methods = [m.name for m in pool.FindServiceByName(svc.proto_service).methods]
        first = pool.FindServiceByName(svc.proto_service).methods[0]
        # Call the first RPC with an empty request to show what it answers today.
        call = channel.unary_unary(
            f"/{svc.proto_service}/{first.name}",
            request_serializer=lambda _: b"",
            response_deserializer=lambda data: data,
        )
        try:
            call(None, timeout=10)
            outcome = f"{first.name}: OK"
        except grpc.RpcError as err:
            outcome = f"{first.name}: {err.code().name}"
    body = urllib.request.urlopen(
        f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5
    ).read().decode()
    series = sum(1 for line in body.splitlines() if line.startswith("grpc_server_"))
    return methods, series, outcome


def demo() -> int:
    console.rule("atelier demo")
    console.print(
        "Starting the three services on the embedded defaults (local object store in "
        ".cache/atelier/store, tiny random models built offline into .cache/atelier/models)."
    )
    procs = start(log_level="WARNING")
    try:
        wait_serving(SERVICES, procs)
        for svc in SERVICES:
            methods, series, outcome = describe(svc)
            console.print(f"\n[bold]{svc.name}[/]  grpc {svc.target}   "
                          f"metrics http://127.0.0.1:{svc.metrics_port}/metrics")
            console.print(f"  health      SERVING ({svc.proto_service})")
            console.print(f"  reflection  {', '.join(methods)}")
            console.print(f"  /metrics    {series} grpc_server_* series")
            console.print(f"  first RPC   {outcome}")
        console.print()
        console.print(
            "The services serve health, reflection and metrics, and load their models. Their "
            "RPCs answer UNIMPLEMENTED until the Training, Generation and Analysis work lands; "
            "the end-to-end scenario (train, generate, analyze) will then run here."
        )
    finally:
        codes = stop(procs)
    bad = {name: code for name, code in codes.items() if code != 0}
    if bad:
        console.print(f"[red]services exited uncleanly: {bad}[/]")
        return 1
    console.print("[green]all services drained and stopped cleanly[/]")
    return 0


def up() -> int:
    procs = start()
    stop_requested = False

    def request_stop(*_):
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        wait_serving(SERVICES, procs)
        for svc in SERVICES:
            console.print(f"{svc.name:<11} grpc {svc.target}  "
                          f"metrics http://127.0.0.1:{svc.metrics_port}/metrics")
        console.print("Ctrl-C stops the services.")
        while not stop_requested:
            if any(p.poll() is not None for p in procs.values()):
                console.print("[red]a service exited; stopping the others[/]")
                break
            time.sleep(0.5)
    finally:
        codes = stop(procs)
    return 0 if all(code == 0 for code in codes.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m atelier.local_stack",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "demo"])
    args = parser.parse_args(argv)
    try:
        return up() if args.command == "up" else demo()
    except (RuntimeError, TimeoutError) as exc:
        console.print(f"[red]{exc}[/]")
        return 1


if __name__ == "__main__":
    sys.exit(main())
