"""Run the three services locally on the embedded defaults: ``make up`` and ``make demo``.

``up`` starts training, generation and analysis as separate processes (local
object store under .cache/, tiny models), waits until each reports SERVING on
grpc.health.v1, starts the OpenAI-compatible gateway on port 8080, prints where
they listen, and stops them cleanly on Ctrl-C or
SIGTERM. ``demo`` does the same start, then shows what each service offers
(health, its API via server reflection, a /metrics scrape), then runs the
scenario through the services: DreamBooth-train a drawn toy, generate it in two
new contexts, analyze a generated image, a document page and a chart; writes
everything to out/demo/ and stops them. Exit code 0 only if everything worked.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from atelier.client import AtelierRpcError
from atelier.ports import GATEWAY_PORT, GRPC_PORTS, METRICS_PORTS

console = Console(stderr=False, highlight=False)


@dataclass(frozen=True)
class LocalService:
    name: str
    grpc_port: int
    metrics_port: int
    proto_service: str
    module: str = ""
    """The module ``python -m`` runs; default ``atelier.<name>``."""

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


SERVICES = tuple(
    LocalService(name, GRPC_PORTS[name], METRICS_PORTS[name], f"atelier.v1.{kind}Service")
    for name, kind in (("training", "Training"), ("generation", "Generation"),
                       ("analysis", "Analysis")))


def free_port() -> int:
    """A TCP port on loopback that nothing holds now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def on_free_ports(services=SERVICES) -> tuple[LocalService, ...]:
    """The same services on free ports, for a host where the default ports are taken
    (another stack, or a test run beside this one)."""
    return tuple(replace(svc, grpc_port=free_port(), metrics_port=free_port())
                 for svc in services)


