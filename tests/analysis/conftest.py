"""A real analysis service on loopback with the tiny Qwen3-VL, on each backend, and
media makers.

``backend`` is a session-scoped parameter: every test that takes it (directly or
through ``analysis_server`` / ``stub``) runs once on transformers and once on
vLLM, and pytest groups the runs by backend, so each backend's shared server
starts once.
"""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from atelier.analysis import app
from atelier.v1 import analysis_pb2_grpc, common_pb2
from tests.kit.server_thread import ServerThread, start_app

BACKENDS = ("transformers", "vllm")

#: vLLM on CPU: a KV cache sized for the tiny model (there is no device memory to
#: take a fraction of).
VLLM_CPU = {"kv_cache_bytes": 256 * 2**20}


def start_analysis(tmp_path, model_cache, backend: str = "transformers",
                   **engine) -> ServerThread:
    if backend == "vllm":
        engine["vllm"] = {**VLLM_CPU, **engine.get("vllm", {})}
    return start_app(app, storage={"local_root": tmp_path / "store", "bucket": "atelier-test"},
                     model_cache=model_cache, section="analysis",
                     engine={"backend": backend, **engine}, ready_timeout=300)


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request) -> str:
    return request.param


#: The shared servers now running, stopped as soon as the analysis tests are done.
_SHARED: list[ServerThread] = []


@pytest.fixture(scope="session")
def analysis_server(backend, tmp_path_factory, model_cache):
    thread = start_analysis(tmp_path_factory.mktemp(f"ana-{backend}"), model_cache, backend)
    _SHARED.append(thread)
    yield thread
    _stop_shared()


def _stop_shared() -> None:
    while _SHARED:
        _SHARED.pop().stop()


def pytest_runtest_teardown(item, nextitem):
    """Session scope shares each backend's server across the analysis modules; once
    the last analysis test has run, stop it rather than leave an idle vLLM engine
    (and its processes) running through the rest of the suite."""
    here = Path(__file__).parent
    if nextitem is None or here not in Path(nextitem.path).parents:
        _stop_shared()


@pytest.fixture(scope="session")
def stub(analysis_server):
    with grpc.insecure_channel(analysis_server.target) as channel:
        yield analysis_pb2_grpc.AnalysisServiceStub(channel)


def png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def image(width: int = 96, height: int = 64, seed: int = 0) -> common_pb2.ImageInput:
    return common_pb2.ImageInput(data=png(width, height, seed))


def mp4(frames: int = 6, fps: int = 4, size: int = 64) -> bytes:
    """A real MPEG-4 file written with PyAV."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        rng = np.random.RandomState(1)
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(
                (rng.rand(size, size, 3) * 255).astype("uint8"), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()
