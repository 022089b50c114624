"""make bench-generation: the generation service against diffusers, in one run.

Workloads (``--only`` picks some; each prints its figures as soon as it ends):

- ``sd``: SD 1.x text to image (the tiny model at 128 px on CPU).
  - baseline A: StableDiffusionPipeline called once per request, one after another;
  - baseline B: one static pipeline call per ``batch`` prompts, one guidance scale
    (diffusers' best case; it cannot honour per-request seeds or guidance).
- ``sdxl``: the same two comparisons for SDXL, against StableDiffusionXLPipeline.
- ``mixed``: a third each of text to image, img2img (strength 0.6) and inpainting
  (an ordinary UNet) on the SD model, interleaved. Baseline: each kind's own
  pipeline in static batches of its kind.
- ``lora``: eight LoRA models over the SD model (random adapters from eight seeds,
  rank 8), requests round-robin over them: every adapter mixed into one UNet
  forward against one forward per adapter group (``mix_adapters=false``), each on
  its own fresh service.
- ``flux``: FLUX.2 [klein] base text to image, 16 concurrent clients each with its
  own seed and guidance scale (true CFG: two rows per request in the service's one
  forward): baseline A is ``Flux2KleinPipeline`` once per request (``flux_ratio_a``),
  baseline B one static pipeline call per batch (``flux_ratio_b``).
- ``flux_lora``: eight klein LoRA models, requests round-robin over them, mixed in
  one transformer forward against one forward per adapter group
  (``flux_lora_mix_ratio``).
- ``compile``: the ``sd`` workload on a service with ``compile_unet`` (batch
  buckets) against the eager service; the warm-up is its extra start time.
- ``graphs`` (CUDA): the compiled service with ``cuda_graphs`` against the compiled
  one, and the memory its graphs reserve.
- ``ceiling``: the SD denoiser alone, eager and compiled, at the ``sd`` service's
  mean rows per forward, against the bf16 matmul rate measured in this run
  (``ceiling_mfu``, ``mfu``, ``service_vs_ceiling``). Default in GPU mode.

Every comparison runs in interleaved rounds (A, B, A, B, ..., after a warm-up of
each), so a slow spell of this shared machine falls on both sides; a ratio is the
median of the per-round ratios, printed with its spread (``<key>_spread=min-max``).
Every service run also prints where the worker's time went
(``atelier_generation_worker_seconds_total`` by phase, scraped before and after
each measured round) and the mean rows per denoiser forward.

GPU mode (--gpu): SD-1.5-size (512 px), SDXL-base-size (1024 px) and klein-4B-size
(1024 px) random weights, drawn on the GPU and saved in bf16; the service runs on
its defaults.

The last line is one key=value summary of whatever ran. A benchmark, not a test:
nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from service_process import (
    free_port,
    interleaved,
    ratio,
    ratio_keys,
    run_clients,
    scrape,
    start_service,
    stop_service,
)

REPO = Path(__file__).resolve().parent.parent
KINDS = ("text", "img2img", "inpaint")
STRENGTH = 0.6
PHASES = ("denoise", "scheduler", "vae_encode", "vae_decode", "text_encode", "idle", "other")
WORKLOADS = ("sd", "ceiling", "sdxl", "mixed", "lora", "flux", "flux_lora", "compile",
             "graphs")
CPU_DEFAULT = ("sd", "sdxl", "mixed", "lora", "flux", "flux_lora", "compile")
# compile and graphs warm up one compiled graph per bucket (about a minute each on a
# GPU): opt-in there, so the default GPU run fits in 8 minutes.
GPU_DEFAULT = ("sd", "ceiling", "sdxl", "mixed", "lora", "flux")


@dataclass
class Settings:
    device: str
    dtype: str
    steps: int
    batch: int
    requests: int  # per round
    clients: int
    a_requests: int  # baseline A, per round
    size: int  # SD
    sdxl_size: int
    sdxl_batch: int
    sdxl_requests: int
    sdxl_a_requests: int
    rounds: int
    buckets: list[int] = field(default_factory=list)
    klein_size: int = 128
    klein_batch: int = 16
    klein_requests: int = 64  # per round
    klein_a_requests: int = 16


def emit(line: str = "") -> None:
    print(line, flush=True)


def guidance_for(i: int) -> float:
    return 3.0 + (i % 16) * 0.5  # distinct per concurrent client


def prompt_for(i: int) -> str:
    return f"a photo of sks dog number {i}"


def bench_pictures(size: int):
    """The init image and mask of the image-conditioned requests."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // (size - 1), y * 255 // (size - 1),
                    np.where((x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 4) ** 2,
                             230, 40)], axis=-1).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return Image.fromarray(rgb, "RGB"), Image.fromarray(mask, "L")


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -- the service ---------------------------------------------------------------------------
class Service:
    """A generation service process, with what its measured runs cost its worker."""

    def __init__(self, models: dict[str, str], s: Settings, cache_dir: Path, **engine) -> None:
        import json

        self.metrics_port = free_port()
        started = time.perf_counter()
        self.proc, self.target = start_service("generation", {
            **{f"ATELIER_GENERATION__{k.upper()}": json.dumps(v) for k, v in engine.items()},
            "ATELIER_STORAGE__LOCAL_ROOT": str(cache_dir / "store"),
            "ATELIER_MODELS__CACHE_DIR": str(cache_dir / "models"),
            "ATELIER_GENERATION__BASE_MODELS": json.dumps(models),
            "ATELIER_GENERATION__DEFAULT_MODEL": "sd",
            "ATELIER_GENERATION__MAX_BATCH_SIZE": str(max(s.batch, s.sdxl_batch,
                                                          s.klein_batch)),
            "ATELIER_GENERATION__MAX_IMAGES_PER_REQUEST": "1",
            "ATELIER_GENERATION__MAX_QUEUE_LENGTH": str(s.requests * 2),
            "ATELIER_GENERATION__DEVICE": s.device,
            "ATELIER_GENERATION__DTYPE": s.dtype,
        }, timeout=3600, metrics_port=self.metrics_port)
        self.start_seconds = time.perf_counter() - started
        self.s = s
        self.phases = dict.fromkeys(PHASES, 0.0)
        self.rows = self.forwards = 0.0
        self.latencies: list[float] = []

    def stop(self) -> None:
        stop_service(self.proc)

    def _counters(self) -> tuple[dict[str, float], float, float]:
        samples = scrape(self.metrics_port)
        phases = {p: samples.get(("atelier_generation_worker_seconds_total",
                                  (("phase", p),)), 0.0) for p in PHASES}
        return (phases, samples.get(("atelier_generation_forward_rows_sum", ()), 0.0),
                samples.get(("atelier_generation_forward_rows_count", ()), 0.0))

    def run(self, model: str, kinds: tuple[str, ...], size: int, requests: int,
            adapters: list[str] | None = None, measured: bool = True,
            scheduler: str = "ddim") -> float:
        """Images per second of ``requests`` requests from the clients; a measured run
        adds to the worker's phase times and the latencies."""
        import grpc

        from atelier.v1 import generation_pb2, generation_pb2_grpc

        s = self.s
        channel = grpc.insecure_channel(self.target, options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        picture, mask = bench_pictures(size)
        picture_png, mask_png = png(picture), png(mask)

        def request(i: int):
            kind = kinds[i % len(kinds)]
            extra = {}
            if kind == "img2img":
                extra = dict(init_image=picture_png, strength=STRENGTH)
            elif kind == "inpaint":
                extra = dict(init_image=picture_png, mask_image=mask_png)
            if adapters:
                extra["adapters"] = [generation_pb2.AdapterRef(model=adapters[i % len(adapters)])]
            return generation_pb2.GenerateRequest(
                model=model, prompt=prompt_for(i), seed=1000 + i,
                guidance_scale=guidance_for(i), num_inference_steps=s.steps, scheduler=scheduler,
                width=size, height=size, **extra)

        before = self._counters() if measured else None
        elapsed, results = run_clients(requests, s.clients,
                                       lambda i: stub.Generate(request(i), timeout=1200))
        channel.close()
        if before is not None:
            phases, rows, forwards = self._counters()
            for p in PHASES:
                self.phases[p] += phases[p] - before[0][p]
            self.rows += rows - before[1]
            self.forwards += forwards - before[2]
            self.latencies += [latency for latency, _ in results]
        return requests / elapsed

    def reset(self) -> None:
        """Forget what earlier runs cost (a workload measures from here)."""
        self.phases = dict.fromkeys(PHASES, 0.0)
        self.rows = self.forwards = 0.0
        self.latencies = []

    @property
    def rows_per_forward(self) -> float:
        return self.rows / self.forwards if self.forwards else 0.0

    def breakdown(self) -> str:
        total = sum(self.phases.values()) or 1.0
        shares = "  ".join(f"{p} {self.phases[p] / total:5.1%}" for p in PHASES)
        return (f"{shares}  (worker {total:.1f} s; {self.rows_per_forward:.1f} rows per "
                "forward)")

    def share(self, phase: str) -> float:
        return self.phases[phase] / (sum(self.phases.values()) or 1.0)

    def quantiles(self) -> tuple[float, float]:
        return (statistics.median(self.latencies),
                statistics.quantiles(self.latencies, n=20)[18])


def export_loras(store, path: str, count: int, family: str = "stable-diffusion") -> list[str]:
    """``count`` rank-8 LoRA models over the denoiser of the model at ``path`` (SD's
    UNet attention, or klein's transformer attention and MLP), from different seeds."""
    import torch
    from diffusers import Flux2Transformer2DModel, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from atelier.models.export import export_lora_model
    from atelier.models.families.flux2_klein import LORA_TARGETS
    from atelier.models.manifest import ManifestWeights, ModelManifest

    klein = family == "flux2-klein"
    denoiser = Flux2Transformer2DModel.from_pretrained(path, subfolder="transformer") \
        if klein else UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    targets = LORA_TARGETS if klein else ["to_q", "to_k", "to_v", "to_out.0"]
    names = []
    for seed in range(count):
        name = f"{'klein-' if klein else ''}subject-{seed}"
        torch.manual_seed(seed)
        denoiser.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights=False,
                                        target_modules=targets), adapter_name=name)
        export_lora_model(store, ModelManifest(
            model_id=name, kind="lora", family=family,
            base_model="models/klein" if klein else "models/sd", base_model_source=path,
            identifier_token="sks", class_prompt="a photo of a dog", lora_rank=8,
            lora_alpha=8, weights=ManifestWeights(lora="x.safetensors")),
            get_peft_model_state_dict(denoiser, adapter_name=name))
        denoiser.delete_adapters(name)
        names.append(name)
    return names


