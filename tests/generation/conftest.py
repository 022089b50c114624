"""A real generation service on loopback, and diffusers' pipeline as the reference."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from atelier.generation import app
from atelier.generation.schedulers import SCHEDULERS
from atelier.v1 import generation_pb2_grpc
from tests.kit.server_thread import ServerThread, start_app

#: Fidelity tolerance on decoded 8-bit pixels (the issue's 2/255).
TOLERANCE = 2


def start_generation(tmp_path, model_cache, storage=None, ready_timeout: float = 120,
                     **engine) -> ServerThread:
    """A generation service on a local store under tmp_path, or on ``storage``."""
    return start_app(app, storage=storage or {"local_root": tmp_path / "store",
                                              "bucket": "atelier-test"},
                     model_cache=model_cache, section="generation", engine=engine,
                     ready_timeout=ready_timeout)


@pytest.fixture(scope="module")
def generation_server(tmp_path_factory, model_cache):
    thread = start_generation(tmp_path_factory.mktemp("gen"), model_cache)
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def stub(generation_server):
    with grpc.insecure_channel(generation_server.target) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


def decode(image) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(image.data)).convert("RGB"))


_reference_pipes: dict = {}


def reference_pipeline(path, cls_name: str = "StableDiffusionPipeline"):
    """diffusers' own pipeline ``cls_name`` over the model at ``path`` (cached)."""
    import diffusers

    key = (str(path), cls_name)
    if key not in _reference_pipes:
        cls = getattr(diffusers, cls_name)
        extra = {} if "XL" in cls_name else {"safety_checker": None,
                                             "requires_safety_checker": False}
        pipe = cls.from_pretrained(path, use_safetensors=True, **extra)
        pipe.set_progress_bar_config(disable=True)
        _reference_pipes[key] = pipe
    return _reference_pipes[key]


def reference_images(pipe, *, prompt, seed, num_images=1, negative_prompt=None, steps=10,
                     guidance_scale=7.5, guidance_rescale=0.0, scheduler="", width=None,
                     height=None, **inputs) -> list[np.ndarray]:
    """What diffusers' pipeline makes for these parameters, as 8-bit pixels. Image i is
    drawn with its own generator seeded seed + i (atelier's documented semantics).
    ``inputs``: image, mask_image, strength, for the image-conditioned pipelines."""
    original = pipe.scheduler
    if scheduler:
        cls, overrides = SCHEDULERS[scheduler]
        pipe.scheduler = cls.from_config(original.config, **overrides)
    kwargs = dict(inputs)
    if guidance_rescale:
        kwargs["guidance_rescale"] = guidance_rescale
    if width is not None or height is not None:
        kwargs.update(width=width, height=height)
    try:
        out = pipe(prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps,
                   guidance_scale=guidance_scale, num_images_per_prompt=num_images,
                   generator=[torch.Generator().manual_seed(seed + i) for i in range(num_images)],
                   output_type="np", **kwargs).images
    finally:
        pipe.scheduler = original
    return [(img * 255).round().astype(np.uint8) for img in out]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def start_picture(width: int = 128, height: int = 128) -> Image.Image:
    """A deterministic picture to start from: gradients and a disc."""
    y, x = np.mgrid[0:height, 0:width]
    r = (x * 255 // max(1, width - 1)).astype(np.uint8)
    g = (y * 255 // max(1, height - 1)).astype(np.uint8)
    disc = ((x - width / 2) ** 2 + (y - height / 2) ** 2) < (min(width, height) / 4) ** 2
    b = np.where(disc, 230, 40).astype(np.uint8)
    return Image.fromarray(np.stack([r, g, b], axis=-1), "RGB")


def mask_picture(width: int = 128, height: int = 128) -> Image.Image:
    """White (repaint) over the middle half, black elsewhere."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return Image.fromarray(mask, "L")


def assert_close(ours: np.ndarray, reference: np.ndarray) -> None:
    assert ours.shape == reference.shape
    diff = int(np.abs(ours.astype(int) - reference.astype(int)).max())
    assert diff <= TOLERANCE, f"max pixel difference {diff} > {TOLERANCE}"
