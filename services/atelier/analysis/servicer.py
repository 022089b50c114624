"""gRPC adapter of AnalysisService: messages in and out, nothing else."""

from __future__ import annotations

import asyncio
import contextlib

from google.protobuf import duration_pb2

from atelier.analysis.engine import AnalysisEngine, AnalysisRequest, AnalysisResult, VideoSpec
from atelier.kit.errors import AtelierError, InvalidArgument
from atelier.v1 import analysis_pb2, analysis_pb2_grpc, common_pb2

_TASKS = {analysis_pb2.ANALYSIS_TASK_UNSPECIFIED: "GENERAL",
          analysis_pb2.ANALYSIS_TASK_VQA: "VQA",
          analysis_pb2.ANALYSIS_TASK_DOCUMENT: "DOCUMENT",
          analysis_pb2.ANALYSIS_TASK_CHART: "CHART",
          analysis_pb2.ANALYSIS_TASK_VIDEO: "VIDEO",
          analysis_pb2.ANALYSIS_TASK_OCR: "OCR",
          analysis_pb2.ANALYSIS_TASK_GENERAL: "GENERAL",
          analysis_pb2.ANALYSIS_TASK_GROUNDING: "GROUNDING"}
_FORMATS = {analysis_pb2.OUTPUT_FORMAT_UNSPECIFIED: "",
            analysis_pb2.OUTPUT_FORMAT_TEXT: "TEXT",
            analysis_pb2.OUTPUT_FORMAT_MARKDOWN: "MARKDOWN",
            analysis_pb2.OUTPUT_FORMAT_JSON: "JSON"}
_FORMAT_ENUM = {"TEXT": analysis_pb2.OUTPUT_FORMAT_TEXT,
                "MARKDOWN": analysis_pb2.OUTPUT_FORMAT_MARKDOWN,
                "JSON": analysis_pb2.OUTPUT_FORMAT_JSON}
_FINISH = {"STOP": analysis_pb2.FINISH_REASON_STOP, "LENGTH": analysis_pb2.FINISH_REASON_LENGTH}


def _seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(value * 1e9))
    return d


