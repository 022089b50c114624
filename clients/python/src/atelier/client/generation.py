"""Generation clients: prompts to images, streamed progress, the model catalogue.

    from atelier.client import GenerationClient, save_images

    with GenerationClient("127.0.0.1:50052") as client:
        reply = client.generate("a photo of sks toy on the moon", model="models/demo-sks-toy",
                                num_images=2, steps=25, seed=7)
        save_images(reply.images, "out/")               # out/image-0.png, out/image-1.png
        edit = client.generate("a painting of sks toy", model="models/demo-sks-toy",
                               init_image="out/image-0.png", strength=0.6)
        placed = client.generate("this toy on a beach", model="models/tiny-klein",
                                 reference_images=["photos/toy.png"])  # FLUX.2 [klein]
        styled = client.generate("a photo of sks toy, ink style",
                                 adapters=["demo-sks-toy", ("ink-style", 0.7)])
        for model in client.list_models():
            print(model.name, model.kind)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path

from atelier.client.connection import AsyncServiceClient, ServiceClient
from atelier.client.enums import enum_value
from atelier.ports import local_target
from atelier.v1 import common_pb2, generation_pb2, generation_pb2_grpc, model_pb2


def generate_request(prompt: str, *, model: str = "", negative_prompt: str = "",
                     num_images: int = 1, width: int = 0, height: int = 0, steps: int = 0,
                     guidance_scale: float | None = None, guidance_rescale: float = 0.0,
                     seed: int | None = None, scheduler: str = "",
                     output_format: str | int | None = None, quality: int = 0,
                     init_image: bytes | str | Path | None = None,
                     mask_image: bytes | str | Path | None = None,
                     strength: float | None = None,
                     adapters: Iterable[str | tuple[str, float]] = (),
                     num_candidates: int | None = None,
                     reference_images: Iterable[bytes | str | Path] = (),
                     ) -> generation_pb2.GenerateRequest:
    """A GenerateRequest. Zero/empty/None fields take the server's defaults (its
    default model, the model's resolution, its step count, guidance 7.5, a random
    seed, PNG). ``output_format``: "png", "jpeg" or "webp". ``init_image`` (image to
    image) and ``mask_image`` (inpainting: white repaints) are encoded image bytes or
    a file path; ``strength`` in (0, 1] defaults to 0.8 (image to image) or 1.0
    (inpainting) on the server. ``adapters``: LoRA models over the request's base,
    each a name (scale 1) or a (name, scale) pair, scale in 0..2. ``num_candidates``
    (best of N, a fine-tuned model): generate this many and keep the ``num_images``
    most like the subject; the response's ``subject_similarity`` and ``candidates``
    give the scores and seeds. ``reference_images`` (FLUX.2 [klein]): images of the
    subject, a style or a scene the model conditions on, as bytes or paths."""
    request = generation_pb2.GenerateRequest(
        model=model, prompt=prompt, negative_prompt=negative_prompt, num_images=num_images,
        width=width, height=height, num_inference_steps=steps,
        guidance_rescale=guidance_rescale, scheduler=scheduler,
        output_format=enum_value(common_pb2.ImageFormat, output_format, "IMAGE_FORMAT_"),
        quality=quality, init_image=_image_bytes(init_image),
        mask_image=_image_bytes(mask_image),
        reference_images=[_image_bytes(image) for image in reference_images])
    if guidance_scale is not None:
        request.guidance_scale = guidance_scale
    if seed is not None:
        request.seed = seed
    if strength is not None:
        request.strength = strength
    if num_candidates is not None:
        request.num_candidates = num_candidates
    for adapter in adapters:
        name, scale = (adapter, None) if isinstance(adapter, str) else adapter
        ref = request.adapters.add(model=name)
        if scale is not None:
            ref.scale = scale
    return request


def parse_adapter(text: str) -> tuple[str, float]:
    """``NAME[:SCALE]`` (the CLI's ``--lora``) as (name, scale); scale 1 when absent."""
    name, sep, scale = text.rpartition(":")
    if not sep:
        return text, 1.0
    try:
        return name, float(scale)
    except ValueError:
        raise ValueError(f"{text!r}: the scale after ':' must be a number") from None


def _image_bytes(image: bytes | str | Path | None) -> bytes:
    if image is None:
        return b""
    return image if isinstance(image, bytes) else Path(image).read_bytes()


def model_name(model: str) -> str:
    """``models/<id>`` from either ``<id>`` or ``models/<id>``."""
    return model if model.startswith("models/") else f"models/{model}"


class GenerationClient(ServiceClient):
    """Sync client of GenerationService. Use as a context manager, or call close()."""

    stub_class = generation_pb2_grpc.GenerationServiceStub
    default_target = local_target("generation")

    def generate(self, prompt: str, *, timeout: float | None = None,
                 **fields) -> generation_pb2.GenerateResponse:
        """Generate ``num_images`` images for ``prompt``; fields as in generate_request()."""
        return self._conn.unary(self._stub.Generate, generate_request(prompt, **fields), timeout)

    def generate_stream(self, prompt: str, *, preview_interval_steps: int = 0,
                        timeout: float | None = None,
                        **fields) -> Iterator[generation_pb2.GenerateStreamResponse]:
        """Progress events (one per denoising step), optional previews, then the result."""
        request = generation_pb2.GenerateStreamRequest(
            request=generate_request(prompt, **fields),
            preview_interval_steps=preview_interval_steps)
        return self._conn.stream(self._stub.GenerateStream, request, timeout)

    def list_models(self, *, kind: str | int | None = None,
                    page_size: int = 0) -> Iterator[model_pb2.Model]:
        """Every model the service can serve (all pages); ``kind``: base, fine_tuned_lora..."""
        token = ""
        while True:
            page = self._conn.unary(self._stub.ListModels, generation_pb2.ListModelsRequest(
                page_size=page_size, page_token=token,
                kind=enum_value(model_pb2.ModelKind, kind, "MODEL_KIND_")))
            yield from page.models
            token = page.next_page_token
            if not token:
                return

    def get_model(self, name: str) -> model_pb2.Model:
        """One model by ``models/<id>`` (or ``<id>``)."""
        return self._conn.unary(self._stub.GetModel, generation_pb2.GetModelRequest(
            name=model_name(name))).model

    def delete_model(self, name: str) -> int:
        """Delete a fine-tuned model (manifest and weights); returns the objects removed.
        Every replica stops serving it within its refresh interval."""
        return self._conn.unary(self._stub.DeleteModel, generation_pb2.DeleteModelRequest(
            name=model_name(name))).deleted_objects



class AsyncGenerationClient(AsyncServiceClient):
    """asyncio client of GenerationService; the same calls as GenerationClient, awaited."""

    stub_class = generation_pb2_grpc.GenerationServiceStub
    default_target = local_target("generation")

    async def generate(self, prompt: str, *, timeout: float | None = None,
                       **fields) -> generation_pb2.GenerateResponse:
        return await self._conn.unary(self._stub.Generate, generate_request(prompt, **fields),
                                      timeout)

    def generate_stream(self, prompt: str, *, preview_interval_steps: int = 0,
                        timeout: float | None = None,
                        **fields) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        request = generation_pb2.GenerateStreamRequest(
            request=generate_request(prompt, **fields),
            preview_interval_steps=preview_interval_steps)
        return self._conn.stream(self._stub.GenerateStream, request, timeout)

    async def list_models(self, *, kind: str | int | None = None,
                          page_size: int = 0) -> list[model_pb2.Model]:
        models, token = [], ""
        while True:
            page = await self._conn.unary(self._stub.ListModels, generation_pb2.ListModelsRequest(
                page_size=page_size, page_token=token,
                kind=enum_value(model_pb2.ModelKind, kind, "MODEL_KIND_")))
            models += page.models
            token = page.next_page_token
            if not token:
                return models

    async def get_model(self, name: str) -> model_pb2.Model:
        return (await self._conn.unary(self._stub.GetModel, generation_pb2.GetModelRequest(
            name=model_name(name)))).model

    async def delete_model(self, name: str) -> int:
        return (await self._conn.unary(self._stub.DeleteModel, generation_pb2.DeleteModelRequest(
            name=model_name(name)))).deleted_objects
