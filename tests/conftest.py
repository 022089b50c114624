"""Fixtures shared by the whole suite: an S3 server on loopback, stores, tiny models."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from atelier.dev.local_stack import free_port
from atelier.kit.settings import StorageSettings

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[dict]:
    """An S3-compatible endpoint: a real MinIO when ATELIER_TEST_S3_ENDPOINT is set,
    else moto's server started here on loopback."""
    endpoint = os.environ.get("ATELIER_TEST_S3_ENDPOINT")
    if endpoint:
        yield {
            "endpoint": endpoint.removeprefix("http://").removeprefix("https://"),
            "access_key": os.environ["ATELIER_TEST_S3_ACCESS_KEY"],
            "secret_key": os.environ["ATELIER_TEST_S3_SECRET_KEY"],
            "secure": endpoint.startswith("https://"),
        }
        return
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield {"endpoint": f"{host}:{port}", "access_key": "testing", "secret_key": "testing",
               "secure": False}
    finally:
        server.stop()


@pytest.fixture
def minio_settings(s3_endpoint) -> StorageSettings:
    """Settings for the MinIO backend on a fresh bucket."""
    return StorageSettings(
        backend="minio",
        bucket=f"atelier-test-{uuid.uuid4().hex[:12]}",
        region="us-east-1",
        retry_backoff_s=0.01,
        **s3_endpoint,
    )


@pytest.fixture
def local_settings(tmp_path) -> StorageSettings:
    return StorageSettings(backend="local", local_root=tmp_path / "store", bucket="atelier-test")


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """The project-local model cache; tiny models are built here once and reused."""
    path = REPO_ROOT / ".cache" / "atelier" / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _tiny(name: str, model_cache: Path) -> Path:
    from atelier.tiny_models.cache import ensure_tiny_model

    return ensure_tiny_model(name, model_cache)


@pytest.fixture(scope="session")
def tiny_sd(model_cache) -> Path:
    return _tiny("stable-diffusion", model_cache)


@pytest.fixture(scope="session")
def tiny_sdxl(model_cache) -> Path:
    return _tiny("stable-diffusion-xl", model_cache)


@pytest.fixture(scope="session")
def tiny_klein_base(model_cache) -> Path:
    return _tiny("flux2-klein-base", model_cache)


@pytest.fixture(scope="session")
def tiny_klein(model_cache) -> Path:
    """The distilled variant."""
    return _tiny("flux2-klein", model_cache)


@pytest.fixture(scope="session")
def tiny_sd_inpainting(model_cache) -> Path:
    return _tiny("stable-diffusion-inpainting", model_cache)


@pytest.fixture(scope="session")
def tiny_sd_v(model_cache) -> Path:
    return _tiny("stable-diffusion-v-prediction", model_cache)


@pytest.fixture(scope="session")
def tiny_clip(model_cache) -> Path:
    return _tiny("clip", model_cache)


@pytest.fixture(scope="session")
def tiny_dino(model_cache) -> Path:
    return _tiny("dino", model_cache)


@pytest.fixture(scope="session")
def tiny_qwen(model_cache) -> Path:
    return _tiny("qwen3-vl", model_cache)


def wait_until(condition, timeout: float = 15) -> None:
    """Poll ``condition`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


@dataclass
class LocalServices:
    """The three services as separate processes, as `make up` runs them."""

    targets: dict[str, str]
    metrics_ports: dict[str, int]
    store: Path


@pytest.fixture(scope="package")
def local_services(tmp_path_factory, model_cache, tiny_sd, tiny_qwen):
    """The three services as their own processes on free loopback ports, on a local
    store under a temporary folder; one set per test package that asks for it."""
    from atelier.dev import local_stack

    root = tmp_path_factory.mktemp("services")
    services = [local_stack.LocalService(svc.name, free_port(), free_port(), svc.proto_service)
                for svc in local_stack.SERVICES]
    env = {"ATELIER_STORAGE__LOCAL_ROOT": str(root / "store"),
           "ATELIER_MODELS__CACHE_DIR": str(model_cache),
           "ATELIER_TRAINING__POLL_INTERVAL_S": "0.2",
           # Two jobs at once (a sweep runs its grid faster; each is one 1-CPU worker).
           "ATELIER_TRAINING__MAX_CONCURRENT_JOBS": "2"}
    procs = local_stack.start(services, log_level="WARNING", env=env)
    try:
        local_stack.wait_serving(services, procs, timeout=300)
        yield LocalServices({s.name: s.target for s in services},
                            {s.name: s.metrics_port for s in services}, root / "store")
    finally:
        codes = local_stack.stop(procs)
    assert all(code == 0 for code in codes.values()), f"unclean exits: {codes}"