class AnalysisServicer(analysis_pb2_grpc.AnalysisServiceServicer):
    """Maps AnalysisService RPCs onto the engine."""

    def __init__(self, engine: AnalysisEngine) -> None:
        self.engine = engine

    # -- conversion ---------------------------------------------------------------------------
    async def _image_bytes(self, image: common_pb2.ImageInput, field: str) -> bytes:
        which = image.WhichOneof("source")
        if which == "data":
            return image.data
        if which == "object":
            return await asyncio.to_thread(self.engine.fetch, image.object.key,
                                           image.object.bucket, f"{field}.object")
        raise InvalidArgument.field(field, "set data or object")

    async def _request(self, *, images, video, instruction, task, target_language,
                       output_format, json_schema, decoding, priority,
                       first_image_index: int = 0) -> AnalysisRequest:
        # Refuse a full queue before copying media out of the message or fetching
        # any from the store (the engine checks again when the request is queued).
        self.engine.admit()
        if task not in _TASKS:
            raise InvalidArgument.field("task", "unknown task")
        if output_format not in _FORMATS:
            raise InvalidArgument.field("output_format", "unknown output format")
        fetched = [await self._image_bytes(img, f"images[{first_image_index + i}]")
                   for i, img in enumerate(images)]
        spec = None
        if video is not None:
            which = video.WhichOneof("source")
            spec = VideoSpec(fps=video.fps, max_frames=video.max_frames)
            if which == "data":
                spec.data = video.data
            elif which == "object":
                spec.data = await asyncio.to_thread(self.engine.fetch, video.object.key,
                                                    video.object.bucket, "video.object")
            elif which == "frames":
                spec.frames = [
                    (await self._image_bytes(f.image, f"video.frames.frames[{i}].image"),
                     f.timestamp_seconds)
                    for i, f in enumerate(video.frames.frames)]
            else:
                raise InvalidArgument.field("video", "set data, object or frames")
        return AnalysisRequest(
            images=fetched, video=spec, instruction=instruction, task=_TASKS[task],
            target_language=target_language, output_format=_FORMATS[output_format],
            json_schema=json_schema, max_new_tokens=decoding.max_new_tokens,
            priority=priority, temperature=decoding.temperature,
            top_p=decoding.top_p if decoding.HasField("top_p") else 1.0, top_k=decoding.top_k,
            repetition_penalty=(decoding.repetition_penalty
                                if decoding.HasField("repetition_penalty") else 1.0),
            seed=decoding.seed if decoding.HasField("seed") else None,
            first_image_index=first_image_index)

    async def _from_analyze(self, request: analysis_pb2.AnalyzeRequest) -> AnalysisRequest:
        return await self._request(
            images=request.images,
            video=request.video if request.HasField("video") else None,
            instruction=request.instruction, task=request.task,
            target_language=request.target_language, output_format=request.output_format,
            json_schema=request.json_schema, decoding=request.decoding,
            priority=request.priority)

    @staticmethod
    def _response(result: AnalysisResult) -> analysis_pb2.AnalyzeResponse:
        return analysis_pb2.AnalyzeResponse(
            text=result.text, output_format=_FORMAT_ENUM[result.output_format],
            finish_reason=_FINISH[result.finish_reason],
            usage=analysis_pb2.Usage(prompt_tokens=result.prompt_tokens,
                                     image_tokens=result.image_tokens,
                                     completion_tokens=result.completion_tokens),
            timings=common_pb2.Timings(
                queue_wait=_seconds(result.queue_wait_s),
                compute=_seconds(max(0.0, result.total_s - result.queue_wait_s)),
                total=_seconds(result.total_s)),
            time_to_first_token_seconds=result.time_to_first_token_s)

    # -- RPCs ---------------------------------------------------------------------------------
    async def Analyze(self, request, context):
        return self._response(await self.engine.answer(await self._from_analyze(request)))

    async def AnalyzeStream(self, request, context):
        if not request.HasField("request"):
            raise InvalidArgument.field("request", "is required")
        converted = await self._from_analyze(request.request)
        async with contextlib.aclosing(self.engine.analyze(converted, stream=True)) as events:
            async for event in events:
                if isinstance(event, AnalysisResult):
                    yield analysis_pb2.AnalyzeStreamResponse(result=self._response(event))
                else:
                    yield analysis_pb2.AnalyzeStreamResponse(delta=event)

    async def BatchAnalyze(self, request, context):
        limit = self.engine.config.max_batch_items
        if not 1 <= len(request.images) <= limit:
            raise InvalidArgument.field("images", f"must hold 1..{limit} images")
        # Validate the shared parts once, so a bad schema or task fails the call.
        if request.task not in _TASKS:
            raise InvalidArgument.field("task", "unknown task")
        if request.output_format not in _FORMATS:
            raise InvalidArgument.field("output_format", "unknown output format")
        if request.json_schema:
            from atelier.analysis.structured import parse_schema

            parse_schema(request.json_schema, self.engine.config.json_completion_tokens)

        def item(i: int, image):
            return lambda: self._request(
                images=[image], video=None, instruction=request.instruction,
                task=request.task, target_language=request.target_language,
                output_format=request.output_format, json_schema=request.json_schema,
                decoding=request.decoding, priority=request.priority, first_image_index=i)

        items = [item(i, image) for i, image in enumerate(request.images)]
        async with contextlib.aclosing(self.engine.analyze_many(items)) as answers:
            async for i, outcome in answers:
                if isinstance(outcome, AtelierError):
                    yield analysis_pb2.BatchAnalyzeResponse(
                        index=i, error=analysis_pb2.ItemError(code=outcome.code.value[0],
                                                              message=outcome.message))
                else:
                    yield analysis_pb2.BatchAnalyzeResponse(index=i,
                                                            result=self._response(outcome))
