"""Analysis clients: questions about images, documents, charts and video; text,
markdown or schema-valid JSON answers.

    from atelier.client import AnalysisClient

    with AnalysisClient("127.0.0.1:50053") as client:
        reply = client.analyze(["invoice.png"], task="document", output_format="json",
                               json_schema={"type": "object", "properties": {
                                   "total": {"type": "number"}}, "required": ["total"]})
        print(json.loads(reply.text)["total"])
        for event in client.analyze_stream(["chart.png"], instruction="Describe the trend"):
            print(event.delta, end="")
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from atelier.client.connection import AsyncServiceClient, ServiceClient
from atelier.client.enums import enum_value
from atelier.client.media import ImageLike, image_inputs, video_input
from atelier.ports import local_target
from atelier.v1 import analysis_pb2 as A
from atelier.v1 import analysis_pb2_grpc


def decoding_params(*, max_new_tokens: int = 0, temperature: float = 0.0,
                    top_p: float | None = None, top_k: int = 0,
                    repetition_penalty: float | None = None,
                    seed: int | None = None) -> A.DecodingParams:
    """Decoding settings; zeros take the server's defaults (temperature 0 is greedy)."""
    params = A.DecodingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                              top_k=top_k)
    for name, value in (("top_p", top_p), ("repetition_penalty", repetition_penalty),
                        ("seed", seed)):
        if value is not None:
            setattr(params, name, value)
    return params


def _schema_text(schema: str | dict | None) -> str:
    if schema is None:
        return ""
    return schema if isinstance(schema, str) else json.dumps(schema)


def analyze_request(images: ImageLike | Iterable[ImageLike] = (), *,
                    video: Any = None, instruction: str = "", task: str | int | None = None,
                    output_format: str | int | None = None,
                    json_schema: str | dict | None = None, target_language: str = "",
                    priority: int = 0, **decoding) -> A.AnalyzeRequest:
    """An AnalyzeRequest. ``task``: vqa, document, chart, video, ocr, general or
    grounding; ``output_format``: text, markdown or json; ``json_schema`` (a dict or
    JSON text) constrains a JSON answer; ``video`` is a path, bytes, ObjectRef or
    VideoInput; ``priority``: lower is served first (-1000..1000); the remaining
    keywords go to decoding_params()."""
    if video is not None and not isinstance(video, A.VideoInput):
        video = video_input(video)
    return A.AnalyzeRequest(
        images=image_inputs(images) if images else [], video=video, instruction=instruction,
        task=enum_value(A.AnalysisTask, task, "ANALYSIS_TASK_"),
        output_format=enum_value(A.OutputFormat, output_format, "OUTPUT_FORMAT_"),
        json_schema=_schema_text(json_schema), target_language=target_language,
        priority=priority, decoding=decoding_params(**decoding))


def batch_request(images: Iterable[ImageLike], **fields) -> A.BatchAnalyzeRequest:
    """The same question over many images (one answer per image)."""
    single = analyze_request(images, **fields)
    return A.BatchAnalyzeRequest(
        images=single.images, instruction=single.instruction, task=single.task,
        target_language=single.target_language, output_format=single.output_format,
        json_schema=single.json_schema, decoding=single.decoding, priority=single.priority)


def answer_json(reply: A.AnalyzeResponse) -> Any:
    """The parsed answer of a JSON-format reply."""
    return json.loads(reply.text)


class AnalysisClient(ServiceClient):
    """Sync client of AnalysisService. Use as a context manager, or call close()."""

    stub_class = analysis_pb2_grpc.AnalysisServiceStub
    default_target = local_target("analysis")

    def analyze(self, images: ImageLike | Iterable[ImageLike] = (), *,
                timeout: float | None = None, **fields) -> A.AnalyzeResponse:
        """One answer about the images (or ``video=``); fields as in analyze_request()."""
        return self._conn.unary(self._stub.Analyze, analyze_request(images, **fields), timeout)

    def analyze_stream(self, images: ImageLike | Iterable[ImageLike] = (), *,
                       timeout: float | None = None,
                       **fields) -> Iterator[A.AnalyzeStreamResponse]:
        """Text deltas as they are decoded, then the full result."""
        request = A.AnalyzeStreamRequest(request=analyze_request(images, **fields))
        return self._conn.stream(self._stub.AnalyzeStream, request, timeout)

    def batch_analyze(self, images: Iterable[ImageLike], *, timeout: float | None = None,
                      **fields) -> Iterator[A.BatchAnalyzeResponse]:
        """One result (or per-item error) per image, in completion order with its index."""
        return self._conn.stream(self._stub.BatchAnalyze, batch_request(images, **fields),
                                 timeout)



class AsyncAnalysisClient(AsyncServiceClient):
    """asyncio client of AnalysisService; the same calls as AnalysisClient, awaited."""

    stub_class = analysis_pb2_grpc.AnalysisServiceStub
    default_target = local_target("analysis")

    async def analyze(self, images: ImageLike | Iterable[ImageLike] = (), *,
                      timeout: float | None = None, **fields) -> A.AnalyzeResponse:
        return await self._conn.unary(self._stub.Analyze, analyze_request(images, **fields),
                                      timeout)

    def analyze_stream(self, images: ImageLike | Iterable[ImageLike] = (), *,
                       timeout: float | None = None,
                       **fields) -> AsyncIterator[A.AnalyzeStreamResponse]:
        request = A.AnalyzeStreamRequest(request=analyze_request(images, **fields))
        return self._conn.stream(self._stub.AnalyzeStream, request, timeout)

    def batch_analyze(self, images: Iterable[ImageLike], *, timeout: float | None = None,
                      **fields) -> AsyncIterator[A.BatchAnalyzeResponse]:
        return self._conn.stream(self._stub.BatchAnalyze, batch_request(images, **fields),
                                 timeout)
