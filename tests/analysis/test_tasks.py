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


def test_grounding_boxes_convert_to_original_pixels_on_non_square_images():
    from atelier.analysis.grounding import (
        RELATIVE_1000,
        RESIZED_PIXELS,
        ImageGeometry,
        answer,
        to_original_pixels,
    )

    # 1280x720 sent; the processor resized it to 640x352 (multiples of 32).
    wide = ImageGeometry(width=1280, height=720, resized_width=640, resized_height=352)
    # Qwen3-VL: 0..1000 in both axes, whatever the aspect ratio.
    assert to_original_pixels([250, 500, 750, 1000], RELATIVE_1000, wide) == \
        {"x_min": 320, "y_min": 360, "x_max": 960, "y_max": 720}
    # Qwen2.5-VL: pixels of the resized image; each axis scales on its own.
    assert to_original_pixels([320, 176, 640, 352], RESIZED_PIXELS, wide) == \
        {"x_min": 640, "y_min": 360, "x_max": 1280, "y_max": 720}
    # Corners out of order and out of range are ordered and clamped to the image.
    tall = ImageGeometry(width=300, height=900, resized_width=288, resized_height=896)
    assert to_original_pixels([900, 1200, 100, -5], RELATIVE_1000, tall) == \
        {"x_min": 30, "y_min": 0, "x_max": 270, "y_max": 900}
    # Entries that are not a labelled four-number box are left out.
    parsed = [{"bbox_2d": [0, 0, 1000, 1000], "label": "dog"}, {"bbox_2d": [1, 2]},
              {"label": "cat"}, "junk"]
    assert answer(parsed, RELATIVE_1000, tall) == {"objects": [
        {"label": "dog", "box": {"x_min": 0, "y_min": 0, "x_max": 300, "y_max": 900}}]}


@pytest.mark.parametrize(("width", "height"), [(200, 96), (80, 240)])
def test_grounding_over_grpc_lands_inside_the_image(stub, width, height):
    from jsonschema import validate

    from atelier.analysis.grounding import ANSWER_SCHEMA

    located = []
    for seed in range(3):
        reply = stub.Analyze(A.AnalyzeRequest(
            images=[image(width, height, seed)], instruction="the dog and the ball",
            task=A.ANALYSIS_TASK_GROUNDING, decoding=A.DecodingParams(max_new_tokens=48)),
            timeout=120)
        assert reply.output_format == A.OUTPUT_FORMAT_JSON
        value = json.loads(reply.text)
        validate(value, ANSWER_SCHEMA)
        located += value["objects"]
    assert located, "the tiny model located nothing in three tries"
    for item in located:
        box = item["box"]
        assert 0 <= box["x_min"] <= box["x_max"] <= width
        assert 0 <= box["y_min"] <= box["y_max"] <= height


def test_grounding_request_checks(stub):
    for fields, field in [
        (dict(images=[image(), image()]), "images"),
        (dict(images=[image()], json_schema='{"type": "object"}'), "json_schema"),
        (dict(images=[image()], output_format=A.OUTPUT_FORMAT_TEXT), "output_format"),
        (dict(images=[image()], instruction=""), "instruction"),
    ]:
        request = {"instruction": "the dog", "task": A.ANALYSIS_TASK_GROUNDING, **fields}
        with pytest.raises(grpc.RpcError) as err:
            stub.Analyze(A.AnalyzeRequest(**request), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in err.value.details(), (field, err.value.details())