# -- the diffusers baselines ------------------------------------------------------------
def load_pipeline(cls_name: str, model_path: str, s: Settings):
    import diffusers
    import torch
    from diffusers import DDIMScheduler

    dtype = getattr(torch, s.dtype) if s.dtype != "auto" else torch.float32
    extra = {} if "XL" in cls_name else {"safety_checker": None,
                                         "requires_safety_checker": False}
    pipe = getattr(diffusers, cls_name).from_pretrained(model_path, dtype=dtype, **extra)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(s.device)


def kind_inputs(kind: str, size: int, count: int) -> dict:
    picture, mask = bench_pictures(size)
    if kind == "img2img":
        return {"image": [picture] * count, "strength": STRENGTH}
    if kind == "inpaint":
        return {"image": [picture] * count, "mask_image": [mask] * count,
                "width": size, "height": size}
    return {"width": size, "height": size}


def per_request(pipe, s: Settings, size: int, count: int) -> float:
    """Baseline A: one pipeline call per request, one after another (images/s)."""
    import torch

    _sync(s)
    start = time.perf_counter()
    for i in range(count):
        pipe(prompt_for(i), num_inference_steps=s.steps, guidance_scale=guidance_for(i),
             generator=torch.Generator().manual_seed(1000 + i), output_type="pil",
             **kind_inputs("text", size, 1))
    _sync(s)
    return count / (time.perf_counter() - start)