def start(services=SERVICES, log_level: str = "INFO",
          env: dict[str, str] | None = None, argv=()) -> dict[str, subprocess.Popen]:
    """Start each service as its own process on its ports, logging as text.
    ``env`` adds settings (``ATELIER_...``) for all of them; ``argv`` are arguments
    of the module each runs."""
    procs = {}
    for svc in services:
        env_vars = {"ATELIER_LOGGING__FORMAT": "text", "ATELIER_LOGGING__LEVEL": log_level,
                    **os.environ, **(env or {}),
                    "ATELIER_GRPC__PORT": str(svc.grpc_port),
                    "ATELIER_METRICS__PORT": str(svc.metrics_port)}
        procs[svc.name] = subprocess.Popen(
            [sys.executable, "-m", svc.module or f"atelier.{svc.name}", *argv], env=env_vars,
            start_new_session=True
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


#: The demo's job and model id; a new run deletes the last run's first.
DEMO_ID = "demo-sks-toy"


def forget_previous_run(training: LocalService, generation: LocalService) -> None:
    """Delete the last demo run's job and model (ids are never silently reused)."""
    from atelier.client import GenerationClient, TrainingClient
    from atelier.client.errors import FailedPrecondition, NotFound

    with TrainingClient(training.target) as client:
        try:
            client.delete_job(DEMO_ID)
        except FailedPrecondition:  # an interrupted run: cancel it, then delete it
            client.cancel_job(DEMO_ID)
            client.wait_for_job(DEMO_ID)
            client.delete_job(DEMO_ID)
        except NotFound:
            pass
    with GenerationClient(generation.target) as client:
        try:
            client.delete_model(DEMO_ID)
            console.print(f"  deleted     models/{DEMO_ID} of the previous run")
        except NotFound:
            pass


def train_subject(svc: LocalService, out_dir: Path, train_steps: int) -> str:
    """DreamBooth-train the drawn toy (4 poses, prior preservation on); return the model."""
    from atelier.client import TrainingClient, dreambooth_spec
    from atelier.dev.demo_assets import toy_photo
    from atelier.v1 import training_pb2 as S

    out_dir.mkdir(parents=True, exist_ok=True)
    photos = [toy_photo(pose) for pose in range(4)]
    for pose, data in enumerate(photos):
        (out_dir / f"subject-pose{pose}.png").write_bytes(data)
    spec = dreambooth_spec(
        photos, identifier_token="sks", class_noun="toy", num_class_images=8,
        train_text_encoder=True, resolution=128, max_train_steps=train_steps,
        train_batch_size=1, seed=1, model_id=DEMO_ID,
        checkpointing=S.CheckpointPolicy(every_n_steps=max(1, train_steps // 2), keep_last=1),
        resources=S.TrainingResources(num_workers=1))
    spec.prior_preservation.class_image_steps = 10
    with TrainingClient(svc.target) as client:
        name = client.create_job(spec, job_id=DEMO_ID).name
        console.print(f"  submitted   {name} (4 photos of a drawn toy, prior preservation on)")
        with Progress(TextColumn("  {task.description:<11}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                      console=console) as bar:
            task = bar.add_task("queued", total=train_steps, loss="-")
            for event in client.watch_job(name):
                kind = event.WhichOneof("event")
                if kind == "state_changed":
                    state = S.TrainingJobState.Name(event.state_changed.state)
                    bar.update(task, description=state.removeprefix("TRAINING_JOB_STATE_")
                               .lower())
                elif kind == "progress":
                    bar.update(task, completed=event.progress.step,
                               loss=f"{event.progress.loss:.4f}")
        final = client.get_job(name)
    if final.state != S.TRAINING_JOB_STATE_SUCCEEDED:
        raise RuntimeError(f"training ended {S.TrainingJobState.Name(final.state)}: "
                           f"{final.failure_reason}")
    console.print(f"  trained     {final.model} in {final.progress.step} steps "
                  f"(checkpoint {final.latest_checkpoint})")
    return final.model


def generate_images(svc: LocalService, out_dir: Path, steps: int, model: str) -> list[Path]:
    """Generate the subject in two new contexts (streaming progress), an SDXL image, an
    image-to-image edit of the first, and two FLUX.2 [klein] images (from text, and
    with a photo of the subject as reference image); save them."""
    from atelier.client import GenerationClient

    paths = []
    contexts = {"moon": "a photo of sks toy on the moon",
                "beach": "a painting of sks toy on a beach"}
    out_dir.mkdir(parents=True, exist_ok=True)
    with GenerationClient(svc.target) as client:
        for name, prompt in contexts.items():
            with Progress(TextColumn(f"  {name:<11}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console) as bar:
                task = bar.add_task("denoise", total=steps)
                for event in client.generate_stream(
                        prompt, model=model, negative_prompt="blurry", steps=steps, seed=42,
                        scheduler="dpmpp_2m"):
                    if event.HasField("progress"):
                        bar.update(task, completed=event.progress.step,
                                   total=event.progress.total_steps)
                    elif event.HasField("result"):
                        result = event.result
            path = out_dir / f"generated-{name}.png"
            path.write_bytes(result.images[0].data)
            paths.append(path)
            console.print(f"  {prompt!r} with {result.model}, seed {result.seeds[0]}, "
                          f"denoise {result.denoise_seconds:.2f} s -> {path}", markup=False)
        # The same service serves SDXL beside SD, and image to image in the same batches.
        more = {
            "sdxl": dict(prompt="a photo of a toy robot on the moon", model="tiny-sdxl",
                         negative_prompt="blurry"),
            "img2img": dict(prompt="a painting of sks toy in the snow", model=model,
                            init_image=paths[0], strength=0.6),
            # klein distilled: 4 steps, no guidance; its reference image is the subject.
            "klein": dict(prompt="a photo of a toy robot on a beach", model="tiny-klein",
                          steps=4),
            "klein-reference": dict(prompt="this toy on a beach", model="tiny-klein", steps=4,
                                    reference_images=[out_dir / "subject-pose0.png"]),
        }
        for name, fields in more.items():
            result = client.generate(**{"steps": steps, "seed": 42, **fields})
            path = out_dir / f"generated-{name}.png"
            path.write_bytes(result.images[0].data)
            paths.append(path)
            source = f" from {paths[0].name}" if "init_image" in fields else \
                " with subject-pose0.png as reference" if "reference_images" in fields else ""
            console.print(f"  {fields['prompt']!r} with {result.model}{source}, seed "
                          f"{result.seeds[0]}, denoise {result.denoise_seconds:.2f} s -> "
                          f"{path}", markup=False)
    return paths


def analyze_examples(svc: LocalService, out_dir: Path, generated: list[Path]) -> None:
    """VQA on a generated image, a document page to schema JSON, a chart to JSON."""
    # (generated[0] is the subject on the moon)
    from atelier.client import AnalysisClient
    from atelier.dev.demo_assets import DOCUMENT_SCHEMA, bar_chart, document_page
    from atelier.v1 import analysis_pb2 as A

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "document.png").write_bytes(document_page())
    (out_dir / "chart.png").write_bytes(bar_chart())
    cases = [
        ("vqa", [generated[0]], dict(instruction="What is in this picture?", task="vqa",
                                     max_new_tokens=24)),
        ("document", [out_dir / "document.png"], dict(
            task="document", output_format="json", json_schema=DOCUMENT_SCHEMA,
            max_new_tokens=48)),
        ("chart", [out_dir / "chart.png"], dict(task="chart", max_new_tokens=48)),
    ]
    with AnalysisClient(svc.target) as client:
        for name, images, fields in cases:
            reply = client.analyze(images, **fields)
            suffix = "json" if reply.output_format == A.OUTPUT_FORMAT_JSON else "txt"
            path = out_dir / f"analysis-{name}.{suffix}"
            path.write_text(reply.text + "\n")
            shown = reply.text if len(reply.text) <= 70 else reply.text[:67] + "..."
            console.print(f"  {name:<9} {A.OutputFormat.Name(reply.output_format)[14:]:<5} "
                          f"{reply.usage.completion_tokens:>3} tokens, ttft "
                          f"{reply.time_to_first_token_seconds:.2f} s -> {path}")
            console.print(f"            {shown!r}", markup=False)


def demo(out_dir: Path, steps: int, train_steps: int, services=SERVICES) -> int:
    console.rule("atelier demo")
    console.print(
        "Starting the three services on the embedded defaults (local object store in "
        ".cache/atelier/store, tiny random models built offline into .cache/atelier/models)."
    )
    procs = start(services, log_level="WARNING")
    try:
        wait_serving(services, procs)
        for svc in services:
            methods, series = describe(svc)
            console.print(f"\n[bold]{svc.name}[/]  grpc {svc.target}   "
                          f"metrics http://127.0.0.1:{svc.metrics_port}/metrics")
            console.print(f"  health      SERVING ({svc.proto_service})")
            console.print(f"  reflection  {', '.join(methods)}")
            console.print(f"  /metrics    {series} grpc_server_* series")
            if svc.name == "training":
                forget_previous_run(svc, next(s for s in services if s.name == "generation"))
                model = train_subject(svc, out_dir, train_steps)
            elif svc.name == "generation":
                generated = generate_images(svc, out_dir, steps, model)
            else:
                analyze_examples(svc, out_dir, generated)
        console.print(
            f"\nDone: trained a subject, generated it in two contexts, with SDXL, from "
            f"its own picture (image to image) and with FLUX.2 \\[klein] (from text, and with "
            f"the subject's photo as reference), and analyzed the "
            f"results; everything is in {out_dir}/. The tiny models are random, so the "
            "images are noise and free text is gibberish, while JSON answers still parse "
            "and match their schema (constrained decoding). See the README to run the same "
            "demo with real models on a GPU host."
        )
    finally:
        codes = stop(procs)
    bad = {name: code for name, code in codes.items() if code != 0}
    if bad:
        console.print(f"[red]services exited uncleanly: {bad}[/]")
        return 1
    console.print("[green]all services drained and stopped cleanly[/]")
    return 0


#: The OpenAI-compatible gateway of ``make up``, in front of generation and analysis.


def start_gateway(port: int = GATEWAY_PORT, generation: str = SERVICES[1].target,
                  analysis: str = SERVICES[2].target,
                  log_level: str = "INFO", env: dict[str, str] | None = None
                  ) -> subprocess.Popen:
    """``python -m atelier.gateway`` on ``port``, calling the generation and analysis
    services at those targets; ``env``: more ``ATELIER_GATEWAY__*`` settings."""
    env = {"ATELIER_LOGGING__FORMAT": "text", "ATELIER_LOGGING__LEVEL": log_level,
           **os.environ, "ATELIER_GATEWAY__PORT": str(port),
           "ATELIER_GATEWAY__GENERATION_TARGET": generation,
           "ATELIER_GATEWAY__ANALYSIS_TARGET": analysis, **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "atelier.gateway"], env=env,
                            start_new_session=True)


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Poll ``url`` until it answers 200; fail fast if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with code {proc.returncode} during start")
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer in {timeout:.0f} s")
        time.sleep(0.3)


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
        procs["gateway"] = start_gateway()
        gateway = f"http://127.0.0.1:{GATEWAY_PORT}"
        wait_http(gateway + "/healthz", procs["gateway"])
        for svc in SERVICES:
            console.print(f"{svc.name:<11} grpc {svc.target}  "
                          f"metrics http://127.0.0.1:{svc.metrics_port}/metrics")
        console.print(f"{'gateway':<11} OpenAI API {gateway}/v1  metrics {gateway}/metrics")
        console.print("Ctrl-C stops the services.")
        while not stop_requested:
            if any(p.poll() is not None for p in procs.values()):
                console.print("[red]a service exited; stopping the others[/]")
                break
            time.sleep(0.5)
    finally:
        codes = stop(procs)
    # uvicorn ends by re-raising the SIGTERM it drained on.
    return 0 if all(code in (0, -signal.SIGTERM) if name == "gateway" else code == 0
                    for name, code in codes.items()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m atelier.dev.local_stack",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "demo"])
    parser.add_argument("--out", type=Path, default=Path("out/demo"),
                        help="where the demo writes its outputs (default out/demo)")
    parser.add_argument("--steps", type=int, default=25,
                        help="denoising steps for the demo's images (default 25)")
    parser.add_argument("--train-steps", type=int, default=60,
                        help="DreamBooth training steps (default 60)")
    parser.add_argument("--free-ports", action="store_true",
                        help="demo: run the services on free ports instead of the defaults "
                             "(50051-50053, 9091-9093), for a host where those are taken")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            return up()
        services = on_free_ports() if args.free_ports else SERVICES
        return demo(args.out, args.steps, args.train_steps, services)
    except (RuntimeError, TimeoutError) as exc:
        console.print(f"[red]{exc}[/]")
        return 1
    except AtelierRpcError as exc:
        console.print(f"a call failed: {exc}", style="red", markup=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
