"""The generation engine: validated requests in, images out, through the batcher.

It owns the object store handle, the model registry and the denoising worker.
``generate`` validates a request against the service limits and then against
its model (``ModelInfo``: family, default size, the modes it takes), decodes and
resizes any init image and mask (the worker makes them tensors), and yields the
request's events (progress, previews, then the result; best of N keeps the candidates most
like the model's subject, ``best_of_n``); cancelling the consumer (a cancelled
RPC, an expired deadline) takes the request's sequences out of the batch at the
next step.
"""

from __future__ import annotations

import asyncio
import io
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from atelier.generation import image_inputs
from atelier.generation.adapters import AdapterUse
from atelier.generation.batching import DenoiseBatcher
from atelier.generation.best_of_n import BestOfN
from atelier.generation.config import Settings
from atelier.generation.image_inputs import IMG2IMG_STRENGTH, INPAINT_STRENGTH, ImageLimits
from atelier.generation.job import (
    IMAGE_TO_IMAGE,
    INPAINT,
    TEXT_TO_IMAGE,
    Finished,
    Job,
    Preview,
    Progress,
)
from atelier.generation.metrics import GenerationMetrics
from atelier.generation.registry import LoadedModel, ModelEntry, ModelRegistry
from atelier.generation.request_checks import (
    check_for_model,
    check_steps,
    with_model_defaults,
)
from atelier.generation.schedulers import scheduler_factory
from atelier.kit.admission import ByteBudget
from atelier.kit.auth import current_principal
from atelier.kit.errors import FieldViolation, InvalidArgument
from atelier.kit.images import DECODE_BYTES_PER_PIXEL, encode_png, image_pixels
from atelier.kit.work_queue import EventChannel
from atelier.models.families.flux2_klein import MAX_REFERENCE_PIXELS
from atelier.models.runtime import pick_device, pick_dtype, quiet_model_loading
from atelier.storage import ObjectStore, open_store

log = logging.getLogger("atelier.generation")

IMAGE_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "WEBP": "WEBP"}
MAX_SEED = 2**63 - 1
MAX_ADAPTER_SCALE = 2.0
#: An adapter's scale when the request gives none.
DEFAULT_ADAPTER_SCALE = 1.0


@dataclass
class GenerationParams:
    """A request with the documented defaults: the one place they are written (see
    GenerateRequest for each field; the servicer passes only the fields a request set)."""

    model: str = ""
    prompt: str = ""
    negative_prompt: str = ""
    num_images: int = 1
    width: int = 0
    height: int = 0
    num_inference_steps: int | None = None  # None: the model's (ModelInfo.default_steps)
    guidance_scale: float | None = None  # None: the model's (ModelInfo.default_guidance)
    guidance_rescale: float = 0.0
    seed: int | None = None
    scheduler: str = ""
    output_format: str = "PNG"
    quality: int = 90
    preview_interval: int = 0
    init_image: bytes = b""
    mask_image: bytes = b""
    strength: float | None = None  # None: the mode's default
    adapters: list[tuple[str, float]] = field(default_factory=list)  # (LoRA model, scale)
    num_candidates: int | None = None  # best of N; None: num_images
    reference_images: list[bytes] = field(default_factory=list)  # klein multi-reference

    @property
    def candidates(self) -> int:
        return self.num_candidates or self.num_images

    @property
    def mode(self) -> str:
        if not self.init_image:
            return TEXT_TO_IMAGE
        return INPAINT if self.mask_image else IMAGE_TO_IMAGE


@dataclass
class RequestModels:
    """The loaded models a request runs on, held (``refs``) until it ends."""

    model: LoadedModel  # whose UNet runs: a base or a full fine-tune
    encoder: LoadedModel  # whose text encoders encode the prompts
    adapters: tuple[AdapterUse, ...]
    named: ModelEntry  # what the request named (reported back), or the base
    held: list[LoadedModel]


@dataclass
class GeneratedImage:
    data: bytes
    format: str
    width: int
    height: int
    seed: int
    subject_similarity: float | None = None  # best of N only


@dataclass
class GenerationResult:
    model: str
    images: list[GeneratedImage]
    queue_wait_s: float
    denoise_s: float
    decode_s: float
    total_s: float
    candidates: list[tuple[int, float]] = field(default_factory=list)
    """Best of N: every candidate's (seed, subject similarity), best first."""


@dataclass
class PreviewImages:
    step: int
    images: list[GeneratedImage]