def static(pipe, s: Settings, kind: str, size: int, batch: int, total: int
           ) -> tuple[int, float]:
    """Static batches of ``batch`` prompts with one guidance scale: (images, seconds)."""
    import torch

    _sync(s)
    start = time.perf_counter()
    done = 0
    while done < total:
        prompts = [prompt_for(i) for i in range(done, done + batch)]
        pipe(prompts, num_inference_steps=s.steps, guidance_scale=7.5, output_type="pil",
             generator=[torch.Generator().manual_seed(1000 + i)
                        for i in range(done, done + batch)],
             **kind_inputs(kind, size, batch))
        done += batch
    _sync(s)
    return done, time.perf_counter() - start


def _sync(s: Settings) -> None:
    if s.device == "cuda":
        import torch

        torch.cuda.synchronize()


def free(*pipes) -> None:
    import gc

    import torch

    del pipes
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the workloads -------------------------------------------------------------------------
@dataclass
class Run:
    """What the workloads share: settings, models, services, and the summary."""

    s: Settings
    cache: Path
    sd_path: str
    sdxl_path: str
    summary: list[str] = field(default_factory=list)
    main: Service | None = None  # the eager service of sd, sdxl and mixed
    sd_rows: float = 0.0  # the sd service's mean rows per forward
    sd_ips: float = 0.0

    klein_path: str = ""

    def service(self) -> Service:
        if self.main is None:
            models = {"sd": self.sd_path, **({"sdxl": self.sdxl_path} if self.sdxl_path else {}),
                      **({"klein": self.klein_path} if self.klein_path else {})}
            self.main = Service(models, self.s, self.cache)
        return self.main

    def keys(self, text: str) -> None:
        self.summary.append(text)


