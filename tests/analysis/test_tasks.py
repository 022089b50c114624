"""Every task end to end over gRPC with the tiny Qwen3-VL, including real video files."""

from __future__ import annotations

import json

import grpc
import pytest

from atelier.analysis.config import AnalysisEngineSettings
from atelier.analysis.media import decode_video
from atelier.v1 import analysis_pb2, common_pb2
from tests.analysis.conftest import image, mp4

A = analysis_pb2


def analyze(stub, **fields):
    fields.setdefault("decoding", A.DecodingParams(max_new_tokens=8))
    return stub.Analyze(A.AnalyzeRequest(**fields), timeout=120)


@pytest.mark.parametrize(("task", "fmt"), [
    (A.ANALYSIS_TASK_VQA, A.OUTPUT_FORMAT_TEXT),
    (A.ANALYSIS_TASK_DOCUMENT, A.OUTPUT_FORMAT_MARKDOWN),
    (A.ANALYSIS_TASK_OCR, A.OUTPUT_FORMAT_TEXT),
    (A.ANALYSIS_TASK_GENERAL, A.OUTPUT_FORMAT_TEXT),
])
def test_text_tasks(stub, task, fmt):
    reply = analyze(stub, images=[image()], instruction="what does it show?", task=task)
    assert reply.output_format == fmt
    assert reply.usage.completion_tokens > 0 and reply.usage.image_tokens == 6
    assert reply.usage.prompt_tokens > reply.usage.image_tokens
    assert reply.finish_reason in (A.FINISH_REASON_STOP, A.FINISH_REASON_LENGTH)
    assert reply.time_to_first_token_seconds > 0


def test_chart_and_document_json_parse(stub):
    for task in (A.ANALYSIS_TASK_CHART, A.ANALYSIS_TASK_DOCUMENT):
        reply = analyze(stub, images=[image(128, 128)], task=task,
                        output_format=A.OUTPUT_FORMAT_JSON)
        assert reply.output_format == A.OUTPUT_FORMAT_JSON
        json.loads(reply.text)
    chart = analyze(stub, images=[image(128, 128)], task=A.ANALYSIS_TASK_CHART)
    assert chart.output_format == A.OUTPUT_FORMAT_JSON  # the chart task's natural format
    json.loads(chart.text)


def test_ocr_with_target_language_and_multi_image(stub):
    reply = analyze(stub, images=[image(64, 64, 1), image(128, 96, 2), image(96, 160, 3)],
                    task=A.ANALYSIS_TASK_OCR, target_language="German")
    # 64x64 -> 4 merged tokens, 128x96 -> 12, 96x160 -> 15.
    assert reply.usage.image_tokens == 4 + 12 + 15


def test_encoded_video_file(stub):
    reply = analyze(stub, video=A.VideoInput(data=mp4(frames=12, fps=4), fps=2.0),
                    task=A.ANALYSIS_TASK_VIDEO, instruction="what happens?")
    assert reply.usage.image_tokens > 0 and reply.usage.completion_tokens > 0


def test_short_clip_and_frame_count_bounds():
    limits = AnalysisEngineSettings()
    # One frame: fewer than any sampling window, still a video.
    short = decode_video(mp4(frames=1), fps=2.0, max_frames=32, field="video.data",
                         limits=limits)
    assert len(short.frames) == 1 and short.timestamps == [0.0]
    # 12 frames at 4 fps is 3 s; sampled at 2 fps -> 6 frames 0.5 s apart, capped at 4.
    sampled = decode_video(mp4(frames=12, fps=4), fps=2.0, max_frames=32, field="v",
                           limits=limits)
    assert sampled.timestamps == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    capped = decode_video(mp4(frames=12, fps=4), fps=2.0, max_frames=4, field="v",
                          limits=limits)
    assert len(capped.frames) == 4


def test_short_video_file_over_grpc(stub):
    reply = analyze(stub, video=A.VideoInput(data=mp4(frames=1)), task=A.ANALYSIS_TASK_VIDEO)
    assert reply.usage.image_tokens > 0


def test_timestamped_frames(stub):
    frames = A.VideoFrames(frames=[
        A.VideoFrame(image=image(64, 64, i), timestamp_seconds=t)
        for i, t in enumerate([0.0, 0.5, 1.0])])
    reply = analyze(stub, video=A.VideoInput(frames=frames), task=A.ANALYSIS_TASK_VIDEO)
    assert reply.usage.image_tokens > 0
    bad = A.VideoFrames(frames=[A.VideoFrame(image=image(64, 64), timestamp_seconds=t)
                                for t in (1.0, 0.5)])
    with pytest.raises(grpc.RpcError) as err:
        analyze(stub, video=A.VideoInput(frames=bad), task=A.ANALYSIS_TASK_VIDEO)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_image_from_object_store_only_under_the_callers_prefix(analysis_server, stub):
    from atelier.storage import open_store
    from tests.analysis.conftest import png

    store = open_store(analysis_server.server.settings.storage)
    # Authentication is off: the caller is "anonymous", its prefix uploads/anonymous/.
    store.put_bytes("uploads/anonymous/page.png", png(64, 64, 5))
    ref = common_pb2.ImageInput(object=common_pb2.ObjectRef(key="uploads/anonymous/page.png"))
    inline = analyze(stub, images=[image(64, 64, 5)], instruction="read", task=A.ANALYSIS_TASK_VQA)
    stored = analyze(stub, images=[ref], instruction="read", task=A.ANALYSIS_TASK_VQA)
    assert stored.text == inline.text
    # Objects that exist but are not the caller's read as missing: another
    # principal's upload, a job's instance image, a model's weights.
    for key in ("uploads/anonymous/missing.png", "uploads/alice/page.png",
                "training/jobs/job-1/instance/000.img", "models/m/manifest.json"):
        store.put_bytes(key.replace("missing", "other"), png(64, 64, 5))
        with pytest.raises(grpc.RpcError) as err:
            analyze(stub, images=[common_pb2.ImageInput(
                object=common_pb2.ObjectRef(key=key))], instruction="x")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
