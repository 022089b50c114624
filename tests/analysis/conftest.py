"""A real analysis service on loopback with the tiny Qwen3-VL, and media makers."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image

from atelier.analysis import app
from atelier.v1 import analysis_pb2_grpc, common_pb2
from tests.kit.server_thread import ServerThread, start_app


def start_analysis(tmp_path, model_cache, **engine) -> ServerThread:
    return start_app(app, storage={"local_root": tmp_path / "store", "bucket": "atelier-test"},
                     model_cache=model_cache, section="analysis", engine=engine)


@pytest.fixture(scope="module")
def analysis_server(tmp_path_factory, model_cache):
    thread = start_analysis(tmp_path_factory.mktemp("ana"), model_cache)
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
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
