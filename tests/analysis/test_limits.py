"""Every configured limit, and undecodable media naming the bad item."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from atelier.analysis.backend import Sampling
from atelier.analysis.media import DecodedVideo
from atelier.analysis.vllm_backend import request_to_vllm
from atelier.v1 import analysis_pb2 as A
from atelier.v1 import analysis_pb2_grpc, common_pb2
from tests.analysis.conftest import image, mp4, start_analysis


def fields(err: grpc.RpcError) -> dict[str, str]:
    for detail in rpc_status.from_call(err).details:
        bad = error_details_pb2.BadRequest()
        if detail.Is(bad.DESCRIPTOR):
            detail.Unpack(bad)
            return {v.field: v.description for v in bad.field_violations}
    return {}


@pytest.fixture(scope="module")
def limited(backend, tmp_path_factory, model_cache):
    server = start_analysis(
        tmp_path_factory.mktemp("limits"), model_cache, backend, max_images=2,
        max_image_bytes=60_000, max_image_pixels=300 * 300, max_video_frames=3, max_new_tokens=64,
        max_input_tokens=120)
    with grpc.insecure_channel(server.target) as channel:
        yield analysis_pb2_grpc.AnalysisServiceStub(channel)
    server.stop()


def expect_invalid(stub, field: str, **request) -> str:
    request.setdefault("instruction", "what is it?")
    with pytest.raises(grpc.RpcError) as err:
        stub.Analyze(A.AnalyzeRequest(**request), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    violations = fields(err.value)
    assert field in violations, violations
    return violations[field]


def test_image_count_bytes_and_pixels(limited):
    expect_invalid(limited, "images", images=[image()] * 3)
    noisy = image(160, 160, 1)  # ~77 kB of PNG noise
    assert "bytes" in expect_invalid(limited, "images[1]", images=[image(), noisy])
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((400, 400, 3), "uint8")).save(buffer, "PNG")
    big = common_pb2.ImageInput(data=buffer.getvalue())
    assert "pixels" in expect_invalid(limited, "images[0]", images=[big])


def test_text_alone_is_a_general_question_only(limited):
    assert "GENERAL" in expect_invalid(limited, "images", images=[],
                                       task=A.ANALYSIS_TASK_DOCUMENT)
    expect_invalid(limited, "instruction", images=[], instruction="",
                   task=A.ANALYSIS_TASK_GENERAL)
    reply = limited.Analyze(A.AnalyzeRequest(instruction="hello", task=A.ANALYSIS_TASK_GENERAL,
                                             decoding=A.DecodingParams(max_new_tokens=4)),
                            timeout=120)
    assert reply.usage.image_tokens == 0 and reply.usage.completion_tokens > 0


def test_undecodable_items_are_named(limited):
    bad = common_pb2.ImageInput(data=b"\x89PNG\r\n\x1a\n broken")
    assert "decodable" in expect_invalid(limited, "images[1]", images=[image(), bad])
    assert "decodable" in expect_invalid(limited, "video.data",
                                         video=A.VideoInput(data=b"not a video at all"))
    frames = A.VideoFrames(frames=[A.VideoFrame(image=image()),
                                   A.VideoFrame(image=bad, timestamp_seconds=1.0)])
    expect_invalid(limited, "video.frames.frames[1].image", video=A.VideoInput(frames=frames))


def test_video_frames_and_tokens(limited):
    frames = A.VideoFrames(frames=[A.VideoFrame(image=image(), timestamp_seconds=t)
                                   for t in range(4)])
    expect_invalid(limited, "video.frames.frames", video=A.VideoInput(frames=frames))
    expect_invalid(limited, "video.max_frames",
                   video=A.VideoInput(data=mp4(frames=4), max_frames=10))
    expect_invalid(limited, "decoding.max_new_tokens", images=[image()],
                   decoding=A.DecodingParams(max_new_tokens=65))
    # 2 images of 256x256 px -> 2 x 64 image tokens: beyond the 120-token prompt limit.
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), "white").save(buffer, "PNG")
    flat = common_pb2.ImageInput(data=buffer.getvalue())
    description = expect_invalid(limited, "request", images=[flat, flat])
    assert "tokens" in description


def test_decoding_ranges(limited):
    for field, params in (("decoding.temperature", A.DecodingParams(temperature=3)),
                          ("decoding.top_p", A.DecodingParams(temperature=1, top_p=0)),
                          ("decoding.top_k", A.DecodingParams(top_k=5000)),
                          ("decoding.repetition_penalty",
                           A.DecodingParams(repetition_penalty=0.5))):
        expect_invalid(limited, field, images=[image()], decoding=params)
    expect_invalid(limited, "instruction", images=[image()], task=A.ANALYSIS_TASK_VQA,
                   instruction="")


def test_vllm_request_mapping():
    img = Image.new("RGB", (32, 32))
    video = DecodedVideo(np.zeros((3, 32, 32, 3), "uint8"), [0.0, 0.5, 1.0])
    mapped = request_to_vllm(
        prompt="<|im_start|>user ...", images=[img, img], video=video,
        sampling=Sampling(temperature=0.7, top_p=0.9, top_k=0, repetition_penalty=1.1, seed=3),
        max_new_tokens=77, grammar='root ::= "{}"', closing_tokens=16)
    assert mapped.prompt["prompt"].startswith("<|im_start|>")
    assert mapped.prompt["multi_modal_data"]["image"] == [img, img]
    frames, meta = mapped.prompt["multi_modal_data"]["video"]
    # Timestamps travel as frame indices at 1 kHz, as the transformers backend passes them.
    assert frames.shape == (3, 32, 32, 3) and meta["fps"] == 1000.0
    assert meta["frames_indices"] == [0, 500, 1000] and meta["do_sample_frames"] is False
    assert mapped.sampling == {"max_tokens": 77 + 16, "temperature": 0.7, "top_p": 0.9,
                               "top_k": -1, "repetition_penalty": 1.1, "seed": 3,
                               "structured_outputs": {"grammar": 'root ::= "{}"'},
                               "extra_args": {"atelier_close_after": 77}}
    greedy = request_to_vllm(prompt="p", images=[img], sampling=Sampling(), max_new_tokens=5)
    assert greedy.prompt["multi_modal_data"] == {"image": img}
    assert greedy.sampling["temperature"] == 0.0 and "seed" not in greedy.sampling
    assert greedy.sampling["max_tokens"] == 5 and "extra_args" not in greedy.sampling
    text_only = request_to_vllm(prompt="p", images=[], sampling=Sampling(), max_new_tokens=5)
    assert "multi_modal_data" not in text_only.prompt
    assert "structured_outputs" not in text_only.sampling