class GenerationEngine:
    """Owns the store, the registry and the batcher."""

    def __init__(self, settings: Settings, metrics: GenerationMetrics) -> None:
        self.settings = settings
        self.config = settings.generation
        self.metrics = metrics
        self.store: ObjectStore | None = None
        self.registry: ModelRegistry | None = None
        self.batcher: DenoiseBatcher | None = None
        self.decode_budget: ByteBudget | None = None
        self.device = "cpu"
        self.dtype = torch.float32
        self._refresher: asyncio.Task | None = None
        self.best_of_n: BestOfN | None = None

    async def start(self) -> None:
        """Open the store, start the worker and load the default model."""
        quiet_model_loading()
        self.store = await asyncio.to_thread(open_store, self.settings.storage)
        self.device = pick_device(self.config.device)
        self.dtype = pick_dtype(self.config.dtype, self.device)
        self.batcher = DenoiseBatcher(
            device=self.device, max_batch_size=self.config.max_batch_size,
            max_queue_length=self.config.max_queue_length,
            min_retry_after_s=self.config.min_retry_after_s,
            decode_wait_steps=self.config.decode_wait_steps, metrics=self.metrics,
            mix_adapters=self.config.mix_adapters,
            buckets=self.config.batch_buckets if self.config.compile_unet else None,
            compile_unet=self.config.compile_unet, cuda_graphs=self.config.cuda_graphs,
        )
        self.batcher.start()
        self.decode_budget = ByteBudget(
            self.config.max_decode_bytes, self.config.max_queue_length,
            what="the generation image decode budget", retry_after_s=self.batcher.retry_hint)
        self.registry = ModelRegistry(
            self.config, self.settings.models.cache_dir, self.store, self.device, self.dtype,
            self.metrics,
        )
        model = await self.registry.acquire(self.config.default_model)
        try:
            if self.config.compile_unet:
                await self._warm(model)
        finally:
            self.registry.release(model)
        self.best_of_n = BestOfN(self.config.dino_model, cache_dir=self.settings.models.cache_dir,
                                 store=self.store, batcher=self.batcher, device=self.device)
        self._refresher = asyncio.create_task(self._refresh_models(), name="model-refresh")
        log.info("generation engine ready", extra={"device": self.device,
                                                    "dtype": str(self.dtype)})

    async def _warm(self, model) -> None:
        """Compile the default model's UNet at every batch bucket, at its native size,
        on the worker thread (health stays NOT_SERVING until this returns)."""
        start = time.perf_counter()
        size = model.info.default_resolution
        runner = self.batcher.runner
        cuda = self.device.startswith("cuda")
        reserved = torch.cuda.memory_reserved() if cuda else 0
        buckets = await asyncio.wrap_future(self.batcher.run_on_worker(
            lambda: runner.warm(model, size, size)))
        seconds = time.perf_counter() - start
        if cuda and self.config.cuda_graphs:
            # What the warm-up reserved: the captured graphs' pool (and compiled kernels').
            self.metrics.cuda_graph_bytes.set(torch.cuda.memory_reserved() - reserved)
        self.metrics.warmup_seconds.set(seconds)
        self.metrics.warm_buckets.set(buckets)
        log.info("compiled UNet warm", extra={"model": model.entry.name, "buckets": buckets,
                                              "seconds": round(seconds, 1)})

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        if self.batcher is not None:
            await asyncio.to_thread(self.batcher.stop)

    async def _refresh_models(self) -> None:
        while True:
            await asyncio.sleep(self.config.model_refresh_interval_s)
            try:
                await self.registry.refresh()
            except Exception:
                log.warning("model refresh failed", exc_info=True)

    # -- models ---------------------------------------------------------------------------
    async def list_models(self) -> list[ModelEntry]:
        """Base models and the fine-tuned models the caller may see."""
        principal = current_principal()
        entries = await asyncio.to_thread(self.registry.catalog)
        return [e for e in entries.values() if principal.owns(e.owner)]

    async def get_model(self, name: str) -> ModelEntry:
        return await asyncio.to_thread(self.registry.entry, name, current_principal())

    async def delete_model(self, name: str) -> int:
        """Delete a fine-tuned model from the store and stop serving it here at once
        (other replicas follow within model_refresh_interval_s)."""
        removed = await asyncio.to_thread(self.registry.delete_stored, name,
                                          current_principal())
        await self.registry.forget(name.removeprefix("models/"))
        return removed

    # -- generation -----------------------------------------------------------------------
    def validate(self, p: GenerationParams) -> None:
        """Check the fields that need no model; raise one InvalidArgument listing all."""
        c = self.config
        bad: list[FieldViolation] = []
        if not p.prompt.strip():
            bad.append(FieldViolation("prompt", "must not be empty"))
        if not 1 <= p.num_images <= c.max_images_per_request:
            bad.append(FieldViolation("num_images",
                                      f"must be in 1..{c.max_images_per_request}"))
        for name in ("width", "height"):
            value = getattr(p, name)
            if value and (value % 8 or not 64 <= value <= c.max_resolution):
                bad.append(FieldViolation(
                    name, f"must be a multiple of 8 in 64..{c.max_resolution} px, got {value}"))
        most = min(c.max_candidates, c.max_batch_size)
        if p.num_candidates is not None and not p.num_images <= p.num_candidates <= most:
            bad.append(FieldViolation("num_candidates", f"must be in num_images..{most}"))
        steps = p.num_inference_steps
        if steps is not None and not 1 <= steps <= c.max_steps:
            bad.append(FieldViolation("num_inference_steps", f"must be in 1..{c.max_steps}"))
        if p.guidance_scale is not None and not 0.0 <= p.guidance_scale <= 30.0:
            bad.append(FieldViolation("guidance_scale", "must be in 0..30"))
        if not 0.0 <= p.guidance_rescale <= 1.0:
            bad.append(FieldViolation("guidance_rescale", "must be in 0..1"))
        if p.seed is not None and not 0 <= p.seed <= MAX_SEED:
            bad.append(FieldViolation("seed", "must be in 0..2^63-1"))
        if p.output_format not in IMAGE_FORMATS:
            bad.append(FieldViolation("output_format", "must be PNG, JPEG or WEBP"))
        if not 1 <= p.quality <= 100:
            bad.append(FieldViolation("quality", "must be in 1..100"))
        if p.preview_interval < 0 or (steps is not None and p.preview_interval > steps):
            bad.append(FieldViolation("preview_interval_steps",
                                      "must be in 0..num_inference_steps"))
        if p.mask_image and not p.init_image:
            bad.append(FieldViolation("mask_image", "needs init_image (the image to inpaint)"))
        if p.strength is not None:
            if not p.init_image:
                bad.append(FieldViolation("strength", "applies only with init_image"))
            elif not 0.0 < p.strength <= 1.0:
                bad.append(FieldViolation("strength", f"must be in (0, 1], got {p.strength}"))
            elif steps is not None and int(steps * p.strength) < 1:
                bad.append(FieldViolation(
                    "strength", f"leaves no step of {steps}: "
                                "num_inference_steps * strength must be at least 1"))
        if len(p.reference_images) > c.max_reference_images:
            bad.append(FieldViolation("reference_images",
                                      f"{len(p.reference_images)} images; the limit is "
                                      f"{c.max_reference_images}"))
        for i, data in enumerate(p.reference_images[: c.max_reference_images]):
            if len(data) > c.max_input_image_bytes:
                bad.append(FieldViolation(f"reference_images[{i}]",
                                          f"is {len(data)} bytes; the limit is "
                                          f"{c.max_input_image_bytes}"))
        if len(p.adapters) > c.max_adapters_per_request:
            bad.append(FieldViolation("adapters", f"{len(p.adapters)} adapters; the limit is "
                                                  f"{c.max_adapters_per_request}"))
        for i, (name, scale) in enumerate(p.adapters[: c.max_adapters_per_request]):
            if not name.strip():
                bad.append(FieldViolation(f"adapters[{i}].model", "is required"))
            if not 0.0 <= scale <= MAX_ADAPTER_SCALE:
                bad.append(FieldViolation(f"adapters[{i}].scale",
                                          f"must be in 0..{MAX_ADAPTER_SCALE:g}, got {scale:g}"))
        if bad:
            raise InvalidArgument(bad)

    async def _request_models(self, p: GenerationParams) -> RequestModels:
        """Resolve ``model`` and ``adapters`` to loaded models (NOT_FOUND for unknown
        ones, INVALID_ARGUMENT for adapters that are not LoRA models of the request's
        base), and hold them."""
        named = await self.get_model(p.model) if p.model else None
        wanted = [(f"adapters[{i}].model", await self.get_model(name), scale)
                  for i, (name, scale) in enumerate(p.adapters)]
        if named is not None and named.kind == "lora":
            wanted.insert(0, ("model", named, 1.0))
            base_id = named.base_id
        elif named is not None:
            base_id = named.model_id
        elif wanted and wanted[0][1].kind == "lora":
            base_id = wanted[0][1].base_id
        else:
            base_id = self.config.default_model
        bad: list[FieldViolation] = []
        limit = self.config.max_adapters_per_request
        if len(wanted) > limit:
            bad.append(FieldViolation("adapters", f"{len(wanted)} adapters (counting a LoRA "
                                                  f"model in model); the limit is {limit}"))
        seen: set[str] = set()
        for where, entry, _ in wanted:
            if entry.kind != "lora":
                bad.append(FieldViolation(where, f"{entry.name} is a {entry.kind} model, not a "
                                                 "LoRA adapter; name it in model"))
            elif entry.base_id != base_id and f"models/{base_id}" not in \
                    entry.manifest.fits_bases:
                bad.append(FieldViolation(where, f"{entry.name} was trained on "
                                                 f"models/{entry.base_id}; this request's base "
                                                 f"is models/{base_id}"))
            elif entry.model_id in seen:
                bad.append(FieldViolation(where, f"{entry.name} is listed twice"))
            seen.add(entry.model_id)
        if bad:
            raise InvalidArgument(bad)
        held: list[LoadedModel] = []
        try:
            base = await self.registry.acquire(base_id)
            held.append(base)
            uses = []
            for _, entry, scale in wanted:
                lora = await self.registry.acquire(entry.model_id)
                held.append(lora)
                uses.append((lora, scale))
            own = [lora for lora, _ in uses if lora.own_text_encoders]
            if len(own) > 1:
                raise InvalidArgument.field(
                    "adapters", f"{own[0].entry.name} and {own[1].entry.name} both bring their "
                                "own trained text encoder; at most one adapter may")
        except BaseException:
            for model in held:
                self.registry.release(model)
            raise
        return RequestModels(
            model=base, encoder=own[0] if own else base,
            adapters=tuple(AdapterUse(lora.lora, scale) for lora, scale in uses),
            named=named if named is not None else base.entry, held=held)

    async def generate(self, p: GenerationParams, progress: bool = True) -> AsyncIterator:
        """Yield Progress and PreviewImages (when ``progress``), then one GenerationResult."""
        arrived = time.perf_counter()
        self.validate(p)
        models = await self._request_models(p)  # NOT_FOUND for another's model, before loads
        model = models.model
        job: Job | None = None
        try:
            given_guidance = p.guidance_scale is not None
            p = with_model_defaults(p, model.info)
            check_steps(p)
            check_for_model(model, p, given_guidance)
            make_scheduler = await asyncio.to_thread(
                scheduler_factory, p.scheduler, model.pipeline.scheduler.config,
                p.num_inference_steps if model.family.prediction != "flow" else None)
            queue = self.batcher.queue
            images = p.init_image or p.reference_images
            if images and not queue.has_room(self.decode_budget.waiting):
                # Refused before any image is decoded: a flood costs no memory.
                raise queue.refusal(f"generation queue is full ({queue.limit} requests)")
            queue.arriving(+1)  # being prepared: counts against the queue's room
            try:
                width, height, inputs, refs = await self._image_condition(model, p)
            finally:
                queue.arriving(-1)
            subject = await self.best_of_n.subject(models.named) \
                if p.candidates > p.num_images else None
            seed = p.seed if p.seed is not None else random.randrange(MAX_SEED)
            seeds = [(seed + i) % (MAX_SEED + 1) for i in range(p.candidates)]
            channel = EventChannel()
            job = Job(
                model=model, prompt=p.prompt, negative_prompt=p.negative_prompt,
                width=width, height=height, num_inference_steps=p.num_inference_steps,
                guidance_scale=p.guidance_scale, guidance_rescale=p.guidance_rescale,
                seeds=seeds, make_scheduler=make_scheduler, image_inputs=inputs,
                adapters=models.adapters, text_model=models.encoder, references=refs,
                reference_sizes=_reference_layout(model, inputs, width, height, refs),
                model_id=models.named.model_id, emit=channel.emit,
                preview_interval=p.preview_interval, report_progress=progress,
            )
            self.batcher.submit(job)
            async for event in channel.events():
                if isinstance(event, Progress):
                    yield event
                elif isinstance(event, Preview):
                    yield PreviewImages(event.step, await asyncio.to_thread(
                        _encode_all, event.images, seeds, "JPEG", 80))
                elif isinstance(event, Finished):
                    start = time.perf_counter()
                    pictures, kept_seeds, ranked = event.images, seeds, []
                    if subject is not None:
                        ranked = await self.best_of_n.rank(pictures, seeds, subject)
                        order = [i for i, _ in ranked[:p.num_images]]
                        pictures = [pictures[i] for i in order]
                        kept_seeds = [seeds[i] for i in order]
                    images = await asyncio.to_thread(_encode_all, pictures, kept_seeds,
                                                     p.output_format, p.quality)
                    for image, (_, score) in zip(images, ranked, strict=False):
                        image.subject_similarity = score
                    encode_s = time.perf_counter() - start
                    yield GenerationResult(
                        model=models.named.name, images=images,
                        queue_wait_s=event.queue_wait_s, denoise_s=event.denoise_s,
                        decode_s=event.decode_s + encode_s,
                        total_s=time.perf_counter() - arrived,
                        candidates=[(seeds[i], score) for i, score in ranked],
                    )
                    return
        finally:
            if job is not None and not job.done:
                self.batcher.cancel(job)
            for held in models.held:
                self.registry.release(held)

    async def _image_condition(self, model, p: GenerationParams):
        """(width, height, ImageInputs or None, references): the output size,
        defaulting to the model's native size, the init image's or the first
        reference's, and the images resized as the pipeline does."""
        info = model.info
        if not p.init_image and not p.reference_images:
            return (p.width or info.default_resolution, p.height or info.default_resolution,
                    None, [])
        limits = ImageLimits(self.config.max_input_image_bytes, self.config.max_input_image_side)
        # An image over the side limit is refused when decoded; it is priced at the limit.
        most = self.config.max_input_image_side ** 2
        cost = DECODE_BYTES_PER_PIXEL * sum(
            min(image_pixels(data), most)
            for data in (p.init_image, p.mask_image, *p.reference_images) if data)
        if cost > self.decode_budget.budget_bytes:
            raise InvalidArgument.field("reference_images", "the request's images together "
                                        "need more decode memory than max_decode_bytes")
        async with self.decode_budget.hold(cost):
            refs = await asyncio.to_thread(
                image_inputs.reference_inputs, p.reference_images, limits, info.size_multiple,
                MAX_REFERENCE_PIXELS) if p.reference_images else []
            if p.init_image:
                return (*await self._decoded_condition(model, p, limits), refs)
            return (p.width or refs[0].width, p.height or refs[0].height, None, refs)

    async def _decoded_condition(self, model, p: GenerationParams, limits: ImageLimits):
        info = model.info
        image, mask = await asyncio.to_thread(image_inputs.decode_inputs, p.init_image,
                                              p.mask_image, limits)
        width, height = image_inputs.output_size(image.size, p.width, p.height,
                                                 info.size_multiple)
        bad = [FieldViolation(name, f"init_image gives {value} px; it must be a multiple of 8 in "
                                    f"64..{self.config.max_resolution}; set {name}")
               for name, value, given in (("width", width, p.width), ("height", height, p.height))
               if not given and not 64 <= value <= self.config.max_resolution]
        if bad:
            raise InvalidArgument(bad)
        strength = p.strength if p.strength is not None else (
            INPAINT_STRENGTH if mask is not None else IMG2IMG_STRENGTH)
        if int(p.num_inference_steps * strength) < 1:
            raise InvalidArgument.field(
                "num_inference_steps", f"{p.num_inference_steps} steps at the default strength "
                                       f"{strength} leave none to run; use more")
        inputs = await asyncio.to_thread(image_inputs.resize_inputs, model.pipeline, image,
                                         mask, strength, width, height)
        return width, height, inputs


def _reference_layout(model, inputs, width: int, height: int, refs) -> tuple:
    """The (height, width) of each image a request appends to its tokens: the init
    image first where the family conditions on it that way (klein inpainting)."""
    leading = ((height, width),) if inputs is not None and \
        not model.family.samples_init_image else ()
    return leading + tuple((r.height, r.width) for r in refs)


def _encode_all(images, seeds, fmt: str, quality: int) -> list[GeneratedImage]:
    out = []
    for img, seed in zip(images, seeds, strict=True):
        if fmt == "PNG":
            data = encode_png(img)
        else:
            buffer = io.BytesIO()
            img.save(buffer, format=IMAGE_FORMATS[fmt], quality=quality)
            data = buffer.getvalue()
        out.append(GeneratedImage(data, fmt, img.width, img.height, seed))
    return out
