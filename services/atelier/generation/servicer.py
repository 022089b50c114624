"""gRPC adapter of GenerationService: messages in and out, nothing else.

Converts requests to :class:`GenerationParams` (which holds the documented
defaults), streams engine events back, and pages the model list. Domain errors
raised below it become status codes in the kit's interceptor.
"""

from __future__ import annotations

import contextlib

from google.protobuf import duration_pb2, timestamp_pb2

from atelier.generation.engine import (
    DEFAULT_ADAPTER_SCALE,
    GenerationEngine,
    GenerationParams,
    GenerationResult,
    PreviewImages,
)
from atelier.generation.registry import ModelEntry
from atelier.kit.errors import InvalidArgument
from atelier.kit.paging import paginate
from atelier.v1 import common_pb2, generation_pb2, generation_pb2_grpc, model_pb2

_FORMATS = {
    common_pb2.IMAGE_FORMAT_UNSPECIFIED: "PNG",
    common_pb2.IMAGE_FORMAT_PNG: "PNG",
    common_pb2.IMAGE_FORMAT_JPEG: "JPEG",
    common_pb2.IMAGE_FORMAT_WEBP: "WEBP",
}
_FORMAT_ENUM = {"PNG": common_pb2.IMAGE_FORMAT_PNG, "JPEG": common_pb2.IMAGE_FORMAT_JPEG,
                "WEBP": common_pb2.IMAGE_FORMAT_WEBP}
_KINDS = {"base": model_pb2.MODEL_KIND_BASE, "full": model_pb2.MODEL_KIND_FINE_TUNED_FULL,
          "lora": model_pb2.MODEL_KIND_FINE_TUNED_LORA}
_FAMILIES = {"stable-diffusion": model_pb2.MODEL_FAMILY_STABLE_DIFFUSION,
             "stable-diffusion-xl": model_pb2.MODEL_FAMILY_STABLE_DIFFUSION_XL,
             "flux2-klein": model_pb2.MODEL_FAMILY_FLUX2_KLEIN}
_MODES = {"text-to-image": model_pb2.GENERATION_MODE_TEXT_TO_IMAGE,
          "image-to-image": model_pb2.GENERATION_MODE_IMAGE_TO_IMAGE,
          "inpaint": model_pb2.GENERATION_MODE_INPAINT}
_STATES = {"NOT_LOADED": model_pb2.MODEL_LOAD_STATE_NOT_LOADED,
           "LOADING": model_pb2.MODEL_LOAD_STATE_LOADING,
           "LOADED": model_pb2.MODEL_LOAD_STATE_LOADED,
           "FAILED": model_pb2.MODEL_LOAD_STATE_FAILED}


#: Fields where the proto's zero means "unset": the engine's default applies.
_ZERO_IS_UNSET = ("num_images", "num_inference_steps", "quality")
#: Optional fields: passed only when the request sets them.
_OPTIONAL = ("guidance_scale", "seed", "strength", "num_candidates")
#: Fields passed as they are (a zero is a value).
_AS_GIVEN = ("model", "prompt", "negative_prompt", "width", "height", "guidance_rescale",
             "scheduler", "init_image", "mask_image")


def params_from_request(request: generation_pb2.GenerateRequest,
                        preview_interval: int = 0) -> GenerationParams:
    """The request as engine parameters. Unset fields stay unset, so the defaults are
    ``GenerationParams``'s alone; unknown enum values are field violations."""
    if request.output_format not in _FORMATS:
        raise InvalidArgument.field("output_format", "unknown image format")
    given = {name: getattr(request, name) for name in _AS_GIVEN}
    given.update({name: getattr(request, name) for name in _ZERO_IS_UNSET
                  if getattr(request, name)})
    given.update({name: getattr(request, name) for name in _OPTIONAL
                  if request.HasField(name)})
    return GenerationParams(
        **given, output_format=_FORMATS[request.output_format],
        preview_interval=preview_interval,
        adapters=[(a.model, a.scale if a.HasField("scale") else DEFAULT_ADAPTER_SCALE)
                  for a in request.adapters],
        reference_images=list(request.reference_images))


def _seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(value * 1e9))
    return duration


