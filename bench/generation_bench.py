"""make bench-generation: the generation service against diffusers, in one run.

Three workloads, each against baselines measured in the same run. Every service
request has its own seed and guidance scale; the service runs in its own
process and is called by concurrent gRPC clients.

- ``sd``: SD 1.x text to image (the tiny model at 128 px on CPU).
  - baseline A: StableDiffusionPipeline called once per request, one after another;
  - baseline B: one static pipeline call per ``batch`` prompts, one guidance scale
    (diffusers' best case; it cannot honour per-request seeds or guidance).
- ``sdxl``: the same two comparisons for SDXL (the tiny SDXL on CPU), against
  StableDiffusionXLPipeline.
- ``mixed``: a third each of text to image, img2img (strength 0.6) and inpainting
  (an ordinary UNet) on the SD model, interleaved. Baseline: each kind's own
  pipeline (StableDiffusionPipeline, -Img2ImgPipeline, -InpaintPipeline) in static
  batches of its kind.
- ``lora``: eight LoRA models over the SD model (random adapters from eight seeds,
  rank 8, exported as the training service exports them), requests round-robin
  over them. The service mixing every adapter into one UNet forward against the
  same service running one forward per adapter group (``mix_adapters=false``),
  both in this run, each on a fresh service process.
- ``compile``: the ``sd`` workload on a service with ``compile_unet`` (batch
  buckets 1..32) against the eager service; the warm-up is the compiled
  service's extra start time.

GPU mode (--gpu): SD-1.5-size (512 px) and SDXL-base-size (1024 px) random
weights, bf16; also the fraction of the GPU's bf16 peak the SD service uses.

Prints each figure and its ratio to the baselines; the last line is one
key=value summary. A benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from service_process import run_clients, start_service, stop_service

REPO = Path(__file__).resolve().parent.parent
KINDS = ("text", "img2img", "inpaint")
STRENGTH = 0.6


@dataclass
class Settings:
    device: str
    dtype: str
    steps: int
    batch: int
    requests: int
    clients: int
    size: int  # SD
    sdxl_size: int
    sdxl_batch: int


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
def start_generation(models: dict[str, str], s: Settings, cache_dir: Path, **engine):
    """The service, and the seconds it took to turn SERVING. ``engine``: more
    generation settings (``mix_adapters=False``...)."""
    import json

    started = time.perf_counter()
    proc, target = start_service("generation", {
        **{f"ATELIER_GENERATION__{k.upper()}": json.dumps(v) for k, v in engine.items()},
        "ATELIER_STORAGE__LOCAL_ROOT": str(cache_dir / "store"),
        "ATELIER_MODELS__CACHE_DIR": str(cache_dir / "models"),
        "ATELIER_GENERATION__BASE_MODELS": json.dumps(models),
        "ATELIER_GENERATION__DEFAULT_MODEL": "sd",
        "ATELIER_GENERATION__MAX_BATCH_SIZE": str(max(s.batch, s.sdxl_batch)),
        "ATELIER_GENERATION__MAX_IMAGES_PER_REQUEST": "1",
        "ATELIER_GENERATION__MAX_QUEUE_LENGTH": str(s.requests * 2),
        "ATELIER_GENERATION__DEVICE": s.device,
        "ATELIER_GENERATION__DTYPE": s.dtype,
    }, timeout=3600)
    return proc, target, time.perf_counter() - started


def export_loras(store, sd_path: str, count: int) -> list[str]:
    """``count`` LoRA models over the SD model, from different seeds, in the store."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from atelier.model_export import export_lora_model
    from atelier.model_manifest import ManifestWeights, ModelManifest

    names = []
    for seed in range(count):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_pretrained(sd_path, subfolder="unet")
        unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights=False,
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        name = f"subject-{seed}"
        export_lora_model(store, ModelManifest(
            model_id=name, kind="lora", base_model="models/sd", base_model_source=sd_path,
            identifier_token="sks", class_prompt="a photo of a dog", lora_rank=8,
            lora_alpha=8, weights=ManifestWeights(lora="x.safetensors")),
            get_peft_model_state_dict(unet))
        names.append(name)
    return names