def _print_service(tag: str, label: str, ips: list[float], service: Service) -> None:
    p50, p95 = service.quantiles()
    emit(f"{tag:<6} {label:<38} {statistics.median(ips):8.2f} images/s   p50 {p50:.3f} s  "
         f"p95 {p95:.3f} s")
    emit(f"{tag:<6} time   {service.breakdown()}")


def workload_text(run: Run, tag: str, model: str, path: str, cls_name: str, size: int,
                  batch: int, requests: int, a_requests: int, prefix: str) -> None:
    """sd and sdxl: baselines A and B against the service, interleaved."""
    s = run.s
    pipe = load_pipeline(cls_name, path, s)
    service = run.service()

    def baseline_b() -> float:
        images, seconds = static(pipe, s, "text", size, batch, requests)
        return images / seconds

    figures = interleaved(s.rounds, {
        "a": lambda: per_request(pipe, s, size, a_requests),
        "b": baseline_b,
        "service": lambda: service.run(model, ("text",), size, requests),
    }, between=service.reset)
    free(pipe)
    a, b, ips = (statistics.median(figures[k]) for k in ("a", "b", "service"))
    emit(f"{tag:<6} baseline A  {cls_name} per request {a:8.2f} images/s")
    emit(f"{tag:<6} baseline B  static batches of {batch:<3d}          {b:8.2f} images/s "
         "(one guidance scale per batch)")
    _print_service(tag, f"service     {s.clients} concurrent gRPC clients", figures["service"],
                   service)
    ra, rb = ratio(figures["service"], figures["a"]), ratio(figures["service"], figures["b"])
    emit(f"{tag:<6} ratio       service / A {ra[0]:6.2f}x ({ra[1]:.2f}-{ra[2]:.2f})   "
         f"service / B {rb[0]:6.2f}x ({rb[1]:.2f}-{rb[2]:.2f})   {s.rounds} rounds")
    p50, p95 = service.quantiles()
    run.keys(f"{prefix}service_ips={ips:.3f} {prefix}baseline_a_ips={a:.3f} "
             f"{prefix}baseline_b_ips={b:.3f} " + ratio_keys(f"{prefix}ratio_a", ra) + " "
             + ratio_keys(f"{prefix}ratio_b", rb)
             + (f" p50_s={p50:.3f} p95_s={p95:.3f}" if not prefix else ""))
    run.keys(_shares(tag, service))
    if tag == "sd":
        run.sd_rows, run.sd_ips = service.rows_per_forward, ips


def _shares(tag: str, service: Service) -> str:
    return (f"{tag}_denoise_share={service.share('denoise'):.3f} "
            f"{tag}_scheduler_share={service.share('scheduler'):.3f} "
            f"{tag}_idle_share={service.share('idle'):.3f} "
            f"{tag}_rows_per_forward={service.rows_per_forward:.1f}")


