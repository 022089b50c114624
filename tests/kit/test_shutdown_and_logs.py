"""SIGTERM drains a real server process, whose logs are JSON lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from atelier.v1 import generation_pb2, generation_pb2_grpc
from tests.conftest import REPO_ROOT


def start_probe_process(tmp_path: Path, grace_s: float = 10) -> tuple[subprocess.Popen, int]:
    """The probe service in its own process (a crash there cannot take pytest
    down); returns the process and its gRPC port once it is serving."""
    port_file = tmp_path / "ports"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.kit.probe_service", str(port_file), str(grace_s)],
        cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"},
    )
    deadline = time.monotonic() + 60
    while not port_file.exists() or not port_file.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the probe service did not start: {proc.stderr.read()}")
        time.sleep(0.05)
    return proc, int(port_file.read_text().split()[0])


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_sigterm_drains_in_flight_rpcs_then_exits_zero(tmp_path):
    proc, port = start_probe_process(tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            slow = stub.GetModel.future(
                generation_pb2.GetModelRequest(name="models/slow-1.5"),
                metadata=[("x-request-id", "drain-1")], timeout=30)
            time.sleep(0.4)
            proc.send_signal(signal.SIGTERM)
            assert slow.result().model.name == "models/slow-1.5"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = json_lines(proc.stderr.read())
    rpc = [entry for entry in lines if entry.get("request_id") == "drain-1"]
    assert rpc and rpc[0]["method"] == "/atelier.v1.GenerationService/GetModel"
    assert rpc[0]["code"] == "OK" and rpc[0]["duration_ms"] >= 1000
    messages = [entry["msg"] for entry in lines]
    assert messages.index("draining") < messages.index("service stopped")
    assert all({"ts", "level", "logger", "msg"} <= entry.keys() for entry in lines)


def test_streams_cut_off_by_shutdown_are_logged_and_the_process_exits_zero(tmp_path):
    """Response streams still writing when the grace period ends are abandoned
    by gRPC and closed later by the event loop, after the server has stopped;
    the kit's bookkeeping must not touch the dead call then (that crashed)."""
    proc, port = start_probe_process(tmp_path, grace_s=0.2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            streams = [
                stub.GenerateStream(
                    generation_pb2.GenerateStreamRequest(
                        request=generation_pb2.GenerateRequest(model="models/flood")),
                    metadata=[("x-request-id", f"flood-{i}")], timeout=60)
                for i in range(8)
            ]
            for stream in streams:
                next(stream)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = json_lines(proc.stderr.read())
    cut = [entry for entry in lines if entry.get("request_id", "").startswith("flood-")]
    assert cut and all(entry["code"] == "CANCELLED" for entry in cut)
    assert all(entry["peer"].startswith("ipv4:127.0.0.1:") for entry in cut)


def test_json_log_lines_carry_extras():
    import logging

    from atelier.kit.structured_logging import JsonFormatter

    record = logging.LogRecord("atelier.rpc", logging.INFO, __file__, 1, "rpc finished", None,
                               None)
    record.request_id = "r1"
    record.code = "OK"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["request_id"] == "r1" and entry["code"] == "OK" and entry["level"] == "INFO"
    assert Path(__file__).name not in entry.values()


def test_shutdown_ends_within_the_grace_when_a_blocking_call_hangs(tmp_path):
    """A call stuck in a thread (as on a half-open store connection) cannot hold the
    process past its grace period: it is cancelled for the client, and the process
    leaves the thread behind."""
    proc, port = start_probe_process(tmp_path, grace_s=1)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            stuck = stub.GetModel.future(generation_pb2.GetModelRequest(name="models/hang"),
                                         timeout=120)
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            # An hour-long block; the grace is 1 s, the leftover threads get 2 s more.
            assert proc.wait(30) == 0
            # Cut off at the end of the grace: a retryable code for the client.
            assert stuck.exception().code() in (grpc.StatusCode.UNAVAILABLE,
                                                 grpc.StatusCode.CANCELLED)
    finally:
        if proc.poll() is None:
            proc.kill()
    messages = [entry["msg"] for entry in json_lines(proc.stderr.read())]
    assert "service stopped" in messages
    assert "threads are still blocked in calls at exit; leaving without them" in messages
