"""Start an atelier service in its own process for a benchmark, and stop it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(name: str, env: dict[str, str], timeout: float = 600):
    """Run ``python -m atelier.<name>`` with ``env`` on a free port; wait for SERVING.

    Returns (process, target). Metrics are off and logs quiet, so the service
    spends its time on the benchmark.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = free_port()
    full_env = {**os.environ, "ATELIER_GRPC__PORT": str(port),
                "ATELIER_METRICS__ENABLED": "false", "ATELIER_LOGGING__LEVEL": "WARNING",
                **env}
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
