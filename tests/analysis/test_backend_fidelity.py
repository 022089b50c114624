"""The vLLM backend answers exactly as the transformers backend does: on the tiny
model in fp32, greedy tokens are equal for every task, alone and batched with
mixed image sizes and budgets (vLLM's continuous batching, atelier's static one)."""

from __future__ import annotations

import grpc
import pytest

from atelier.v1 import analysis_pb2 as A
from atelier.v1 import analysis_pb2_grpc
from tests.analysis.conftest import image, mp4, start_analysis


def _requests() -> list[A.AnalyzeRequest]:
    d = A.DecodingParams
    video = A.VideoInput(data=mp4(frames=12, fps=4), fps=2.0)
    frames = A.VideoInput(frames=A.VideoFrames(frames=[
        A.VideoFrame(image=image(64, 48, i), timestamp_seconds=0.5 * i) for i in range(4)]))
    return [
        A.AnalyzeRequest(images=[image(96, 64, 0)], instruction="what is it?",
                         task=A.ANALYSIS_TASK_VQA, decoding=d(max_new_tokens=24)),
        A.AnalyzeRequest(images=[image(160, 96, 1)], task=A.ANALYSIS_TASK_DOCUMENT,
                         decoding=d(max_new_tokens=16)),
        A.AnalyzeRequest(images=[image(128, 128, 2)], task=A.ANALYSIS_TASK_CHART,
                         decoding=d(max_new_tokens=20)),
        A.AnalyzeRequest(images=[image(64, 64, 3), image(96, 160, 4)], task=A.ANALYSIS_TASK_OCR,
                         target_language="German", decoding=d(max_new_tokens=12)),
        A.AnalyzeRequest(images=[image(200, 64, 5)], instruction="a poem",
                         task=A.ANALYSIS_TASK_GENERAL, decoding=d(max_new_tokens=40)),
        A.AnalyzeRequest(instruction="say hello", task=A.ANALYSIS_TASK_GENERAL,
                         decoding=d(max_new_tokens=10)),  # text alone
        A.AnalyzeRequest(video=video, instruction="what happens?", task=A.ANALYSIS_TASK_VIDEO,
                         decoding=d(max_new_tokens=16)),
        A.AnalyzeRequest(video=frames, task=A.ANALYSIS_TASK_VIDEO, decoding=d(max_new_tokens=8)),
        A.AnalyzeRequest(images=[image(240, 120, 6)], instruction="the dog",
                         task=A.ANALYSIS_TASK_GROUNDING, decoding=d(max_new_tokens=48)),
        A.AnalyzeRequest(images=[image(96, 96, 7)], instruction="describe",
                         output_format=A.OUTPUT_FORMAT_JSON,
                         json_schema='{"type":"object","properties":{"kind":{"enum":["bar","pie"]},'
                                     '"n":{"type":"integer"}},"required":["kind","n"]}',
                         decoding=d(max_new_tokens=6)),
    ]


def _answer(reply: A.AnalyzeResponse) -> tuple:
    u = reply.usage
    return (reply.text, reply.finish_reason, u.prompt_tokens, u.image_tokens,
            u.completion_tokens)


def test_vllm_greedy_tokens_equal_transformers(backend, stub, tmp_path, model_cache):
    if backend != "vllm":
        pytest.skip("the vLLM leg compares itself with a transformers server")
    requests = _requests()
    reference = start_analysis(tmp_path, model_cache, "transformers")
    try:
        with grpc.insecure_channel(reference.target) as channel:
            ref = analysis_pb2_grpc.AnalysisServiceStub(channel)
            expected = [_answer(ref.Analyze(r, timeout=120)) for r in requests]
    finally:
        reference.stop()
    alone = [_answer(stub.Analyze(r, timeout=120)) for r in requests]
    for i, (want, got) in enumerate(zip(expected, alone, strict=True)):
        assert got == want, (i, requests[i].task)
    # All at once, twice over: vLLM schedules them together, at different steps.
    futures = [stub.Analyze.future(r, timeout=300) for r in requests * 2]
    batched = [_answer(f.result()) for f in futures]
    assert batched == expected * 2