def run_service(target: str, s: Settings, model: str, kinds: tuple[str, ...],
                size: int, adapters: list[str] | None = None) -> tuple[float, list[float]]:
    import grpc

    from atelier.v1 import generation_pb2, generation_pb2_grpc

    channel = grpc.insecure_channel(target, options=[
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
            model=model, prompt=prompt_for(i), seed=1000 + i, guidance_scale=guidance_for(i),
            num_inference_steps=s.steps, scheduler="ddim", width=size, height=size, **extra)

    for i in range(max(len(kinds), len(adapters or ()))):
        stub.Generate(request(i), timeout=1200)  # warm-up
    elapsed, results = run_clients(s.requests, s.clients,
                                   lambda i: stub.Generate(request(i), timeout=1200))
    channel.close()
    return s.requests / elapsed, [latency for latency, _ in results]


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


def run_per_request(pipe, s: Settings, size: int, count: int) -> float:
    """Baseline A: one pipeline call per request, one after another."""
    import torch

    def one(i):
        pipe(prompt_for(i), num_inference_steps=s.steps, guidance_scale=guidance_for(i),
             generator=torch.Generator().manual_seed(1000 + i), output_type="pil",
             **kind_inputs("text", size, 1))

    one(0)
    _sync(s)
    start = time.perf_counter()
    for i in range(count):
        one(i)
    _sync(s)
    return count / (time.perf_counter() - start)


def run_static(pipe, s: Settings, kind: str, size: int, batch: int, total: int
               ) -> tuple[int, float]:
    """Static batches of ``batch`` prompts with one guidance scale: (images, seconds)."""
    import torch

    def call(offset):
        prompts = [prompt_for(i) for i in range(offset, offset + batch)]
        pipe(prompts, num_inference_steps=s.steps, guidance_scale=7.5, output_type="pil",
             generator=[torch.Generator().manual_seed(1000 + i)
                        for i in range(offset, offset + batch)],
             **kind_inputs(kind, size, batch))

    call(0)
    _sync(s)
    start = time.perf_counter()
    done = 0
    while done < total:
        call(done)
        done += batch
    _sync(s)
    return done, time.perf_counter() - start


def _sync(s: Settings) -> None:
    if s.device == "cuda":
        import torch

        torch.cuda.synchronize()


def unet_flops_per_image(pipe, s: Settings) -> float:
    """FLOPs of one UNet evaluation of one sample, counted by torch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    latent = s.size // pipe.vae_scale_factor
    sample = torch.randn(1, 4, latent, latent, device=s.device, dtype=pipe.unet.dtype)
    hidden = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, device=s.device,
                         dtype=pipe.unet.dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        pipe.unet(sample, torch.tensor([500.0], device=s.device), hidden)
    return float(counter.get_total_flops())


def free(pipe) -> None:
    import gc

    import torch

    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the run -------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true",
                        help="SD-1.5-size and SDXL-base-size models on CUDA, bf16")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--baseline-a-requests", type=int, default=None,
                        help="requests timed for baseline A (default: all)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="GPU dense bf16 peak, TFLOP/s (H100/H200 SXM: 989)")
    args = parser.parse_args()
    if args.gpu:
        s = Settings("cuda", "bfloat16", 25, 32, args.requests or 96, args.clients or 32,
                     512, 1024, 8)
    else:
        s = Settings("cpu", "float32", 20, 16, args.requests or 96, args.clients or 16,
                     128, 128, 16)
    count_a = args.baseline_a_requests or s.requests

    from atelier.tiny_models.cache import ensure_tiny_model

    cache = Path(tempfile.mkdtemp(prefix="atelier-bench-"))
    if args.gpu:
        from atelier.tiny_models.stable_diffusion import build_random_sd15, build_random_sdxl

        sd_path = str(build_random_sd15(cache / "sd15-random"))
        sdxl_path = str(build_random_sdxl(cache / "sdxl-random"))
    else:
        models = REPO / ".cache/atelier/models"
        sd_path = str(ensure_tiny_model("stable-diffusion", models))
        sdxl_path = str(ensure_tiny_model("stable-diffusion-xl", models))
    print(f"device {s.device}  dtype {s.dtype}  {s.steps} DDIM steps  {s.requests} requests "
          f"from {s.clients} clients\n  sd   {sd_path}  {s.size} px  batch<={s.batch}\n"
          f"  sdxl {sdxl_path}  {s.sdxl_size} px  batch<={s.sdxl_batch}")

    # Baselines first, each pipeline freed before the service loads its own copy.
    pipe = load_pipeline("StableDiffusionPipeline", sd_path, s)
    a = run_per_request(pipe, s, s.size, count_a)
    images, seconds = run_static(pipe, s, "text", s.size, s.batch, s.requests)
    b = images / seconds
    flops = unet_flops_per_image(pipe, s) if args.gpu else 0.0
    free(pipe)
    static_images, static_seconds = 0, 0.0
    per_kind = -(-s.requests // len(KINDS))
    for kind, cls in zip(KINDS, ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                                 "StableDiffusionInpaintPipeline"), strict=True):
        pipe = load_pipeline(cls, sd_path, s)
        images, seconds = run_static(pipe, s, kind, s.size, s.batch, per_kind)
        static_images, static_seconds = static_images + images, static_seconds + seconds
        free(pipe)
    mixed_b = static_images / static_seconds
    pipe = load_pipeline("StableDiffusionXLPipeline", sdxl_path, s)
    xl_a = run_per_request(pipe, s, s.sdxl_size, min(count_a, 24 if args.gpu else count_a))
    images, seconds = run_static(pipe, s, "text", s.sdxl_size, s.sdxl_batch, s.requests)
    xl_b = images / seconds
    free(pipe)

    from atelier.kit.settings import StorageSettings
    from atelier.storage import open_store

    loras = export_loras(open_store(StorageSettings(local_root=cache / "store")), sd_path, 8)
    proc, target, eager_start = start_generation({"sd": sd_path, "sdxl": sdxl_path}, s, cache)
    try:
        service, latencies = run_service(target, s, "sd", ("text",), s.size)
        xl_service, xl_latencies = run_service(target, s, "sdxl", ("text",), s.sdxl_size)
        mixed, mixed_latencies = run_service(target, s, "sd", KINDS, s.size)
    finally:
        stop_service(proc)
    lora_runs = {}
    for mix in (True, False):  # each on a fresh service, so both have the same history
        proc, target, _ = start_generation({"sd": sd_path}, s, cache, mix_adapters=mix)
        try:
            lora_runs[mix] = run_service(target, s, "", ("text",), s.size, loras)
        finally:
            stop_service(proc)
    (lora_mix, lora_mix_latencies), (lora_split, lora_split_latencies) = \
        lora_runs[True], lora_runs[False]
    buckets = [b for b in (1, 2, 4, 8, 16, 32, 64, 128)
               if b <= 2 * max(s.batch, s.sdxl_batch)]
    proc, target, compiled_start = start_generation({"sd": sd_path}, s, cache,
                                                    compile_unet=True, batch_buckets=buckets)
    try:
        compiled, compiled_latencies = run_service(target, s, "sd", ("text",), s.size)
    finally:
        stop_service(proc)

    def quantiles(values):
        return statistics.median(values), statistics.quantiles(values, n=20)[18]

    p50, p95 = quantiles(latencies)
    xl_p50, xl_p95 = quantiles(xl_latencies)
    mixed_p50, mixed_p95 = quantiles(mixed_latencies)
    mix_p50, mix_p95 = quantiles(lora_mix_latencies)
    split_p50, split_p95 = quantiles(lora_split_latencies)
    compiled_p50, compiled_p95 = quantiles(compiled_latencies)
    warmup = compiled_start - eager_start
    print(f"sd     baseline A  StableDiffusionPipeline per request   {a:8.2f} images/s")
    print(f"sd     baseline B  static batches of {s.batch:<3d}                {b:8.2f} images/s "
          "(one guidance scale per batch)")
    print(f"sd     service     {s.clients} concurrent gRPC clients          {service:8.2f} "
          f"images/s   p50 {p50:.3f} s  p95 {p95:.3f} s")
    print(f"sd     ratio       service / A {service / a:6.2f}x   service / B {service / b:6.2f}x")
    print(f"sdxl   baseline A  StableDiffusionXLPipeline per request {xl_a:8.2f} images/s")
    print(f"sdxl   baseline B  static batches of {s.sdxl_batch:<3d}                "
          f"{xl_b:8.2f} images/s")
    print(f"sdxl   service     {s.clients} concurrent gRPC clients          {xl_service:8.2f} "
          f"images/s   p50 {xl_p50:.3f} s  p95 {xl_p95:.3f} s")
    print(f"sdxl   ratio       service / A {xl_service / xl_a:6.2f}x   "
          f"service / B {xl_service / xl_b:6.2f}x")
    print(f"mixed  baseline    each kind's pipeline, static batches  {mixed_b:8.2f} images/s "
          f"(text, img2img {STRENGTH}, inpaint)")
    print(f"mixed  service     a third of each kind, interleaved     {mixed:8.2f} "
          f"images/s   p50 {mixed_p50:.3f} s  p95 {mixed_p95:.3f} s")
    print(f"mixed  ratio       service / static {mixed / mixed_b:6.2f}x")
    print(f"lora   split       one forward per adapter group         {lora_split:8.2f} "
          f"images/s   p50 {split_p50:.3f} s  p95 {split_p95:.3f} s  ({len(loras)} LoRA models)")
    print(f"lora   mixed       every adapter in one forward          {lora_mix:8.2f} "
          f"images/s   p50 {mix_p50:.3f} s  p95 {mix_p95:.3f} s")
    print(f"lora   ratio       mixed / split {lora_mix / lora_split:6.2f}x")
    print(f"compile eager      the sd service above                  {service:8.2f} images/s")
    print(f"compile compiled   compile_unet, buckets 1..{buckets[-1]:<3d}          {compiled:8.2f} "
          f"images/s   p50 {compiled_p50:.3f} s  p95 {compiled_p95:.3f} s")
    print(f"compile ratio      compiled / eager {compiled / service:6.2f}x   warm-up "
          f"{warmup:.1f} s (start to SERVING: {compiled_start:.1f} s, eager {eager_start:.1f} s)")
    summary = (f"mode={'gpu' if args.gpu else 'cpu'} service_ips={service:.3f} "
               f"baseline_a_ips={a:.3f} baseline_b_ips={b:.3f} "
               f"ratio_a={service / a:.2f} ratio_b={service / b:.2f} "
               f"p50_s={p50:.3f} p95_s={p95:.3f} "
               f"sdxl_service_ips={xl_service:.3f} sdxl_baseline_a_ips={xl_a:.3f} "
               f"sdxl_baseline_b_ips={xl_b:.3f} sdxl_ratio_a={xl_service / xl_a:.2f} "
               f"sdxl_ratio_b={xl_service / xl_b:.2f} mixed_service_ips={mixed:.3f} "
               f"mixed_static_ips={mixed_b:.3f} mixed_ratio={mixed / mixed_b:.2f} "
               f"lora_mix_ips={lora_mix:.3f} lora_split_ips={lora_split:.3f} "
               f"lora_mix_ratio={lora_mix / lora_split:.2f} compiled_ips={compiled:.3f} "
               f"compile_ratio={compiled / service:.2f} compile_warmup_s={warmup:.1f}")
    if args.gpu:
        # Classifier-free guidance: two UNet samples per image per step.
        achieved = service * s.steps * 2 * flops
        mfu = achieved / (args.peak_tflops * 1e12)
        print(f"gpu    SD UNet {flops / 1e9:.0f} GFLOP/sample; the sd service uses "
              f"{achieved / 1e12:.0f} TFLOP/s = {mfu:.1%} of {args.peak_tflops:.0f} TFLOP/s")
        summary += f" unet_gflop={flops / 1e9:.1f} mfu={mfu:.4f}"
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
