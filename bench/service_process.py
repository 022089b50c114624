"""Start an atelier service in its own process for a benchmark, and stop it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from atelier.dev.local_stack import free_port

T = TypeVar("T")


def start_service(name: str, env: dict[str, str], timeout: float = 600,
                  metrics_port: int | None = None):
    """Run ``python -m atelier.<name>`` with ``env`` on a free port; wait for SERVING.

    Returns (process, target). Logs are quiet, and metrics off unless
    ``metrics_port`` is given (then /metrics is served there, on loopback), so the
    service spends its time on the benchmark.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = free_port()
    metrics = {"ATELIER_METRICS__ENABLED": "false"} if metrics_port is None else {
        "ATELIER_METRICS__ENABLED": "true", "ATELIER_METRICS__HOST": "127.0.0.1",
        "ATELIER_METRICS__PORT": str(metrics_port)}
    full_env = {**os.environ, "ATELIER_GRPC__PORT": str(port),
                "ATELIER_LOGGING__LEVEL": "WARNING", **metrics, **env}
    proc = subprocess.Popen([sys.executable, "-m", f"atelier.{name}"], env=full_env)
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} service exited with {proc.returncode}")
        try:
            with grpc.insecure_channel(target) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return proc, target
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{name} service did not become ready")


def stop_service(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_clients(total: int, clients: int, call: Callable[[int], object]
                ) -> tuple[float, list[tuple[float, object]]]:
    """Send ``total`` calls from ``clients`` threads, each taking the next index when
    its previous call returns. Returns (elapsed seconds, [(latency, result)])."""
    results: list[tuple[float, object]] = []
    lock = threading.Lock()
    counter = iter(range(total))

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            start = time.perf_counter()
            result = call(i)
            with lock:
                results.append((time.perf_counter() - start, result))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, results


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """The service's /metrics as {(sample name, sorted labels): value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def interleaved(rounds: int, runs: dict[str, Callable[[], T]],
                between: Callable[[], object] | None = None) -> dict[str, list[T]]:
    """Each run once to warm up, then ``rounds`` rounds of every run in turn (A, B,
    A, B, ...), so a slow spell of a shared machine falls on both sides. Returns
    each run's figure per round."""
    for run in runs.values():
        run()
    if between is not None:
        between()
    figures: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            figures[name].append(run())
    return figures


def ratio(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    """The median of per-round ratios, and their min and max (the spread)."""
    import statistics

    per_round = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return statistics.median(per_round), min(per_round), max(per_round)


def ratio_keys(key: str, figures: tuple[float, float, float]) -> str:
    """``key=median key_spread=min-max``."""
    median, low, high = figures
    return f"{key}={median:.2f} {key}_spread={low:.2f}-{high:.2f}"
