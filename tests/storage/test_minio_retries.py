"""The MinIO backend retries transient failures: connections cut by a real TCP proxy."""

from __future__ import annotations

import socket
import threading

import grpc
import pytest

from atelier.storage import StorageError, open_store


class FlakyProxy:
    """Forwards loopback TCP to the S3 server; cuts the next ``failures`` requests, and
    while ``down`` is set refuses every connection (an outage)."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.failures = 0
        self.down = False
        self.cut = 0
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _take_failure(self) -> bool:
        if self.down:
            return True
        with self.lock:
            if self.failures > 0:
                self.failures -= 1
                self.cut += 1
                return True
            return False

    def _serve(self, client: socket.socket) -> None:
        if self.down:
            client.close()
            return
        upstream = socket.create_connection(self.upstream)

        def pump_back() -> None:
            try:
                while data := upstream.recv(65536):
                    client.sendall(data)
            except OSError:
                pass
            finally:
                client.close()

        threading.Thread(target=pump_back, daemon=True).start()
        try:
            while data := client.recv(65536):
                if self._take_failure():
                    break  # drop the connection mid-request
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def proxy(minio_settings):
    proxy = FlakyProxy(minio_settings.endpoint)
    yield proxy
    proxy.close()


def test_transient_failures_are_retried(minio_settings, proxy):
    store = open_store(minio_settings.model_copy(update={"endpoint": proxy.address}))
    proxy.failures = 2
    store.put_bytes("retry/a.txt", b"survives two cut connections")
    assert proxy.cut == 2
    proxy.failures = 2
    assert store.get_bytes("retry/a.txt") == b"survives two cut connections"
    assert proxy.cut == 4


def test_persistent_failure_becomes_unavailable(minio_settings, proxy):
    store = open_store(minio_settings.model_copy(update={"endpoint": proxy.address,
                                                         "max_retries": 2}))
    proxy.failures = 100
    with pytest.raises(StorageError) as err:
        store.put_bytes("retry/b.txt", b"x")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert proxy.cut == 3  # the first try plus two retries
