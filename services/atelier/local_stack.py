"""Run the three services locally on the embedded defaults: ``make up`` and ``make demo``.

``up`` starts training, generation and analysis as separate processes (local
object store under .cache/, tiny models), waits until each reports SERVING on
grpc.health.v1, prints where they listen, and stops them cleanly on Ctrl-C or
SIGTERM. ``demo`` does the same start, then shows what each service offers
(health, its API via server reflection, a /metrics scrape), generates images
into out/demo/, and stops them. Exit code 0 only if everything worked.
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
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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


def describe(svc: LocalService) -> tuple[list[str], int]:
    """(methods of the service via reflection, grpc_server_* series scraped)."""
    with grpc.insecure_channel(svc.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        if svc.proto_service not in db.get_services():
            raise RuntimeError(f"{svc.name}: reflection does not list {svc.proto_service}")
        from google.protobuf.descriptor_pool import DescriptorPool

        pool = DescriptorPool(db)
        methods = [m.name for m in pool.FindServiceByName(svc.proto_service).methods]
    body = urllib.request.urlopen(
        f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=5
    ).read().decode()
    series = sum(1 for line in body.splitlines() if line.startswith("grpc_server_"))
    return methods, series


def call_empty(svc: LocalService, method: str) -> str:
    """The status code an RPC answers to an empty request (shows what is not built yet)."""
    with grpc.insecure_channel(svc.target) as channel:
        call = channel.unary_unary(f"/{svc.proto_service}/{method}",
                                   request_serializer=lambda _: b"",
                                   response_deserializer=lambda data: data)
        try:
            call(None, timeout=10)
            return "OK"
        except grpc.RpcError as err:
            return err.code().name


def generate_images(svc: LocalService, out_dir: Path, steps: int) -> list[Path]:
    """Generate two images with the default model, streaming progress, and save them."""
    from atelier.v1 import generation_pb2, generation_pb2_grpc

    request = generation_pb2.GenerateRequest(
        prompt="a photo of a toy robot on the moon", negative_prompt="blurry",
        num_images=2, num_inference_steps=steps, seed=42, scheduler="dpmpp_2m")
    paths = []
    with grpc.insecure_channel(svc.target) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        with Progress(TextColumn("  generating"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task("denoise", total=steps)
            for event in stub.GenerateStream(
                    generation_pb2.GenerateStreamRequest(request=request), timeout=300):
                if event.HasField("progress"):
                    bar.update(task, completed=event.progress.step,
                               total=event.progress.total_steps)
                elif event.HasField("result"):
                    result = event.result
    out_dir.mkdir(parents=True, exist_ok=True)
    for image, seed in zip(result.images, result.seeds, strict=True):
        path = out_dir / f"generated-seed{seed}.png"
        path.write_bytes(image.data)
        paths.append(path)
    console.print(f"  {len(paths)} images from {result.model}, seeds {list(result.seeds)}, "
                  f"denoise {result.denoise_seconds:.2f} s, decode {result.decode_seconds:.2f} s")
    return paths


def analyze_examples(svc: LocalService, out_dir: Path, generated: list[Path]) -> None:
    """VQA on a generated image, a document page to schema JSON, a chart to JSON."""
    import json

    from atelier.demo_assets import DOCUMENT_SCHEMA, bar_chart, document_page
    from atelier.v1 import analysis_pb2 as A
    from atelier.v1 import analysis_pb2_grpc, common_pb2

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "document.png").write_bytes(document_page())
    (out_dir / "chart.png").write_bytes(bar_chart())
    cases = [
        ("vqa", A.AnalyzeRequest(
            images=[common_pb2.ImageInput(data=generated[0].read_bytes())],
            instruction="What is in this picture?", task=A.ANALYSIS_TASK_VQA,
            decoding=A.DecodingParams(max_new_tokens=24))),
        ("document", A.AnalyzeRequest(
            images=[common_pb2.ImageInput(data=document_page())], task=A.ANALYSIS_TASK_DOCUMENT,
            output_format=A.OUTPUT_FORMAT_JSON, json_schema=json.dumps(DOCUMENT_SCHEMA),
            decoding=A.DecodingParams(max_new_tokens=48))),
        ("chart", A.AnalyzeRequest(
            images=[common_pb2.ImageInput(data=bar_chart())], task=A.ANALYSIS_TASK_CHART,
            decoding=A.DecodingParams(max_new_tokens=48))),
    ]
    with grpc.insecure_channel(svc.target) as channel:
        stub = analysis_pb2_grpc.AnalysisServiceStub(channel)
        for name, request in cases:
            reply = stub.Analyze(request, timeout=300)
            suffix = "json" if reply.output_format == A.OUTPUT_FORMAT_JSON else "txt"
            path = out_dir / f"analysis-{name}.{suffix}"
            path.write_text(reply.text + "\n")
            shown = reply.text if len(reply.text) <= 70 else reply.text[:67] + "..."
            console.print(f"  {name:<9} {A.OutputFormat.Name(reply.output_format)[14:]:<5} "
                          f"{reply.usage.completion_tokens:>3} tokens, ttft "
                          f"{reply.time_to_first_token_seconds:.2f} s -> {path}")
            console.print(f"            {shown!r}", markup=False)


def demo(out_dir: Path, steps: int) -> int:
    console.rule("atelier demo")
    console.print(
        "Starting the three services on the embedded defaults (local object store in "
        ".cache/atelier/store, tiny random models built offline into .cache/atelier/models)."
    )
    procs = start(log_level="WARNING")
    try:
        wait_serving(SERVICES, procs)
        for svc in SERVICES:
            methods, series = describe(svc)
            console.print(f"\n[bold]{svc.name}[/]  grpc {svc.target}   "
                          f"metrics http://127.0.0.1:{svc.metrics_port}/metrics")
            console.print(f"  health      SERVING ({svc.proto_service})")
            console.print(f"  reflection  {', '.join(methods)}")
            console.print(f"  /metrics    {series} grpc_server_* series")
            if svc.name == "generation":
                generated = generate_images(svc, out_dir, steps)
                for path in generated:
                    console.print(f"  wrote       {path}")
            elif svc.name == "analysis":
                analyze_examples(svc, out_dir, generated)
            else:
                console.print(f"  {methods[0]}: {call_empty(svc, methods[0])} "
                              "(not built yet)")
        console.print(
            "\nGeneration and analysis work end to end. The tiny models are random, so the "
            "images are noise and free text is gibberish, while JSON answers still parse "
            "and match their schema (constrained decoding). Training serves health, "
            "reflection and metrics; its RPCs answer UNIMPLEMENTED until that work lands, "
            "and the full scenario (train a subject, then generate and analyze it) will "
            "run here."
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
    parser.add_argument("--out", type=Path, default=Path("out/demo"),
                        help="where the demo writes its outputs (default out/demo)")
    parser.add_argument("--steps", type=int, default=25,
                        help="denoising steps for the demo's images (default 25)")
    args = parser.parse_args(argv)
    try:
        return up() if args.command == "up" else demo(args.out, args.steps)
    except (RuntimeError, TimeoutError) as exc:
        console.print(f"[red]{exc}[/]")
        return 1
    except grpc.RpcError as exc:
        console.print(f"[red]a call failed: {exc.code().name}: {exc.details()}[/]")
        return 1


if __name__ == "__main__":
    sys.exit(main())
