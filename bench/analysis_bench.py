"""make bench-analysis: the analysis service against per-request transformers generate.

The tiny Qwen3-VL; 64 requests, each one image (64 to 256 px a side) and a
question, at most 32 new tokens, greedy.
- service: 16 concurrent gRPC clients against the analysis service in its own
  process (requests are batched into shared generate calls);
- baseline: ``model.generate`` called once per request, in-process, one after
  another, on the same model.

Prints requests/s and tokens/s for both, the ratio, p50 time to first token
and p95 latency; the last line is a single key=value summary. A benchmark, not
a test: nothing here asserts a time.
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
from service_process import run_clients, start_service, stop_service

REPO = Path(__file__).resolve().parent.parent
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


def run_baseline(model_path: str, images: list[bytes], max_new_tokens: int):
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

    one(images[0])  # warm-up
    start = time.perf_counter()
    tokens = sum(one(data) for data in images)
    elapsed = time.perf_counter() - start
    return len(images) / elapsed, tokens / elapsed


def run_service(target: str, images: list[bytes], clients: int, max_new_tokens: int):
    import grpc

    from atelier.v1 import analysis_pb2, analysis_pb2_grpc, common_pb2

    channel = grpc.insecure_channel(target)
    stub = analysis_pb2_grpc.AnalysisServiceStub(channel)

    def request(data: bytes):
        return analysis_pb2.AnalyzeRequest(
            images=[common_pb2.ImageInput(data=data)], instruction=QUESTION,
            task=analysis_pb2.ANALYSIS_TASK_VQA,
            decoding=analysis_pb2.DecodingParams(max_new_tokens=max_new_tokens))

    stub.Analyze(request(images[0]), timeout=300)  # warm-up
    elapsed, results = run_clients(
        len(images), clients, lambda i: stub.Analyze(request(images[i]), timeout=300))
    channel.close()
    latencies = [latency for latency, _ in results]
    ttfts = [reply.time_to_first_token_seconds for _, reply in results]
    tokens = sum(reply.usage.completion_tokens for _, reply in results)
    return len(images) / elapsed, tokens / elapsed, latencies, ttfts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    from atelier.tiny_models.cache import ensure_tiny_model

    model_path = str(ensure_tiny_model("qwen3-vl", REPO / ".cache/atelier/models"))
    images = make_images(args.requests)
    print(f"model {model_path}  {args.requests} requests  {args.clients} clients  "
          f"max {args.max_new_tokens} new tokens, greedy")

    base_rps, base_tps = run_baseline(model_path, images, args.max_new_tokens)
    cache = Path(tempfile.mkdtemp(prefix="atelier-bench-"))
    proc, target = start_service("analysis", {
        "ATELIER_STORAGE__LOCAL_ROOT": str(cache / "store"),
        "ATELIER_MODELS__CACHE_DIR": str(REPO / ".cache/atelier/models"),
        "ATELIER_ANALYSIS__MAX_BATCH_SIZE": str(args.clients),
        "ATELIER_ANALYSIS__MAX_QUEUE_LENGTH": str(args.requests * 2),
    })
    try:
        rps, tps, latencies, ttfts = run_service(target, images, args.clients,
                                                 args.max_new_tokens)
    finally:
        stop_service(proc)
    p50_ttft = statistics.median(ttfts)
    p95 = statistics.quantiles(latencies, n=20)[18]
    print(f"baseline  transformers generate per request   {base_rps:8.2f} requests/s "
          f"{base_tps:9.1f} tokens/s")
    print(f"service   {args.clients} concurrent gRPC clients       {rps:8.2f} requests/s "
          f"{tps:9.1f} tokens/s")
    print(f"ratio     service / baseline                {rps / base_rps:8.2f}x")
    print(f"latency   p50 time to first token {p50_ttft:.3f} s   p95 latency {p95:.3f} s")
    print(f"service_rps={rps:.3f} service_tps={tps:.1f} baseline_rps={base_rps:.3f} "
          f"baseline_tps={base_tps:.1f} ratio={rps / base_rps:.2f} p50_ttft_s={p50_ttft:.3f} "
          f"p95_latency_s={p95:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
