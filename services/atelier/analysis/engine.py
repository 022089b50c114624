"""The analysis engine: requests in, answers out, through one of two backends.

The backend does the generation: ``transformers_backend.py`` (the model in this
process behind atelier's batcher, the embedded default) or ``vllm_backend.py``
(vLLM's asynchronous engine). Everything else is shared, so both backends
answer the same requests the same way: validation, admission, media decoding,
the prompt, the limits, the JSON grammar and checks, streaming and metrics.

Admission comes first, before anything is decoded: a request is refused at
once (RESOURCE_EXHAUSTED) when the queue is full, and otherwise holds its
estimated decode memory from a byte budget (``kit/admission.py``) while it
is prepared, so a flood of large images neither costs each refused request a
decode nor grows the process without bound.

``prepare`` (run in a thread) decodes the media within the limits, builds the
chat prompt from the task template, runs the processor with the configured
pixel budgets (so token counts are bounded before the model runs), checks the
prompt length and compiles the JSON grammar. ``analyze`` hands the prepared
request to the backend and yields text deltas (when streaming) and then the
result; a JSON answer is parsed and validated against its schema before it is
returned (and, for GROUNDING, its boxes converted to original pixels).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from atelier.analysis import grounding
from atelier.analysis.backend import Backend, DoneEvent, Sampling
from atelier.analysis.config import Settings
from atelier.analysis.detokenize import IncrementalText
from atelier.analysis.media import (
    DecodedVideo,
    decode_image,
    decode_video,
    frames_to_video,
    video_pixels,
)
from atelier.analysis.metrics import AnalysisMetrics
from atelier.analysis.structured import JsonGrammars, load_answer, parse_schema
from atelier.analysis.templates import GENERAL, GROUNDING, JSON, NATURAL_FORMAT, build_prompt
from atelier.kit.admission import ByteBudget
from atelier.kit.auth import current_principal
from atelier.kit.errors import AtelierError, FieldViolation, InvalidArgument
from atelier.kit.images import DECODE_BYTES_PER_PIXEL, image_pixels
from atelier.models.runtime import pick_device, pick_dtype, quiet_model_loading
from atelier.models.sources import resolve_model_ref
from atelier.storage import ObjectStore, open_store
from atelier.storage.references import read_reference

log = logging.getLogger("atelier.analysis")


@dataclass
class VideoSpec:
    """A video as sent: encoded bytes, or frames (encoded images) with timestamps."""

    data: bytes | None = None
    frames: list[tuple[bytes, float]] | None = None
    fps: float = 0.0
    max_frames: int = 0


@dataclass
class AnalysisRequest:
    """A request with its media fetched (see AnalyzeRequest for each field)."""

    images: list[bytes] = field(default_factory=list)
    video: VideoSpec | None = None
    instruction: str = ""
    task: str = "GENERAL"
    target_language: str = ""
    output_format: str = ""
    json_schema: str = ""
    max_new_tokens: int = 0
    priority: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    first_image_index: int = 0
    """The index of ``images[0]`` in the caller's list (a batch item's), so that
    violations name the caller's field."""

    def image_field(self, i: int) -> str:
        return f"images[{self.first_image_index + i}]"


@dataclass
class AnalysisResult:
    text: str
    output_format: str
    finish_reason: str  # STOP or LENGTH
    prompt_tokens: int
    image_tokens: int
    completion_tokens: int
    queue_wait_s: float
    time_to_first_token_s: float
    total_s: float


@dataclass
class Prepared:
    """A request ready for a backend: processor outputs (transformers) and the prompt
    with its decoded media (vLLM), with the counts and checks already done."""

    inputs: dict
    prompt_tokens: int
    image_tokens: int
    output_format: str
    schema: dict | None
    grammar: object
    budget: int
    prompt: str = ""
    images: list = field(default_factory=list)
    video: DecodedVideo | None = None
    geometry: grounding.ImageGeometry | None = None  # GROUNDING: the image's sizes


