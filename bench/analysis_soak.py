"""make soak: flood the analysis service at 6x its capacity with large images.

The analysis service runs in its own process (tiny Qwen3-VL, transformers
backend) with a small batch and queue, so its capacity (batch + queue) is
known: ``--batch 4 --queue 8`` is 12 requests. ``6 x 12 = 72`` client threads
then send requests back to back, each a 1024x1024 PNG of noise (about 3 MB,
16 MiB estimated to decode) and a question, for ``--rounds`` requests each.

Every request must end OK or RESOURCE_EXHAUSTED (with a retry hint); anything
else (a deadline, INTERNAL, a dropped connection) is *lost*. Refusals must be
quick: admission happens before any decode. The service's resident memory is
sampled every 20 ms: its peak should stay within the idle footprint (model
loaded, one request served) plus the decode budget, and it should come back
down once the burst is over.

Prints each figure; the last line is one key=value summary. The baseline of
the run is the idle footprint measured before the burst. A benchmark, not a
test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image
from service_process import run_clients, start_service, stop_service

REPO = Path(__file__).resolve().parent.parent
MiB = 2**20


def large_pngs(count: int, side: int) -> list[bytes]:
    rng = np.random.RandomState(0)
    out = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray((rng.rand(side, side, 3) * 255).astype("uint8")).save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


class RssSampler:
    """Samples a process's resident set size in a thread."""

    def __init__(self, pid: int, every_s: float = 0.02) -> None:
        self.process = psutil.Process(pid)
        self.every_s = every_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        return self.process.memory_info().rss

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="max_batch_size")
    parser.add_argument("--queue", type=int, default=8, help="max_queue_length")
    parser.add_argument("--overload", type=int, default=6, help="clients per unit of capacity")
    parser.add_argument("--rounds", type=int, default=5, help="requests per client")
    parser.add_argument("--side", type=int, default=1024, help="image side, pixels")
    parser.add_argument("--decode-budget-mib", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    import grpc

    from atelier.v1 import analysis_pb2, analysis_pb2_grpc, common_pb2

    capacity = args.batch + args.queue
    clients = args.overload * capacity
    total = clients * args.rounds
    images = large_pngs(8, args.side)
    print(f"capacity {capacity} (batch {args.batch} + queue {args.queue})  {clients} clients "
          f"({args.overload}x)  {total} requests of {args.side}x{args.side} PNG "
          f"(~{len(images[0]) / MiB:.1f} MiB each)  decode budget {args.decode_budget_mib} MiB")
    cache = Path(tempfile.mkdtemp(prefix="atelier-soak-"))
    proc, target = start_service("analysis", {
        "ATELIER_STORAGE__LOCAL_ROOT": str(cache / "store"),
        "ATELIER_MODELS__CACHE_DIR": str(REPO / ".cache/atelier/models"),
        "ATELIER_ANALYSIS__MAX_BATCH_SIZE": str(args.batch),
        "ATELIER_ANALYSIS__MAX_QUEUE_LENGTH": str(args.queue),
        "ATELIER_ANALYSIS__MAX_DECODE_BYTES": str(args.decode_budget_mib * MiB),
    })
    channel = grpc.insecure_channel(target, options=[
        ("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)])
    stub = analysis_pb2_grpc.AnalysisServiceStub(channel)

    def request(i: int):
        return analysis_pb2.AnalyzeRequest(
            images=[common_pb2.ImageInput(data=images[i % len(images)])], instruction="What is it?",
            task=analysis_pb2.ANALYSIS_TASK_VQA,
            decoding=analysis_pb2.DecodingParams(max_new_tokens=args.max_new_tokens))

    def call(i: int) -> str:
        try:
            stub.Analyze(request(i), timeout=120)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name

    try:
        stub.Analyze(request(0), timeout=300)  # warm-up: the idle footprint includes a request
        sampler = RssSampler(proc.pid)
        time.sleep(1.0)
        idle = sampler.rss()
        with sampler:
            elapsed, results = run_clients(total, clients, call)
        time.sleep(5.0)  # the burst is over
        after = sampler.rss()
    finally:
        channel.close()
        stop_service(proc)

    outcomes: dict[str, int] = {}
    for _, outcome in results:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    lost = total - outcomes.get("OK", 0) - outcomes.get("RESOURCE_EXHAUSTED", 0)
    refused = sorted(latency for latency, outcome in results if outcome == "RESOURCE_EXHAUSTED")
    served = sorted(latency for latency, outcome in results if outcome == "OK")

    def pct(values, q):
        return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else 0.0

    budget = args.decode_budget_mib * MiB
    print(f"outcomes  {outcomes} in {elapsed:.1f} s")
    print(f"lost      {lost} of {total}")
    print(f"refusals  RESOURCE_EXHAUSTED p50 {pct(refused, 0.5):.1f} ms  "
          f"p99 {pct(refused, 0.99):.1f} ms  ({len(refused)} refused)")
    print(f"served    OK p50 {pct(served, 0.5):.0f} ms  p99 {pct(served, 0.99):.0f} ms  "
          f"({len(served)} served, {len(served) / elapsed:.2f} requests/s)")
    print(f"memory    idle {idle / MiB:.0f} MiB (baseline: model loaded)  "
          f"peak {sampler.peak / MiB:.0f} MiB  after burst {after / MiB:.0f} MiB  "
          f"idle + budget {(idle + budget) / MiB:.0f} MiB")
    within = sampler.peak <= idle + budget
    print(f"ratio     peak / (idle + budget) {sampler.peak / (idle + budget):.2f}  "
          f"after / idle {after / idle:.2f}")
    print(f"lost={lost} requests={total} refused={len(refused)} served={len(served)} "
          f"re_p50_ms={pct(refused, 0.5):.1f} re_p99_ms={pct(refused, 0.99):.1f} "
          f"idle_rss_mib={idle / MiB:.0f} peak_rss_mib={sampler.peak / MiB:.0f} "
          f"after_rss_mib={after / MiB:.0f} budget_mib={args.decode_budget_mib} "
          f"peak_within_budget={'yes' if within else 'no'} "
          f"median_served_ms={statistics.median(served) * 1000 if served else 0:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
