"""The contract every model family keeps, and the conditioning rows it makes.

A family is one module under ``atelier.models.families`` with one :class:`Family`
subclass. It says, in one place, what differs between denoisers:

- how prompts become conditioning (``encode_prompts``: :class:`Conditioning` rows,
  one per prompt, that the runner stacks for a batched forward);
- how latents are made and laid out (``initial_latents``: spatial ``(1, C, h, w)``
  for a UNet, packed tokens ``(1, h*w, C)`` for a DiT) and turned back into
  pixels (``decode``);
- how the denoiser is called on a batch of rows (``forward``), including any
  tokens a request appends to its sequence (reference images);
- how a request's schedule is set (``set_timetable``: a flow model's
  resolution-dependent shift) and what the denoiser predicts (``prediction``:
  ``epsilon``, ``v_prediction`` or ``flow``), hence the scheduler and the
  training target.

Every method runs on the worker thread, under ``torch.inference_mode`` in
generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: What a request asks for, by the images it carries.
TEXT_TO_IMAGE, IMAGE_TO_IMAGE, INPAINT = "text-to-image", "image-to-image", "inpaint"
MODES = (TEXT_TO_IMAGE, IMAGE_TO_IMAGE, INPAINT)


@dataclass
class Conditioning:
    """One prompt's conditioning, each tensor with a batch dimension of 1."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None  # SDXL: the pooled text embedding
    time_ids: torch.Tensor | None = None  # SDXL: add_time_ids
    references: torch.Tensor | None = None  # klein: packed reference-image tokens
    positions: torch.Tensor | None = None  # klein: (tokens, 4) image + reference ids


@dataclass
class Blend:
    """Inpainting by latent blending: after every step, keep ``image_latents`` (noised
    to the next step's level with ``noise``) where ``mask`` is 0."""

    mask: torch.Tensor
    image_latents: torch.Tensor
    noise: torch.Tensor


@dataclass
class ImageStart:
    """How an image-conditioned sequence starts: its first latents, the index of its
    first step in the scheduler's timetable, and how the image stays in it."""

    latents: torch.Tensor
    first_index: int
    blend: Blend | None = None
    extra_channels: torch.Tensor | None = None  # an inpainting UNet's mask + masked latents


@dataclass(frozen=True)
class FamilyInfo:
    """What requests need to know of a loaded model of a family."""

    family: str
    default_resolution: int
    """Native output size, pixels."""
    size_multiple: int
    """Width and height must be multiples of this (VAE factor, times the patch)."""
    modes: tuple[str, ...]
    """The request modes the model takes (text-to-image, image-to-image, inpaint)."""
    default_steps: int = 30
    default_guidance: float = 7.5
    guidance: bool = True
    """False for a guidance-distilled model: one row per image, no scale."""
    reference_images: bool = False
    """Whether the model conditions on reference images (klein's multi-reference)."""


