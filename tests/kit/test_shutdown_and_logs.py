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


def test_sigterm_drains_in_flight_rpcs_then_exits_zero(tmp_path):
    port_file = tmp_path / "ports"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.kit.probe_service", str(port_file)],
        cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
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
    lines = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
    rpc = [entry for entry in lines if entry.get("request_id") == "drain-1"]
    assert rpc and rpc[0]["method"] == "/atelier.v1.GenerationService/GetModel"
    assert rpc[0]["code"] == "OK" and rpc[0]["duration_ms"] >= 1000
    messages = [entry["msg"] for entry in lines]
    assert messages.index("draining") < messages.index("service stopped")
    assert all({"ts", "level", "logger", "msg"} <= entry.keys() for entry in lines)


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