class AnalysisEngine:
    """Owns the store, the processor, the grammars and the backend."""

    def __init__(self, settings: Settings, metrics: AnalysisMetrics) -> None:
        self.settings = settings
        self.config = settings.analysis
        self.metrics = metrics
        self.store: ObjectStore | None = None
        self.processor = None
        self.grammars: JsonGrammars | None = None
        self.backend: Backend | None = None
        self.coordinates = grounding.RELATIVE_1000  # the model's grounding frame
        self.context_tokens = 0
        self.decode_budget: ByteBudget | None = None

    async def start(self) -> None:
        await asyncio.to_thread(self._start)
        self.decode_budget = ByteBudget(
            self.config.decode_budget_bytes, self.config.max_queue_length,
            what="the analysis decode budget", retry_after_s=self.backend.retry_hint,
            on_change=self.metrics.decode_bytes.set)
        await self.backend.start()

    def _start(self) -> None:
        from transformers import AutoConfig, AutoProcessor

        quiet_model_loading()
        self.store = open_store(self.settings.storage)
        path = str(resolve_model_ref(self.config.model,
                                     cache_dir=self.settings.models.cache_dir,
                                     store=self.store, field="analysis.model"))
        device = pick_device(self.config.device)
        dtype = pick_dtype(self.config.dtype, device)
        self.processor = AutoProcessor.from_pretrained(path)
        self.processor.tokenizer.padding_side = "left"
        model_config = AutoConfig.from_pretrained(path)
        self.coordinates = grounding.frame_of(model_config.model_type)
        if self.config.backend == "vllm":
            from atelier.analysis.vllm_backend import VllmBackend

            self.backend = VllmBackend(self.config, self.metrics, path, device,
                                       str(dtype).removeprefix("torch."))
        else:
            from atelier.analysis.transformers_backend import TransformersBackend

            self.backend = TransformersBackend(self.config, self.metrics, path, device,
                                               dtype, self.processor)
        self.grammars = self._grammars(path, model_config)
        self.context_tokens = self.backend.context_tokens
        log.info("loaded model", extra={"model": self.config.model, "device": device,
                                        "dtype": str(dtype), "backend": self.backend.name})

    def _grammars(self, path: str, model_config) -> JsonGrammars:
        """The transformers backend's grammars; for vLLM (which compiles its own), a
        compiler over the same vocabulary, used to refuse a schema xgrammar cannot
        compile before the engine sees it."""
        if self.config.backend != "vllm":
            return self.backend.grammars
        from transformers import GenerationConfig

        vocab = getattr(model_config, "text_config", model_config).vocab_size
        eos = GenerationConfig.from_pretrained(path).eos_token_id
        return JsonGrammars(self.processor.tokenizer, vocab,
                            eos if isinstance(eos, list) else [eos], closing=False)

    async def close(self) -> None:
        if self.backend is not None:
            await self.backend.close()

    def fetch(self, key: str, bucket: str, field_name: str) -> bytes:
        """Bytes of an object-store reference the caller may read (storage/references.py)."""
        return read_reference(self.store, key, bucket, field_name, current_principal())

    # -- preparation (in a thread) -----------------------------------------------------------
    def validate(self, r: AnalysisRequest) -> None:
        c = self.config
        bad: list[FieldViolation] = []
        if not r.images and r.video is None and r.task not in ("", GENERAL):
            bad.append(FieldViolation("images", f"task {r.task} needs at least one image or "
                                                "a video (GENERAL answers text alone)"))
        if len(r.images) > c.max_images:
            bad.append(FieldViolation("images", f"at most {c.max_images} images per request"))
        if r.max_new_tokens and not 1 <= r.max_new_tokens <= c.max_new_tokens:
            bad.append(FieldViolation("decoding.max_new_tokens",
                                      f"must be in 1..{c.max_new_tokens}"))
        if not 0.0 <= r.temperature <= 2.0:
            bad.append(FieldViolation("decoding.temperature", "must be in 0..2"))
        if not 0.0 < r.top_p <= 1.0:
            bad.append(FieldViolation("decoding.top_p", "must be in (0, 1]"))
        if not 0 <= r.top_k <= 1000:
            bad.append(FieldViolation("decoding.top_k", "must be in 0..1000"))
        if not 1.0 <= r.repetition_penalty <= 2.0:
            bad.append(FieldViolation("decoding.repetition_penalty", "must be in [1, 2]"))
        if not -1000 <= r.priority <= 1000:
            bad.append(FieldViolation("priority", "must be in -1000..1000"))
        if len(r.instruction) > 8192:
            bad.append(FieldViolation("instruction", "is longer than 8192 characters"))
        if r.json_schema and r.output_format not in ("", JSON):
            bad.append(FieldViolation("json_schema", "needs output_format JSON"))
        if r.task == GROUNDING:
            if len(r.images) != 1 or r.video is not None:
                bad.append(FieldViolation("images", "GROUNDING takes exactly one image"))
            if r.json_schema:
                bad.append(FieldViolation("json_schema",
                                          "must be empty: GROUNDING answers have a fixed schema"))
            if r.output_format not in ("", JSON):
                bad.append(FieldViolation("output_format", "GROUNDING answers in JSON"))
        if r.video is not None and r.video.fps and not 0 < r.video.fps <= 30:
            bad.append(FieldViolation("video.fps", "must be in (0, 30]"))
        if r.video is not None and r.video.max_frames and \
                not 1 <= r.video.max_frames <= c.max_video_frames:
            bad.append(FieldViolation("video.max_frames", f"must be in 1..{c.max_video_frames}"))
        if r.video is not None and r.video.frames is not None and \
                not 1 <= len(r.video.frames) <= c.max_video_frames:
            bad.append(FieldViolation("video.frames.frames",
                                      f"must hold 1..{c.max_video_frames} frames"))
        if bad:
            raise InvalidArgument(bad)

    def prepare(self, r: AnalysisRequest) -> Prepared:
        c = self.config
        self.validate(r)
        output_format = r.output_format or (JSON if r.json_schema else NATURAL_FORMAT[r.task])
        schema = parse_schema(r.json_schema, c.json_completion_tokens) if r.json_schema \
            else None
        text = build_prompt(r.task, r.instruction, output_format, r.target_language,
                            has_schema=schema is not None, coordinates=self.coordinates)
        if schema is not None:
            text += "\nJSON schema: " + json.dumps(schema, separators=(",", ":"))
        images = [decode_image(data, r.image_field(i), c) for i, data in enumerate(r.images)]
        video = self._video(r.video) if r.video is not None else None
        content = [{"type": "image"} for _ in images]
        if video is not None:
            content.append({"type": "video"})
        content.append({"type": "text", "text": text})
        prompt = self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                    add_generation_prompt=True)
        kwargs: dict = {"images_kwargs": {"size": {"shortest_edge": c.image_min_pixels,
                                                   "longest_edge": c.image_max_pixels}}}
        if video is not None:
            from transformers.video_utils import VideoMetadata

            rate = 1000.0  # timestamps in milliseconds, as frame indices at 1 kHz
            metadata = VideoMetadata(
                total_num_frames=len(video.timestamps), fps=rate,
                frames_indices=[round(t * rate) for t in video.timestamps])
            kwargs["videos_kwargs"] = {
                "video_metadata": [metadata], "do_sample_frames": False,
                "size": {"shortest_edge": c.image_min_pixels,
                         "longest_edge": c.video_max_pixels},
            }
        inputs = self.processor(text=[prompt], images=images or None,
                                videos=[video.frames] if video is not None else None,
                                return_tensors="pt", **kwargs)
        inputs = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        ids = inputs["input_ids"][0]
        vision_ids = {self.processor.image_token_id, self.processor.video_token_id}
        image_tokens = int(sum((ids == t).sum() for t in vision_ids))
        budget = r.max_new_tokens or c.default_max_new_tokens
        limit = min(c.max_input_tokens, self.context_tokens - budget)
        if len(ids) > limit:
            raise InvalidArgument.field(
                "request", f"the prompt is {len(ids)} tokens ({image_tokens} from images and "
                           f"video); the limit is {limit} with max_new_tokens {budget}")
        geometry = None
        if r.task == GROUNDING:
            patch = self.processor.image_processor.patch_size
            _, rows, cols = (int(v) for v in inputs["image_grid_thw"][0])
            geometry = grounding.ImageGeometry(images[0].width, images[0].height,
                                               cols * patch, rows * patch)
            schema = grounding.model_schema(self.coordinates, geometry)
        grammar = None
        if output_format == JSON:
            grammar = self.grammars.compile(json.dumps(schema) if schema is not None else None)
        return Prepared(inputs, len(ids), image_tokens, output_format, schema, grammar, budget,
                        prompt=prompt, images=images, video=video, geometry=geometry)

    def _video(self, spec: VideoSpec) -> DecodedVideo:
        c = self.config
        if spec.frames is not None:
            images = [decode_image(data, f"video.frames.frames[{i}].image", c)
                      for i, (data, _) in enumerate(spec.frames)]
            video = frames_to_video(images, [t for _, t in spec.frames], "video.frames.frames")
        else:
            video = decode_video(spec.data or b"", spec.fps or c.default_video_fps,
                                 spec.max_frames or c.max_video_frames, "video.data", c)
        # A clip shorter than one temporal patch is still a video: repeat its last frame.
        temporal = getattr(self.processor.video_processor, "temporal_patch_size", 1) or 1
        missing = temporal - len(video.timestamps)
        if missing > 0:
            video.frames = np.concatenate([video.frames, video.frames[-1:].repeat(missing, 0)])
            video.timestamps = video.timestamps + [video.timestamps[-1]] * missing
        return video

    # -- admission ---------------------------------------------------------------------------
    def decode_cost(self, r: AnalysisRequest) -> int:
        """Estimated peak bytes of decoding and preprocessing ``r``, from headers only."""
        c = self.config
        pixels = sum(image_pixels(data) for data in r.images)
        if r.video is not None:
            if r.video.frames is not None:
                pixels += sum(image_pixels(data) for data, _ in r.video.frames)
            elif r.video.data:
                pixels += video_pixels(r.video.data, r.video.max_frames or c.max_video_frames)
        cost = pixels * DECODE_BYTES_PER_PIXEL
        if cost > c.decode_budget_bytes:
            raise InvalidArgument.field(
                "images", f"the request's media decode to about {cost // 2**20} MiB; the "
                          f"service decodes at most {c.decode_budget_bytes // 2**20} MiB at once")
        return cost

    def admit(self) -> None:
        """Refuse at once when the queue (waiting for the budget, being prepared, or
        waiting for a batch) is full."""
        if not self.backend.has_room(self.decode_budget.waiting):
            raise self.backend.admission.refusal(
                f"analysis queue is full ({self.config.max_queue_length} requests waiting)")

    # -- answering ---------------------------------------------------------------------------
    async def analyze(self, r: AnalysisRequest, stream: bool = False) -> AsyncIterator:
        """Yield text deltas (when ``stream``), then one AnalysisResult."""
        arrived = time.perf_counter()
        self.metrics.requests.labels(r.task).inc()
        self.validate(r)
        self.admit()
        async with self.decode_budget.hold(self.decode_cost(r)):
            self.backend.arriving(+1)
            try:
                prepared = await asyncio.to_thread(self.prepare, r)
            except BaseException:
                self.backend.arriving(-1)
                raise
        self.metrics.image_tokens.observe(prepared.image_tokens)
        sampling = Sampling(r.temperature, r.top_p, r.top_k, r.repetition_penalty,
                            r.seed if r.temperature > 0 else None)
        text = IncrementalText(self.processor.tokenizer)
        # The backend ends the arrival once the request is queued (or refused).
        events = self.backend.generate(prepared, sampling, stream, r.priority)
        try:
            async for event in events:
                if isinstance(event, int):
                    delta = text.push(event)
                    if delta:
                        yield delta
                elif isinstance(event, DoneEvent):
                    yield self._result(event, prepared, arrived)
                    return
        finally:
            await events.aclose()

    async def answer(self, r: AnalysisRequest) -> AnalysisResult:
        """The whole answer to one request."""
        events = self.analyze(r)
        try:
            async for event in events:
                if isinstance(event, AnalysisResult):
                    return event
        finally:
            await events.aclose()
        raise RuntimeError("analysis ended without a result")

    async def analyze_many(self, items: Sequence[Callable[[], Awaitable[AnalysisRequest]]]
                           ) -> AsyncIterator[tuple[int, AnalysisResult | AtelierError]]:
        """Answer a batch's items concurrently (at most ``max_batch_size`` at once); yield
        (index, result or the item's own error) in input order, each as soon as it and
        those before it are done. ``items`` build their requests (fetching media)."""
        slots = asyncio.Semaphore(self.config.max_batch_size)

        async def one(build) -> AnalysisResult | AtelierError:
            async with slots:
                try:
                    return await self.answer(await build())
                except AtelierError as exc:
                    return exc

        tasks = [asyncio.create_task(one(build)) for build in items]
        try:
            for i, task in enumerate(tasks):
                yield i, await task
        finally:
            for task in tasks:
                task.cancel()

    def _result(self, event: DoneEvent, prepared: Prepared, arrived: float) -> AnalysisResult:
        text = self.processor.tokenizer.decode(event.token_ids, skip_special_tokens=True)
        text = text.strip()
        if prepared.output_format == JSON:
            text = self._check_json(text, prepared.schema)
        if prepared.geometry is not None:
            located = grounding.answer(load_answer(text)[0], self.coordinates,
                                       prepared.geometry)
            text = self._check_json(json.dumps(located, ensure_ascii=False),
                                    grounding.ANSWER_SCHEMA)
        ttft = event.first_token_time - arrived
        self.metrics.ttft.observe(ttft)
        return AnalysisResult(
            text=text, output_format=prepared.output_format,
            finish_reason="STOP" if event.stopped_by_eos and not event.closing else "LENGTH",
            prompt_tokens=prepared.prompt_tokens, image_tokens=prepared.image_tokens,
            completion_tokens=len(event.token_ids), queue_wait_s=event.queue_wait_s,
            time_to_first_token_s=ttft, total_s=time.perf_counter() - arrived)

    @staticmethod
    def _check_json(text: str, schema: dict | None) -> str:
        """The answer's JSON text, checked: it parses, and validates against the
        schema (a failure here is a bug: what cannot be guaranteed is refused before
        generation, see schema_limits.py)."""
        value, text = load_answer(text)
        if schema is not None:
            from jsonschema import Draft202012Validator

            Draft202012Validator(schema).validate(value)
        return text