def response_from_result(result: GenerationResult) -> generation_pb2.GenerateResponse:
    return generation_pb2.GenerateResponse(
        images=[common_pb2.EncodedImage(data=i.data, format=_FORMAT_ENUM[i.format],
                                        width=i.width, height=i.height) for i in result.images],
        seeds=[i.seed for i in result.images],
        model=result.model,
        timings=common_pb2.Timings(
            queue_wait=_seconds(result.queue_wait_s),
            compute=_seconds(result.denoise_s + result.decode_s),
            total=_seconds(result.total_s),
        ),
        denoise_seconds=result.denoise_s,
        decode_seconds=result.decode_s,
        subject_similarity=[i.subject_similarity for i in result.images
                            if i.subject_similarity is not None],
        candidates=[generation_pb2.Candidate(seed=seed, subject_similarity=score)
                    for seed, score in result.candidates],
    )


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    """Maps GenerationService RPCs onto the engine."""

    def __init__(self, engine: GenerationEngine) -> None:
        self.engine = engine

    async def Generate(self, request, context):
        params = params_from_request(request)
        async with contextlib.aclosing(self.engine.generate(params, progress=False)) as events:
            async for event in events:
                if isinstance(event, GenerationResult):
                    return response_from_result(event)
        raise RuntimeError("generation ended without a result")

    async def GenerateStream(self, request, context):
        if not request.HasField("request"):
            raise InvalidArgument.field("request", "is required")
        params = params_from_request(request.request, request.preview_interval_steps)
        async with contextlib.aclosing(self.engine.generate(params)) as events:
            async for event in events:
                if isinstance(event, GenerationResult):
                    yield generation_pb2.GenerateStreamResponse(
                        result=response_from_result(event))
                elif isinstance(event, PreviewImages):
                    yield generation_pb2.GenerateStreamResponse(
                        preview=generation_pb2.GenerationPreview(
                            step=event.step,
                            images=[common_pb2.EncodedImage(
                                data=i.data, format=common_pb2.IMAGE_FORMAT_JPEG,
                                width=i.width, height=i.height) for i in event.images]))
                else:
                    yield generation_pb2.GenerateStreamResponse(
                        progress=generation_pb2.GenerationProgress(
                            step=event.step, total_steps=event.total_steps,
                            batch_size=event.batch_size))

    async def ListModels(self, request, context):
        entries = [e for e in await self.engine.list_models()
                   if not request.kind or _KINDS[e.kind] == request.kind]
        page, next_token = paginate(entries, request.page_size, request.page_token)
        return generation_pb2.ListModelsResponse(models=[self._model(e) for e in page],
                                                 next_page_token=next_token)

    async def GetModel(self, request, context):
        if not request.name.startswith("models/") or request.name == "models/":
            raise InvalidArgument.field("name", "must look like models/{model}")
        entry = await self.engine.get_model(request.name)
        return generation_pb2.GetModelResponse(model=self._model(entry))

    async def DeleteModel(self, request, context):
        if not request.name.startswith("models/") or request.name == "models/":
            raise InvalidArgument.field("name", "must look like models/{model}")
        removed = await self.engine.delete_model(request.name)
        return generation_pb2.DeleteModelResponse(deleted_objects=removed)

    def _model(self, entry: ModelEntry) -> model_pb2.Model:
        registry = self.engine.registry
        state = registry.state(entry.model_id)
        loaded = registry.loaded.get(entry.model_id)
        model = model_pb2.Model(
            name=entry.name,
            display_name=(entry.manifest.display_name if entry.manifest else "") or entry.model_id,
            kind=_KINDS[entry.kind],
            source=entry.source,
            load_state=_STATES[state],
            memory_bytes=loaded.nbytes if loaded else 0,
        )
        if entry.family is not None:
            model.family = _FAMILIES[entry.family]
        if loaded is not None:
            info = loaded.info
            model.family = _FAMILIES[info.family]
            model.default_resolution = info.default_resolution
            model.modes.extend(_MODES[m] for m in info.modes)
            model.default_steps = info.default_steps
            model.default_guidance_scale = info.default_guidance
            model.takes_reference_images = info.reference_images
            model.guided = info.guidance
            model.size_multiple = info.size_multiple
        if entry.manifest is not None:
            m = entry.manifest
            model.base_model = m.base_model
            model.identifier_token = m.identifier_token
            model.class_prompt = m.class_prompt
            model.training_job = m.training_job
            model.owner = m.owner
            if m.scores is not None:
                model.scores.CopyFrom(model_pb2.SubjectScores(**m.scores.model_dump()))
        if entry.create_time is not None:
            stamp = timestamp_pb2.Timestamp()
            stamp.FromDatetime(entry.create_time)
            model.create_time.CopyFrom(stamp)
        return model
