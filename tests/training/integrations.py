"""What a training job talks to besides the store: a webhook receiver, a real MLflow
tracking server, and a reader of the runs W&B writes offline. All on loopback."""

from __future__ import annotations

import struct
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from atelier.dev import local_stack
from tests.conftest import free_port


@dataclass
class Receiver:
    """An HTTP endpoint on 127.0.0.1 that records every POST; it answers 503 to the
    first ``fail_first`` of them."""

    fail_first: int = 0
    posts: list[tuple[dict[str, str], bytes, int]] = field(default_factory=list)
    url: str = ""

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                status = 503 if len(receiver.posts) < receiver.fail_first else 204
                receiver.posts.append(({k.lower(): v for k, v in self.headers.items()},
                                       body, status))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/atelier"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class MlflowServer:
    """``mlflow server`` with a SQLite backend and a local artifact root."""

    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = open(root / "mlflow.log", "wb")
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT)

        try:
            local_stack.wait_http(self.uri + "/health", self.proc, timeout=120)
        except Exception:
            self.stop()
            raise AssertionError((root / "mlflow.log").read_text()[-2000:]) from None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def wandb_records(path: Path):
    """The records of a W&B run file (``run-<id>.wandb``), parsed: it is a LevelDB-style
    log (a 7-byte ``:W&B`` header, then 32 KiB blocks of records, each with a 7-byte
    header: CRC-32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, offset, pending = 32 * 1024, 7, b""
    while offset + 7 <= len(data):
        room = block - offset % block
        if room < 7:  # the block's tail is padding
            offset += room
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        if kind == 0 and length == 0:
            break
        payload = data[offset + 7:offset + 7 + length]
        offset += 7 + length
        pending += payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record