def workload_mixed(run: Run) -> None:
    s = run.s
    pipes = {kind: load_pipeline(cls, run.sd_path, s) for kind, cls in zip(
        KINDS, ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                "StableDiffusionInpaintPipeline"), strict=True)}
    per_kind = -(-s.requests // len(KINDS))

    def baseline() -> float:
        images, seconds = 0, 0.0
        for kind, pipe in pipes.items():
            done, sec = static(pipe, s, kind, s.size, s.batch, per_kind)
            images, seconds = images + done, seconds + sec
        return images / seconds

    service = run.service()
    figures = interleaved(s.rounds, {
        "static": baseline, "service": lambda: service.run("sd", KINDS, s.size, s.requests)},
        between=service.reset)
    free(*pipes.values())
    static_ips, ips = statistics.median(figures["static"]), statistics.median(figures["service"])
    emit(f"mixed  baseline    each kind's pipeline, static batches  {static_ips:8.2f} images/s "
         f"(text, img2img {STRENGTH}, inpaint)")
    _print_service("mixed", "service     a third of each kind, interleaved",
                   figures["service"], service)
    m = ratio(figures["service"], figures["static"])
    emit(f"mixed  ratio       service / static {m[0]:6.2f}x ({m[1]:.2f}-{m[2]:.2f})")
    run.keys(f"mixed_service_ips={ips:.3f} mixed_static_ips={static_ips:.3f} "
             + ratio_keys("mixed_ratio", m))
    run.keys(_shares("mixed", service))


def workload_lora(run: Run, klein: bool = False) -> None:
    """lora (SD) and flux_lora (klein): eight LoRA models mixed in one forward against
    one forward per adapter group, each on its own fresh service."""
    from atelier.kit.settings import StorageSettings
    from atelier.storage import open_store

    s = run.s
    tag, prefix = ("flux_l", "flux_lora") if klein else ("lora", "lora")
    path, size, requests = (run.klein_path, s.klein_size, s.klein_requests) if klein else \
        (run.sd_path, s.size, s.requests)
    loras = export_loras(open_store(StorageSettings(local_root=run.cache / "store")), path, 8,
                         family="flux2-klein" if klein else "stable-diffusion")
    models = {"sd": run.sd_path, **({"klein": run.klein_path} if klein else {})}
    services = {mix: Service(models, s, run.cache, mix_adapters=mix) for mix in (True, False)}
    model, scheduler = ("klein", "") if klein else ("", "ddim")
    try:
        figures = interleaved(s.rounds, {
            mode: (lambda mix=mix: services[mix].run(model, ("text",), size, requests, loras,
                                                     scheduler=scheduler))
            for mode, mix in (("mixed", True), ("split", False))},
            between=lambda: [service.reset() for service in services.values()])
    finally:
        for service in services.values():
            service.stop()
    _print_service(tag, "split   one forward per adapter group", figures["split"],
                   services[False])
    _print_service(tag, "mixed   every adapter in one forward", figures["mixed"],
                   services[True])
    m = ratio(figures["mixed"], figures["split"])
    emit(f"{tag:<6} ratio       mixed / split {m[0]:6.2f}x ({m[1]:.2f}-{m[2]:.2f})  "
         f"({len(loras)} {'klein ' if klein else ''}LoRA models)")
    run.keys(f"{prefix}_mix_ips={statistics.median(figures['mixed']):.3f} "
             f"{prefix}_split_ips={statistics.median(figures['split']):.3f} "
             + ratio_keys(f"{prefix}_mix_ratio", m))


def klein_pipeline(path: str, s: Settings):
    import torch
    from diffusers import Flux2KleinPipeline

    dtype = getattr(torch, s.dtype) if s.dtype != "auto" else torch.float32
    pipe = Flux2KleinPipeline.from_pretrained(path, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(s.device)


def klein_per_request(pipe, s: Settings, size: int, count: int) -> float:
    """flux baseline A: Flux2KleinPipeline once per request (images/s)."""
    import torch

    _sync(s)
    start = time.perf_counter()
    for i in range(count):
        pipe(prompt=prompt_for(i), height=size, width=size, num_inference_steps=s.steps,
             guidance_scale=guidance_for(i), output_type="pil",
             generator=torch.Generator().manual_seed(1000 + i))
    _sync(s)
    return count / (time.perf_counter() - start)


def klein_static(pipe, s: Settings, size: int, batch: int, total: int) -> float:
    """flux baseline B: one pipeline call per ``batch`` prompts, one guidance scale."""
    import torch

    _sync(s)
    start = time.perf_counter()
    for done in range(0, total, batch):
        pipe(prompt=[prompt_for(i) for i in range(done, done + batch)], height=size,
             width=size, num_inference_steps=s.steps, guidance_scale=4.0, output_type="pil",
             generator=[torch.Generator().manual_seed(1000 + i)
                        for i in range(done, done + batch)])
    _sync(s)
    return total / (time.perf_counter() - start)


def workload_flux(run: Run) -> None:
    """klein base: the service against the pipeline per request and in static batches."""
    s = run.s
    size, batch = s.klein_size, s.klein_batch
    pipe = klein_pipeline(run.klein_path, s)
    service = run.service()
    figures = interleaved(s.rounds, {
        "a": lambda: klein_per_request(pipe, s, size, s.klein_a_requests),
        "b": lambda: klein_static(pipe, s, size, batch, s.klein_requests),
        "service": lambda: service.run("klein", ("text",), size, s.klein_requests,
                                       scheduler=""),
    }, between=service.reset)
    free(pipe)
    a, b, ips = (statistics.median(figures[k]) for k in ("a", "b", "service"))
    emit(f"flux   baseline A  Flux2KleinPipeline per request {a:8.2f} images/s (CFG: two "
         "forwards a step)")
    emit(f"flux   baseline B  static batches of {batch:<3d}           {b:8.2f} images/s "
         "(one guidance scale per batch)")
    _print_service("flux", f"service     {s.clients} clients, own seed and guidance",
                   figures["service"], service)
    ra, rb = ratio(figures["service"], figures["a"]), ratio(figures["service"], figures["b"])
    emit(f"flux   ratio       service / A {ra[0]:6.2f}x ({ra[1]:.2f}-{ra[2]:.2f})   "
         f"service / B {rb[0]:6.2f}x ({rb[1]:.2f}-{rb[2]:.2f})   {s.rounds} rounds")
    run.keys(f"flux_service_ips={ips:.3f} flux_baseline_a_ips={a:.3f} "
             f"flux_baseline_b_ips={b:.3f} " + ratio_keys("flux_ratio_a", ra) + " "
             + ratio_keys("flux_ratio_b", rb))
    run.keys(_shares("flux", service))


def workload_compile(run: Run, graphs: bool) -> None:
    """compile: the compiled service against the eager one; graphs: the compiled
    service with CUDA graphs against the compiled one."""
    s = run.s
    tag = "graphs" if graphs else "compile"
    eager = run.service() if not graphs else Service(
        {"sd": run.sd_path}, s, run.cache, compile_unet=True, batch_buckets=s.buckets)
    compiled = Service({"sd": run.sd_path}, s, run.cache, compile_unet=True,
                       batch_buckets=s.buckets, cuda_graphs=graphs)
    try:
        figures = interleaved(s.rounds, {
            "base": lambda: eager.run("sd", ("text",), s.size, s.requests),
            "new": lambda: compiled.run("sd", ("text",), s.size, s.requests)},
            between=lambda: (eager.reset(), compiled.reset()))
        graph_bytes = scrape(compiled.metrics_port).get(
            ("atelier_generation_cuda_graph_bytes", ()), 0.0)
    finally:
        compiled.stop()
        if graphs:
            eager.stop()
    warmup = compiled.start_seconds - eager.start_seconds
    m = ratio(figures["new"], figures["base"])
    if graphs:
        _print_service(tag, "compiled    compile_unet", figures["base"], eager)
        _print_service(tag, "graphs      compile_unet + cuda_graphs", figures["new"], compiled)
        emit(f"graphs ratio       graphs / compiled {m[0]:6.2f}x ({m[1]:.2f}-{m[2]:.2f})   "
             f"graph memory {graph_bytes / 2**20:.0f} MiB")
        run.keys(f"graphs_ips={statistics.median(figures['new']):.3f} "
                 + ratio_keys("graphs_ratio", m) + f" graphs_mib={graph_bytes / 2**20:.0f}")
        return
    _print_service(tag, "eager       the sd service", figures["base"], eager)
    _print_service(tag, f"compiled    buckets {s.buckets[0]}..{s.buckets[-1]}", figures["new"],
                   compiled)
    emit(f"compile ratio      compiled / eager {m[0]:6.2f}x ({m[1]:.2f}-{m[2]:.2f})   warm-up "
         f"{warmup:.1f} s (start to SERVING: {compiled.start_seconds:.1f} s, eager "
         f"{eager.start_seconds:.1f} s)")
    run.keys(f"compiled_ips={statistics.median(figures['new']):.3f} "
             + ratio_keys("compile_ratio", m) + f" compile_warmup_s={warmup:.1f}")


def workload_ceiling(run: Run) -> None:
    """The denoiser alone at the service's mean rows per forward, eager and compiled,
    against the matmul rate measured now."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    s = run.s
    dtype = getattr(torch, s.dtype) if s.dtype != "auto" else torch.float32
    device = torch.device(s.device)
    rate = matmul_rate(device, dtype)
    unet = UNet2DConditionModel.from_pretrained(run.sd_path, subfolder="unet",
                                                dtype=dtype).to(device).eval()
    if s.device == "cuda":
        unet.to(memory_format=torch.channels_last)
    rows = max(1, round(run.sd_rows or 2 * s.batch))
    latent = s.size // 8
    sample = torch.randn(rows, 4, latent, latent, device=device, dtype=dtype)
    hidden = torch.randn(rows, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    t = torch.full((rows,), 500.0, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(sample[:1], t[:1], hidden[:1])
    flops = float(counter.get_total_flops())
    eager_s = time_forward(unet, sample, t, hidden, s)
    start = time.perf_counter()
    compiled = torch.compile(unet, dynamic=False)
    compiled_s = time_forward(compiled, sample, t, hidden, s)
    compile_s = time.perf_counter() - start
    free(unet, compiled)
    # Images per second of each, at two rows (guided) per image per step.
    per_image = 2 * s.steps
    ceiling_ips = rows / compiled_s / per_image
    ceiling_mfu = rows * flops / compiled_s / rate
    service_mfu = run.sd_ips * per_image * flops / rate
    emit(f"ceiling matmul     {dtype} {rate / 1e12:8.1f} TFLOP/s measured now")
    emit(f"ceiling denoiser   {rows} rows, {flops / 1e9:.1f} GFLOP per row: eager "
         f"{eager_s * 1e3:.1f} ms ({rows * flops / eager_s / rate:.1%}), compiled "
         f"{compiled_s * 1e3:.1f} ms ({ceiling_mfu:.1%}; compile {compile_s:.0f} s)")
    emit(f"ceiling service    {run.sd_ips:.2f} images/s = {service_mfu:.1%} of the matmul rate; "
         f"the compiled denoiser alone: {ceiling_ips:.2f} images/s; service / ceiling "
         f"{run.sd_ips / ceiling_ips:.2f}")
    run.keys(f"matmul_tflops={rate / 1e12:.1f} unet_gflop={flops / 1e9:.1f} "
             f"ceiling_rows={rows} ceiling_eager_ms={eager_s * 1e3:.1f} "
             f"ceiling_compiled_ms={compiled_s * 1e3:.1f} ceiling_mfu={ceiling_mfu:.4f} "
             f"mfu={service_mfu:.4f} service_vs_ceiling={run.sd_ips / ceiling_ips:.2f}")


def matmul_rate(device, dtype) -> float:
    """FLOP/s of a large square matmul in ``dtype`` on ``device`` (mean of 10 after 3)."""
    import torch

    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def one():
        return a @ b

    seconds = _timed(one, device, 3, 10)
    return 2 * n**3 / seconds


def time_forward(unet, sample, t, hidden, s: Settings) -> float:
    import torch

    with torch.inference_mode():
        return _timed(lambda: unet(sample, t, hidden, return_dict=False),
                      torch.device(s.device), 3, 10)


def _timed(fn: Callable, device, warm: int, iterations: int) -> float:
    """Seconds per call: CUDA events on a GPU, the host clock elsewhere."""
    import torch

    with torch.inference_mode():
        for _ in range(warm):
            fn()
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            begin.record()
            for _ in range(iterations):
                fn()
            end.record()
            torch.cuda.synchronize()
            return begin.elapsed_time(end) / 1e3 / iterations
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        return (time.perf_counter() - start) / iterations


# -- the run -------------------------------------------------------------------------------
def settings_for(args) -> Settings:
    if args.gpu:
        # 64 SD requests a round from 32 clients: two turnovers of the batch (48 gave
        # 46 rows per forward of 64, against 62 at 64); SDXL's batch of 8 is full
        # from 8 requests on, since 32 clients keep its queue full.
        s = Settings("cuda", "bfloat16", 25, 32, args.requests or 64, args.clients or 32,
                     args.baseline_a_requests or 3, 512, 1024, 8, 8, 1, args.rounds,
                     klein_size=1024, klein_batch=8, klein_requests=16, klein_a_requests=2)
    else:
        s = Settings("cpu", "float32", 20, 16, args.requests or 64, args.clients or 16,
                     args.baseline_a_requests or 16, 128, 128, 16, args.requests or 64,
                     args.baseline_a_requests or 16, args.rounds)
    s.buckets = [b for b in (1, 2, 4, 8, 16, 32, 64, 128) if b <= 2 * max(s.batch, s.sdxl_batch)]
    return s


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true",
                        help="SD-1.5-size and SDXL-base-size models on CUDA, bf16")
    parser.add_argument("--only", default="",
                        help=f"comma-separated workloads, of {', '.join(WORKLOADS)} "
                             f"(default: {','.join(GPU_DEFAULT)} with --gpu, "
                             f"{','.join(CPU_DEFAULT)} on CPU)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measured rounds of each comparison, after a warm-up (>= 3)")
    parser.add_argument("--requests", type=int, default=None, help="service requests per round")
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--baseline-a-requests", type=int, default=None,
                        help="requests per round of baseline A")
    args = parser.parse_args()
    chosen = [w.strip() for w in args.only.split(",") if w.strip()] or list(
        GPU_DEFAULT if args.gpu else CPU_DEFAULT)
    unknown = set(chosen) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    s = settings_for(args)
    cache = Path(tempfile.mkdtemp(prefix="atelier-bench-"))
    started = time.perf_counter()
    if args.gpu:
        import torch

        from atelier.tiny_models.stable_diffusion import build_random_sd15, build_random_sdxl

        sd_path = str(build_random_sd15(cache / "sd15-random", dtype=torch.bfloat16,
                                        device="cuda"))
        sdxl_path = str(build_random_sdxl(cache / "sdxl-random", device="cuda")) \
            if "sdxl" in chosen else ""
        from atelier.tiny_models.flux2_klein import build_random_klein_4b

        klein_path = str(build_random_klein_4b(cache / "klein-4b-random", device="cuda")) \
            if {"flux", "flux_lora"} & set(chosen) else ""
    else:
        from atelier.tiny_models.cache import ensure_tiny_model

        models = REPO / ".cache/atelier/models"
        sd_path = str(ensure_tiny_model("stable-diffusion", models))
        sdxl_path = str(ensure_tiny_model("stable-diffusion-xl", models))
        klein_path = str(ensure_tiny_model("flux2-klein-base", models))
    build_s = time.perf_counter() - started
    emit(f"device {s.device}  dtype {s.dtype}  {s.steps} DDIM steps  {s.rounds} rounds of "
         f"{s.requests} requests from {s.clients} clients  workloads {','.join(chosen)}\n"
         f"  sd   {sd_path}  {s.size} px  batch<={s.batch}\n"
         f"  sdxl {sdxl_path or '-'}  {s.sdxl_size} px  batch<={s.sdxl_batch}\n"
         f"  klein {klein_path or '-'}  {s.klein_size} px  batch<={s.klein_batch}\n"
         f"  models ready in {build_s:.1f} s")
    run = Run(s, cache, sd_path, sdxl_path, klein_path=klein_path)
    run.keys(f"mode={'gpu' if args.gpu else 'cpu'} build_s={build_s:.1f}")
    workloads: dict[str, Callable[[], None]] = {
        "sd": lambda: workload_text(run, "sd", "sd", sd_path, "StableDiffusionPipeline",
                                    s.size, s.batch, s.requests, s.a_requests, ""),
        "ceiling": lambda: workload_ceiling(run),
        "sdxl": lambda: workload_text(run, "sdxl", "sdxl", sdxl_path,
                                      "StableDiffusionXLPipeline", s.sdxl_size, s.sdxl_batch,
                                      s.sdxl_requests, s.sdxl_a_requests, "sdxl_"),
        "mixed": lambda: workload_mixed(run),
        "lora": lambda: workload_lora(run),
        "flux": lambda: workload_flux(run),
        "flux_lora": lambda: workload_lora(run, klein=True),
        "compile": lambda: workload_compile(run, graphs=False),
        "graphs": lambda: workload_compile(run, graphs=True),
    }
    try:
        for name in WORKLOADS:
            if name in chosen:
                began = time.perf_counter()
                workloads[name]()
                emit(f"{name:<6} done in {time.perf_counter() - began:.0f} s")
    finally:
        if run.main is not None:
            run.main.stop()
        total = time.perf_counter() - started
        run.keys(f"total_s={total:.0f}")
        emit(" ".join(run.summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
