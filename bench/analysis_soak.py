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

The baseline, measured in the same run: the same flood against a gRPC server
that refuses every request at once and does nothing else (``--refusing-server``).
Its latency is what moving the requests' bytes costs on this machine, the floor
of any refusal; its memory growth is what receiving them costs.

Prints each figure; the last line is one key=value summary. A benchmark, not a
test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import subprocess
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


def refusing_server(port_file: str) -> None:
    """A gRPC server whose Analyze refuses every request at once (the baseline)."""
    import grpc

    async def refuse(request, context):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "refused")

    async def serve() -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * MiB)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "atelier.v1.AnalysisService", {"Analyze": grpc.unary_unary_rpc_method_handler(
                refuse, request_deserializer=bytes, response_serializer=bytes)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        Path(port_file).write_text(str(port))
        await server.wait_for_termination()

    asyncio.run(serve())


def start_refusing_server() -> tuple[subprocess.Popen, str]:
    port_file = Path(tempfile.mkdtemp(prefix="atelier-soak-")) / "port"
    proc = subprocess.Popen([sys.executable, __file__, "--refusing-server", str(port_file)])
    while not port_file.exists() or not port_file.read_text():
        if proc.poll() is not None:
            raise SystemExit("the refusing server did not start")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{port_file.read_text()}"


def flood(target: str, pid: int, total: int, clients: int, request, warm: int):
    """Send the flood; returns (elapsed, results, idle rss, peak rss, rss after). The
    idle footprint is measured after ``warm`` concurrent requests (one full batch),
    so it holds the model at its working size."""
    import grpc

    from atelier.v1 import analysis_pb2_grpc

    channel = grpc.insecure_channel(target, options=[
        ("grpc.max_send_message_length", 64 * MiB), ("grpc.max_receive_message_length", 64 * MiB)])
    stub = analysis_pb2_grpc.AnalysisServiceStub(channel)

    def call(i: int) -> str:
        try:
            stub.Analyze(request(i), timeout=120)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name

    try:
        run_clients(warm, warm, call)
        sampler = RssSampler(pid)
        time.sleep(1.0)
        idle = sampler.rss()
        with sampler:
            elapsed, results = run_clients(total, clients, call)
        time.sleep(5.0)  # the burst is over
        return elapsed, results, idle, sampler.peak, sampler.rss()
    finally:
        channel.close()


def percentile_ms(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else 0.0


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--refusing-server":
        refusing_server(sys.argv[2])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="max_batch_size")
    parser.add_argument("--queue", type=int, default=8, help="max_queue_length")
    parser.add_argument("--overload", type=int, default=6, help="clients per unit of capacity")
    parser.add_argument("--rounds", type=int, default=5, help="requests per client")
    parser.add_argument("--side", type=int, default=1024, help="image side, pixels")
    parser.add_argument("--decode-budget-mib", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    from atelier.v1 import analysis_pb2, common_pb2

    capacity = args.batch + args.queue
    clients = args.overload * capacity
    total = clients * args.rounds
    images = large_pngs(8, args.side)
    budget = args.decode_budget_mib * MiB
    print(f"capacity {capacity} (batch {args.batch} + queue {args.queue})  {clients} clients "
          f"({args.overload}x)  {total} requests of {args.side}x{args.side} PNG "
          f"(~{len(images[0]) / MiB:.1f} MiB each)  decode budget {args.decode_budget_mib} MiB")

    def request(i: int):
        return analysis_pb2.AnalyzeRequest(
            images=[common_pb2.ImageInput(data=images[i % len(images)])],
            instruction="What is it?", task=analysis_pb2.ANALYSIS_TASK_VQA,
            decoding=analysis_pb2.DecodingParams(max_new_tokens=args.max_new_tokens))

    floor_proc, floor_target = start_refusing_server()
    try:
        _, floor_results, floor_idle, floor_peak, floor_after = flood(
            floor_target, floor_proc.pid, total, clients, request, args.batch)
    finally:
        floor_proc.terminate()
        floor_proc.wait(30)
    floor = [latency for latency, _ in floor_results]

    cache = Path(tempfile.mkdtemp(prefix="atelier-soak-"))
    proc, target = start_service("analysis", {
        "ATELIER_STORAGE__LOCAL_ROOT": str(cache / "store"),
        "ATELIER_MODELS__CACHE_DIR": str(REPO / ".cache/atelier/models"),
        "ATELIER_ANALYSIS__MAX_BATCH_SIZE": str(args.batch),
        "ATELIER_ANALYSIS__MAX_QUEUE_LENGTH": str(args.queue),
        "ATELIER_ANALYSIS__MAX_DECODE_BYTES": str(budget),
    })
    try:
        elapsed, results, idle, peak, after = flood(target, proc.pid, total, clients, request,
                                                    args.batch)
    finally:
        stop_service(proc)

    outcomes: dict[str, int] = {}
    for _, outcome in results:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    lost = total - outcomes.get("OK", 0) - outcomes.get("RESOURCE_EXHAUSTED", 0)
    refused = [latency for latency, outcome in results if outcome == "RESOURCE_EXHAUSTED"]
    served = [latency for latency, outcome in results if outcome == "OK"]
    re_p99, floor_p99 = percentile_ms(refused, 0.99), percentile_ms(floor, 0.99)
    within = peak <= idle + budget
    print(f"outcomes  {outcomes} in {elapsed:.1f} s")
    print(f"lost      {lost} of {total}")
    print(f"refusals  RESOURCE_EXHAUSTED p50 {percentile_ms(refused, 0.5):.1f} ms  "
          f"p99 {re_p99:.1f} ms  ({len(refused)} refused)")
    print(f"baseline  a server refusing everything at once: p50 "
          f"{percentile_ms(floor, 0.5):.1f} ms  p99 {floor_p99:.1f} ms  (the transport floor)")
    print(f"ratio     refusal p99 / floor p99 {re_p99 / floor_p99:.2f}")
    print(f"served    OK p50 {percentile_ms(served, 0.5):.0f} ms  "
          f"p99 {percentile_ms(served, 0.99):.0f} ms  ({len(served)} served, "
          f"{len(served) / elapsed:.2f} requests/s)")
    print(f"memory    idle {idle / MiB:.0f} MiB (model loaded, one batch served)  "
          f"peak {peak / MiB:.0f} MiB  "
          f"after burst {after / MiB:.0f} MiB  idle + budget {(idle + budget) / MiB:.0f} MiB")
    print(f"baseline  refusing server: idle {floor_idle / MiB:.0f} MiB  peak "
          f"{floor_peak / MiB:.0f} MiB (+{(floor_peak - floor_idle) / MiB:.0f})  after "
          f"{floor_after / MiB:.0f} MiB: what receiving the flood costs")
    print(f"ratio     peak / (idle + budget) {peak / (idle + budget):.2f}  "
          f"after / idle {after / idle:.2f}")
    print(f"lost={lost} requests={total} refused={len(refused)} served={len(served)} "
          f"re_p50_ms={percentile_ms(refused, 0.5):.1f} re_p99_ms={re_p99:.1f} "
          f"floor_p99_ms={floor_p99:.1f} re_p99_vs_floor={re_p99 / floor_p99:.2f} "
          f"idle_rss_mib={idle / MiB:.0f} peak_rss_mib={peak / MiB:.0f} "
          f"after_rss_mib={after / MiB:.0f} budget_mib={args.decode_budget_mib} "
          f"floor_growth_mib={(floor_peak - floor_idle) / MiB:.0f} "
          f"peak_within_budget={'yes' if within else 'no'} "
          f"median_served_ms={statistics.median(served) * 1000 if served else 0:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
