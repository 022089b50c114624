"""make bench-analysis: the analysis service on both backends, against baselines
measured in the same run.

Three comparisons, each printed with its figures and ratio:

1. ``ratio``: the tiny Qwen3-VL; 64 requests, each one image (64 to 256 px a
   side) and a question, at most 32 new tokens, greedy. The service on the
   transformers backend, 16 concurrent gRPC clients, against ``model.generate``
   called once per request, in-process, one after another.
2. ``vllm_vs_offline``: the same requests through the service on the vLLM
   backend against vLLM's offline ``LLM.generate`` given all of them at once, on
   the same engine settings: what gRPC, preprocessing and atelier add.
3. ``vllm_vs_transformers_mixed``: a bench-size Qwen3-VL (text hidden 512, 4
   layers); 96 requests with max_new_tokens drawn from 8, 32, 128 and 256 (fixed
   seed), 16 concurrent clients, tokens actually generated per second: the
   service on vLLM (continuous batching) against the service on transformers
   (static batches that last as long as their longest answer).

Each comparison runs in interleaved rounds (A, B, A, B, ..., after a warm-up of
each; ``--rounds``, default 3), both sides running at once but taking turns; a
ratio (of tokens per second) is the median of the per-round ratios, printed with
its spread (``<key>_spread=min-max``), and each side's figures are those of its
median round. p50 time to first token and p95 latency are printed for every
service run; the last line is a single key=value summary. ``--gpu`` runs 2 and 3 on CUDA with
Qwen3-VL-2B's text geometry and random weights. A benchmark, not a test:
nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from service_process import (
    interleaved,
    ratio,
    ratio_keys,
    run_clients,
    start_service,
    stop_service,
)

REPO = Path(__file__).resolve().parent.parent
#: vLLM's KV cache on CPU, bytes (the same for the service and offline).
KV_CACHE_BYTES = 512 * 2**20
QUESTION = "What is shown in this picture, and what colours does it have?"


def make_images(count: int) -> list[bytes]:
    rng = np.random.RandomState(0)
    out = []
    for _ in range(count):
        width, height = int(rng.randint(64, 257)), int(rng.randint(64, 257))
        pixels = (rng.rand(height, width, 3) * 255).astype("uint8")
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def baseline(model_path: str, images: list[bytes], max_new_tokens: int):
    """A run of ``model.generate`` once per request, one after another, in this process."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path)
    model = AutoModelForImageTextToText.from_pretrained(model_path).eval()
    messages = [{"role": "user", "content": [{"type": "image"},
                                              {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)

    def one(data: bytes) -> int:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        inputs = processor(text=[prompt], images=[image], return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return int(out.shape[1] - inputs["input_ids"].shape[1])

    def run() -> dict:
        start = time.perf_counter()
        tokens = sum(one(data) for data in images)
        elapsed = time.perf_counter() - start
        return {"rps": len(images) / elapsed, "tps": tokens / elapsed, "tokens": tokens}

    return run


def request_for(data: bytes, max_new_tokens: int):
    from atelier.v1 import analysis_pb2, common_pb2

    return analysis_pb2.AnalyzeRequest(
        images=[common_pb2.ImageInput(data=data)], instruction=QUESTION,
        task=analysis_pb2.ANALYSIS_TASK_VQA,
        decoding=analysis_pb2.DecodingParams(max_new_tokens=max_new_tokens))


def run_service(target: str, images: list[bytes], clients: int, budgets: list[int]):
    import grpc

    from atelier.v1 import analysis_pb2_grpc

    channel = grpc.insecure_channel(target)
    stub = analysis_pb2_grpc.AnalysisServiceStub(channel)
    elapsed, results = run_clients(
        len(images), clients,
        lambda i: stub.Analyze(request_for(images[i], budgets[i]), timeout=600))
    channel.close()
    latencies = [latency for latency, _ in results]
    ttfts = [reply.time_to_first_token_seconds for _, reply in results]
    tokens = sum(reply.usage.completion_tokens for _, reply in results)
    return {"rps": len(images) / elapsed, "tps": tokens / elapsed, "tokens": tokens,
            "p50_ttft": statistics.median(ttfts),
            "p95": statistics.quantiles(latencies, n=20)[18]}


def service_env(model: str, backend: str, clients: int, queue: int, gpu: bool) -> dict:
    env = {
        "ATELIER_STORAGE__LOCAL_ROOT": str(Path(tempfile.mkdtemp(prefix="atelier-bench-"))),
        "ATELIER_MODELS__CACHE_DIR": str(REPO / ".cache/atelier/models"),
        "ATELIER_ANALYSIS__MODEL": model,
        "ATELIER_ANALYSIS__BACKEND": backend,
        "ATELIER_ANALYSIS__MAX_BATCH_SIZE": str(clients),
        "ATELIER_ANALYSIS__MAX_QUEUE_LENGTH": str(queue),
        "ATELIER_ANALYSIS__MAX_NEW_TOKENS": "4096",
    }
    if backend == "vllm" and not gpu:
        env["ATELIER_ANALYSIS__VLLM__KV_CACHE_BYTES"] = str(KV_CACHE_BYTES)
    if gpu:
        env["ATELIER_ANALYSIS__DEVICE"] = "cuda"
    return env


class Service:
    """An analysis service process; ``run()`` is one round of the requests."""

    def __init__(self, model: str, backend: str, images, budgets, clients: int,
                 gpu: bool) -> None:
        self.proc, self.target = start_service("analysis", service_env(
            model, backend, clients, len(images) * 2, gpu))
        self.images, self.budgets, self.clients = images, budgets, clients

    def run(self) -> dict:
        return run_service(self.target, self.images, self.clients, self.budgets)

    def stop(self) -> None:
        stop_service(self.proc)


def offline(model_path: str, images: list[bytes], budgets: list[int], gpu: bool,
            clients: int):
    """vLLM's offline LLM.generate over the requests, with the engine settings the
    service uses and the prompts it builds: a run gives it all requests at once;
    ``grouped`` in consecutive groups of ``clients`` (the service never has more in
    flight), for reference. Returns (run, grouped, shutdown)."""
    from transformers import AutoProcessor
    from vllm import LLM, SamplingParams

    from atelier.analysis.config import AnalysisEngineSettings
    from atelier.analysis.vllm_compat import allow_unexpanded_video_placeholders
    from atelier.analysis.vllm_settings import engine_kwargs

    allow_unexpanded_video_placeholders()
    config = AnalysisEngineSettings(
        backend="vllm", vllm={} if gpu else {"kv_cache_bytes": KV_CACHE_BYTES})
    llm = LLM(**engine_kwargs(config, model_path, "cuda" if gpu else "cpu",
                              "bfloat16" if gpu else "float32"))
    processor = AutoProcessor.from_pretrained(model_path)
    messages = [{"role": "user", "content": [{"type": "image"},
                                              {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    decoded = [Image.open(io.BytesIO(d)).convert("RGB") for d in images]
    prompts = [{"prompt": prompt, "multi_modal_data": {"image": img}} for img in decoded]
    params = [SamplingParams(max_tokens=b, temperature=0.0) for b in budgets]

    def run() -> dict:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        return {"rps": len(images) / elapsed, "tps": tokens / elapsed, "tokens": tokens}

    def grouped() -> dict:
        start = time.perf_counter()
        tokens = sum(len(o.outputs[0].token_ids)
                     for i in range(0, len(prompts), clients)
                     for o in llm.generate(prompts[i:i + clients], params[i:i + clients],
                                           use_tqdm=False))
        elapsed = time.perf_counter() - start
        return {"rps": len(images) / elapsed, "tps": tokens / elapsed, "tokens": tokens}

    return run, grouped, llm.llm_engine.engine_core.shutdown


def median_of(results: list[dict]) -> dict:
    """The round whose tokens per second is the median (its figures, as one run)."""
    ordered = sorted(results, key=lambda r: r["tps"])
    return ordered[len(ordered) // 2]


def show(label: str, result: dict) -> None:
    line = f"{label:<46}{result['rps']:8.2f} requests/s {result['tps']:9.1f} tokens/s"
    if "p50_ttft" in result:
        line += f"   p50 ttft {result['p50_ttft']:.3f} s  p95 {result['p95']:.3f} s"
    print(line, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--mixed-requests", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3,
                        help="measured rounds of each comparison, after a warm-up")
    parser.add_argument("--gpu", action="store_true",
                        help="vLLM comparisons on CUDA with Qwen3-VL-2B-size random weights")
    args = parser.parse_args()

    from atelier.tiny_models import QWEN3_VL_2B_RANDOM, TINY_QWEN3_VL, TINY_QWEN3_VL_BENCH
    from atelier.tiny_models.cache import ensure_tiny_model

    cache = REPO / ".cache/atelier/models"
    tiny = str(ensure_tiny_model(TINY_QWEN3_VL, cache))
    large_name = QWEN3_VL_2B_RANDOM if args.gpu else TINY_QWEN3_VL_BENCH
    large = str(ensure_tiny_model(large_name, cache))
    images = make_images(args.requests)
    budgets = [args.max_new_tokens] * len(images)
    rng = np.random.RandomState(7)
    mixed_images = make_images(args.mixed_requests)
    mixed_budgets = [int(b) for b in rng.choice([8, 32, 128, 256], args.mixed_requests)]
    print(f"1-2: model {tiny}  {args.requests} requests  {args.clients} clients  "
          f"max {args.max_new_tokens} new tokens, greedy", flush=True)
    print(f"3:   model {large}  {args.mixed_requests} requests  {args.clients} clients  "
          f"max_new_tokens from 8/32/128/256 (sum {sum(mixed_budgets)}), greedy", flush=True)

    figures: dict[str, dict] = {}
    summary: dict[str, tuple[float, float, float]] = {}

    def versus(key: str, goal: str, label: str, ours: str, theirs: str,
               rounds: dict[str, list[dict]], by: str = "tps") -> None:
        figures[ours], figures[theirs] = median_of(rounds[ours]), median_of(rounds[theirs])
        summary[key] = ratio([r[by] for r in rounds[ours]], [r[by] for r in rounds[theirs]])
        median, low, high = summary[key]
        print(f"{key:<27}{label:<33}{median:6.2f}x ({low:.2f}-{high:.2f}, {args.rounds} "
              f"rounds){goal}", flush=True)

    if not args.gpu:  # 1: the transformers service against generate per request
        service = Service(f"tiny://{TINY_QWEN3_VL}", "transformers", images, budgets,
                          args.clients, False)
        try:
            rounds = interleaved(args.rounds, {
                "baseline": baseline(tiny, images, args.max_new_tokens),
                "service": service.run})
        finally:
            service.stop()
        versus("ratio", "", "service / generate per request", "service", "baseline", rounds,
               by="rps")
        show("1 baseline  generate per request", figures["baseline"])
        show(f"1 service   transformers, {args.clients} clients", figures["service"])
    # 2 runs on the tiny model on CPU, on the 2B-size one on a GPU.
    overhead_name, overhead_path = (large_name, large) if args.gpu else (TINY_QWEN3_VL, tiny)
    service = Service(f"tiny://{overhead_name}", "vllm", images, budgets, args.clients,
                      args.gpu)
    run, grouped, shutdown = offline(overhead_path, images, budgets, args.gpu, args.clients)
    try:
        rounds = interleaved(args.rounds, {"vllm_service": service.run, "offline": run})
        in_groups = grouped()
    finally:
        service.stop()
        shutdown()
    versus("vllm_vs_offline", "  (goal >= 0.85)", "service on vLLM / offline vLLM",
           "vllm_service", "offline", rounds)
    show(f"2 service   vLLM, {args.clients} clients", figures["vllm_service"])
    show("2 offline   vLLM LLM.generate, all at once", figures["offline"])
    show(f"  reference: offline in groups of {args.clients}", in_groups)
    services = {backend: Service(f"tiny://{large_name}", backend, mixed_images, mixed_budgets,
                                 args.clients, args.gpu)
                for backend in ("vllm", "transformers")}
    try:
        rounds = interleaved(args.rounds, {f"mixed_{b}": s.run for b, s in services.items()})
    finally:
        for service in services.values():
            service.stop()
    versus("vllm_vs_transformers_mixed", "  (goal >= 1.5)", "vLLM / transformers, mixed",
           "mixed_vllm", "mixed_transformers", rounds)
    show("3 service   vLLM, mixed lengths", figures["mixed_vllm"])
    show("3 service   transformers, mixed lengths", figures["mixed_transformers"])

    parts = []
    for key, result in figures.items():
        parts.append(f"{key}_tps={result['tps']:.1f}")
        if "p50_ttft" in result:
            parts.append(f"{key}_p50_ttft_s={result['p50_ttft']:.3f}")
            parts.append(f"{key}_p95_latency_s={result['p95']:.3f}")
    parts += [ratio_keys(key, value) for key, value in summary.items()]
    print(" ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
