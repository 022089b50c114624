"""make bench-generation: the generation service against diffusers, in one run.

CPU mode (default): the tiny model at 128x128 px, 20 DDIM steps.
- service: 16 concurrent gRPC clients, 96 one-image requests, each with its own
  seed and guidance scale, against the generation service in its own process;
- baseline A: the same 96 requests through diffusers' StableDiffusionPipeline,
  in-process, one after another (what a naive service does);
- baseline B: one static pipeline call per 16 prompts with a single guidance
  scale (diffusers' best case; it cannot honour per-request seeds or guidance).

GPU mode (--gpu): an SD-1.5-size UNet with random weights, 512 px, 25 steps,
bf16, batches up to 32; also reports the fraction of the GPU's bf16 peak used.

Prints each figure and its ratio to the baselines; the last line is a single
key=value summary. A benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from service_process import run_clients, start_service, stop_service

REPO = Path(__file__).resolve().parent.parent


def start_generation(model_path: str, args, cache_dir: Path):
    return start_service("generation", {
        "ATELIER_STORAGE__LOCAL_ROOT": str(cache_dir / "store"),
        "ATELIER_MODELS__CACHE_DIR": str(cache_dir / "models"),
        "ATELIER_GENERATION__BASE_MODELS": f'{{"bench": "{model_path}"}}',
        "ATELIER_GENERATION__DEFAULT_MODEL": "bench",
        "ATELIER_GENERATION__MAX_BATCH_SIZE": str(args.batch),
        "ATELIER_GENERATION__MAX_IMAGES_PER_REQUEST": "1",
        "ATELIER_GENERATION__MAX_QUEUE_LENGTH": str(args.requests * 2),
        "ATELIER_GENERATION__DEVICE": args.device,
        "ATELIER_GENERATION__DTYPE": args.dtype,
    })


def guidance_for(i: int) -> float:
    return 3.0 + (i % 16) * 0.5  # distinct per concurrent client


def run_service(target: str, args) -> tuple[float, list[float]]:
    import grpc

    from atelier.v1 import generation_pb2, generation_pb2_grpc

    channel = grpc.insecure_channel(target, options=[
        ("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    stub = generation_pb2_grpc.GenerationServiceStub(channel)

    def request(i: int):
        return generation_pb2.GenerateRequest(
            prompt=f"a photo of sks dog number {i}", seed=1000 + i, guidance_scale=guidance_for(i),
            num_inference_steps=args.steps, scheduler="ddim", width=args.size, height=args.size)

    stub.Generate(request(0), timeout=600)  # warm-up
    elapsed, results = run_clients(args.requests, args.clients,
                                   lambda i: stub.Generate(request(i), timeout=600))
    channel.close()
    return args.requests / elapsed, [latency for latency, _ in results]


def load_pipeline(model_path: str, args):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(model_path, dtype=dtype,
                                                   safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(args.device)


def run_baseline_a(pipe, args, count: int) -> float:
    import torch

    def one(i):
        pipe(f"a photo of sks dog number {i}", num_inference_steps=args.steps,
             guidance_scale=guidance_for(i), width=args.size, height=args.size,
             generator=torch.Generator().manual_seed(1000 + i), output_type="pil")

    one(0)
    _sync(args)
    start = time.perf_counter()
    for i in range(count):
        one(i)
    _sync(args)
    return count / (time.perf_counter() - start)


def run_baseline_b(pipe, args) -> float:
    import torch

    def batch(offset):
        prompts = [f"a photo of sks dog number {i}" for i in range(offset, offset + args.batch)]
        pipe(prompts, num_inference_steps=args.steps, guidance_scale=7.5, width=args.size,
             height=args.size, output_type="pil",
             generator=[torch.Generator().manual_seed(1000 + i)
                        for i in range(offset, offset + args.batch)])

    batch(0)
    _sync(args)
    start = time.perf_counter()
    done = 0
    while done < args.requests:
        batch(done)
        done += args.batch
    _sync(args)
    return done / (time.perf_counter() - start)


def _sync(args) -> None:
    if args.device == "cuda":
        import torch

        torch.cuda.synchronize()


def unet_flops_per_image(pipe, args) -> float:
    """FLOPs of one UNet evaluation of one sample, counted by torch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    latent = args.size // pipe.vae_scale_factor
    sample = torch.randn(1, 4, latent, latent, device=args.device, dtype=pipe.unet.dtype)
    hidden = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, device=args.device,
                         dtype=pipe.unet.dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        pipe.unet(sample, torch.tensor([500.0], device=args.device), hidden)
    return float(counter.get_total_flops())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="SD-1.5-size model on CUDA, bf16")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--clients", type=int, default=None)
    parser.add_argument("--baseline-a-requests", type=int, default=None,
                        help="requests timed for baseline A (default: all)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="GPU dense bf16 peak, TFLOP/s (H100/H200 SXM: 989)")
    args = parser.parse_args()
    if args.gpu:
        args.device, args.dtype, args.size, args.steps, args.batch = "cuda", "bfloat16", 512, 25, 32
        args.requests = args.requests or 96
        args.clients = args.clients or 32
    else:
        args.device, args.dtype, args.size, args.steps, args.batch = "cpu", "float32", 128, 20, 16
        args.requests = args.requests or 96
        args.clients = args.clients or 16
    count_a = args.baseline_a_requests or args.requests

    from atelier.tiny_models.cache import ensure_tiny_model

    cache = Path(tempfile.mkdtemp(prefix="atelier-bench-"))
    if args.gpu:
        from atelier.tiny_models.stable_diffusion import build_random_sd15

        model_path = str(build_random_sd15(cache / "sd15-random"))
    else:
        model_path = str(ensure_tiny_model("stable-diffusion", REPO / ".cache/atelier/models"))
    print(f"model {model_path}  device {args.device}  dtype {args.dtype}  "
          f"{args.size}x{args.size} px  {args.steps} DDIM steps  batch<={args.batch}")

    pipe = load_pipeline(model_path, args)
    a = run_baseline_a(pipe, args, count_a)
    b = run_baseline_b(pipe, args)
    flops = unet_flops_per_image(pipe, args) if args.gpu else 0.0
    del pipe
    if args.gpu:
        import torch

        torch.cuda.empty_cache()

    proc, target = start_generation(model_path, args, cache)
    try:
        service, latencies = run_service(target, args)
    finally:
        stop_service(proc)
    p50 = statistics.median(latencies)
    p95 = statistics.quantiles(latencies, n=20)[18]

    print(f"baseline A  diffusers, sequential requests      {a:8.2f} images/s")
    print(f"baseline B  diffusers, static batches of {args.batch:<3d}     {b:8.2f} images/s "
          "(one guidance scale per batch)")
    print(f"service     {args.clients} concurrent gRPC clients        {service:8.2f} images/s")
    print(f"ratio       service / baseline A            {service / a:8.2f}x")
    print(f"ratio       service / baseline B            {service / b:8.2f}x")
    print(f"latency     p50 {p50:.3f} s   p95 {p95:.3f} s")
    summary = (f"mode={'gpu' if args.gpu else 'cpu'} service_ips={service:.3f} "
               f"baseline_a_ips={a:.3f} baseline_b_ips={b:.3f} "
               f"ratio_a={service / a:.2f} ratio_b={service / b:.2f} "
               f"p50_s={p50:.3f} p95_s={p95:.3f}")
    if args.gpu:
        # Classifier-free guidance: two UNet samples per image per step.
        achieved = service * args.steps * 2 * flops
        mfu = achieved / (args.peak_tflops * 1e12)
        print(f"gpu         UNet {flops / 1e9:.0f} GFLOP/sample; service uses "
              f"{achieved / 1e12:.0f} TFLOP/s = {mfu:.1%} of {args.peak_tflops:.0f} TFLOP/s bf16")
        summary += f" unet_gflop={flops / 1e9:.1f} mfu={mfu:.4f}"
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