class Family:
    """A model family: subclasses override what their denoiser does differently."""

    name = ""
    pipeline_class_name = ""
    class_prefix = ""
    """Every diffusers pipeline class of the family starts with it."""
    denoiser_attribute = "unet"
    prediction = "epsilon"
    size_conditioned = False
    """Whether a prompt's conditioning depends on the image size (SDXL's time ids);
    when not, one encoding of a text serves every request (the empty negative prompt)."""

    def denoiser(self, pipe) -> torch.nn.Module:
        return getattr(pipe, self.denoiser_attribute)

    def info(self, pipe) -> FamilyInfo:
        raise NotImplementedError

    def is_guided(self, pipe, guidance_scale: float) -> bool:
        """Whether a request at this scale runs an unconditional row too."""
        return guidance_scale > 1.0

    def encode_prompts(self, pipe, prompts: list[str], negatives: list[str | None],
                       sizes: list[tuple[int, int]], device) -> tuple[
                           list[Conditioning], list[Conditioning | None]]:
        """Conditioning for each prompt, and for each non-None negative prompt (the
        unconditional half of a guided request); ``sizes`` are the (height, width)
        outputs."""
        raise NotImplementedError

    def request_conditioning(self, pipe, cond: Conditioning, uncond: Conditioning | None,
                             size: tuple[int, int], references: list[torch.Tensor],
                             device) -> tuple[Conditioning, Conditioning | None]:
        """A request's rows with what it adds beyond its prompts (klein: its reference
        images' tokens and the forward's position ids). ``references``: preprocessed
        ``(1, 3, H, W)`` images in [-1, 1]."""
        return cond, uncond

    def text_states(self, text_encoders: list, input_ids: list[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training: (hidden states, pooled embedding or None) of token ids already
        made by the family's tokenizers, one tensor per encoder; gradients flow into
        the encoders that train."""
        raise NotImplementedError

    def training_forward(self, denoiser, noisy: torch.Tensor, timesteps: torch.Tensor,
                         hidden: torch.Tensor, pooled: torch.Tensor | None,
                         time_ids: torch.Tensor | None) -> torch.Tensor:
        """Training: the denoiser's prediction for a batch of noisy latents, in their
        layout (``timesteps``: the scheduler's, so sigma x 1000 for a flow model)."""
        raise NotImplementedError

    text_encoders_train = True
    """Training: whether a job may train the text encoders; when not, every prompt
    is encoded once per job and the encoder leaves memory (``prompt_states``)."""

    def prompt_states(self, tokenizer, text_encoder, texts: list[str], device) -> torch.Tensor:
        """Training with a frozen encoder: the hidden states of ``texts``, as the
        pipeline encodes them (families whose encoders never train)."""
        raise NotImplementedError

    def training_latents(self, vae, latent_dist, generator: torch.Generator) -> torch.Tensor:
        """Training: the float32 latents an image row trains on, from the VAE's posterior
        of its image (any draw from ``generator``)."""
        raise NotImplementedError

    lora_presets: dict[str, Any] = {}
    """Training: peft ``target_modules`` of the denoiser per LoRA preset
    (``attention``, ``attention_mlp``); ``default_lora_preset`` when a job names none."""
    default_lora_preset = "attention"

    def sigma_shift_mu(self, image_tokens: int) -> float | None:
        """Flow families: the exponent by which the sampler shifts sigmas for an image of
        ``image_tokens`` latent tokens (training's ``resolution_shift``); None: no shift."""
        return None

    def prompt_token_count(self, tokenizer, text: str) -> tuple[int, int]:
        """(tokens, limit) of a prompt as the family's tokenizer counts it."""
        return len(tokenizer(text).input_ids), tokenizer.model_max_length

    def batch_conditioning(self, rows: list[Conditioning]) -> dict:
        """The denoiser's keyword arguments for a batch laid out as ``rows``."""
        raise NotImplementedError

    def pad_conditioning(self, kwargs: dict, rows: int) -> dict:
        """``kwargs`` padded to ``rows`` rows with copies of the last one."""
        raise NotImplementedError

    def forward(self, denoiser, sample: torch.Tensor, timesteps: torch.Tensor,
                conditioning: dict) -> torch.Tensor:
        """The denoiser's prediction for every row of ``sample``."""
        raise NotImplementedError

    def set_timetable(self, pipe, scheduler, steps: int, size: tuple[int, int],
                      device) -> None:
        """Set a fresh scheduler's timesteps for one image of ``size`` (h, w)."""
        scheduler.set_timesteps(steps, device=device)

    def latent_size(self, pipe, size: tuple[int, int]) -> tuple[int, int]:
        scale = pipe.vae_scale_factor
        return size[0] // scale, size[1] // scale

    samples_init_image = True
    """Image-conditioned requests: the init image's VAE posterior is sampled per image
    with its generator (SD); False: it is encoded once, at its mode, and joins the
    request's reference tokens (klein)."""

    def start_from_image(self, pipe, scheduler, condition, cond: Conditioning,
                         moments: dict | None, size: tuple[int, int], steps: int,
                         generator, device, dtype) -> ImageStart:
        """Image to image and inpainting: the sequence's start, as the family's image
        pipelines do it (``moments``: the VAE posterior of the init and masked images,
        for families that sample them)."""
        raise NotImplementedError

    def initial_latents(self, pipe, scheduler, size: tuple[int, int], generator,
                        device, dtype) -> torch.Tensor:
        """Text to image: the first latents, drawn from ``generator`` as the pipeline."""
        raise NotImplementedError

    def decode(self, pipe, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Pixels in [-1, 1], ``(B, 3, H, W)``, of a batch of final latents."""
        raise NotImplementedError

    def preview(self, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """A cheap ``(B, h, w, 3)`` float preview in [0, 1] of latents mid-schedule."""
        raise NotImplementedError


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with copies of its last row appended, to ``rows`` rows."""
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t[-1:].expand(rows - t.shape[0], *t.shape[1:])])


def cat_rows(rows: list[Any], name: str) -> torch.Tensor:
    return torch.cat([getattr(r, name) for r in rows])
