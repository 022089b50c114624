"""A generation request as the worker thread sees it, and the events it reports.

A :class:`Job` is one GenerateRequest after validation: ``len(seeds)`` images of
one prompt with one set of parameters, and for image-conditioned requests the
preprocessed :class:`ImageCondition`. Its events go back through the kit's
event vocabulary (``kit/work_queue.py``): Progress and Preview, then Finished
(final) or Failed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from atelier.kit.work_queue import WorkItem
from atelier.models.families.base import IMAGE_TO_IMAGE, INPAINT, MODES, TEXT_TO_IMAGE

__all__ = ["IMAGE_TO_IMAGE", "INPAINT", "MODES", "TEXT_TO_IMAGE", "Job"]

_SERIALS = itertools.count()


@dataclass
class Progress:
    step: int
    total_steps: int
    batch_size: int


@dataclass
class Preview:
    step: int
    images: list  # PIL images, 1/8 of the output size


@dataclass
class Finished:
    images: list  # PIL images, in request order
    queue_wait_s: float
    denoise_s: float
    decode_s: float
    final = True


@dataclass
class ImageCondition:
    """An init image (and for inpainting, a mask), preprocessed as the pipelines do."""

    image: torch.Tensor  # (1, 3, H, W) in [-1, 1], float32
    strength: float
    mask: torch.Tensor | None = None  # (1, 1, H, W), binarised: 1 repaints
    masked_image: torch.Tensor | None = None  # image where the mask keeps, 0 elsewhere

    @property
    def inpaint(self) -> bool:
        return self.mask is not None


@dataclass
class ImageInputs:
    """A request's init image and mask as decoded and resized (PIL images), before
    the worker makes them tensors (``ImageCondition``)."""

    image: Any
    strength: float
    mask: Any = None

    @property
    def inpaint(self) -> bool:
        return self.mask is not None


@dataclass
class Reference:
    """A reference image as decoded (PIL), and the size it is cropped to."""

    image: Any
    width: int
    height: int


@dataclass(eq=False, kw_only=True)
class Job(WorkItem):
    """One request: ``len(seeds)`` images of one prompt with one set of parameters."""

    model: Any  # registry.LoadedModel whose UNet runs: a base or a full fine-tune
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    guidance_rescale: float
    seeds: list[int]
    make_scheduler: Callable[[], Any]
    condition: ImageCondition | None = None  # made from image_inputs on the worker
    image_inputs: ImageInputs | None = None
    adapters: tuple = ()  # adapters.AdapterUse, applied to every row of this request
    references: list = field(default_factory=list)  # Reference, then tensors on the worker
    reference_sizes: tuple = ()  # (height, width) of each reference
    text_model: Any = None  # the LoadedModel whose text encoders encode; None: ``model``
    model_id: str = ""  # what the request named, for metrics; "": ``model``'s id
    preview_interval: int = 0
    report_progress: bool = True
    serial: int = field(default_factory=lambda: next(_SERIALS))
    start_time: float = 0.0
    first_step_time: float = 0.0
    last_step_time: float = 0.0
    images: dict[int, Any] = field(default_factory=dict)
    decode_s: float = 0.0

    @property
    def mode(self) -> str:
        given = self.condition if self.condition is not None else self.image_inputs
        if given is None:
            return TEXT_TO_IMAGE
        return INPAINT if given.inpaint else IMAGE_TO_IMAGE

    @property
    def encoder(self) -> Any:
        """The LoadedModel whose pipeline encodes this request's prompt."""
        return self.text_model if self.text_model is not None else self.model

    @property
    def group_key(self) -> tuple:
        """Requests with equal keys share denoiser forwards: one denoiser, one latent
        size, one reference layout (klein's rows share their position ids). LoRA
        requests over one base share it, whatever their adapters."""
        return (id(self.model), self.height, self.width, self.reference_sizes)

    @property
    def adapter_key(self) -> tuple:
        """The request's adapters and scales (requests split by it when adapters are
        not mixed in one forward)."""
        return tuple((u.adapter.name, u.scale) for u in self.adapters)
