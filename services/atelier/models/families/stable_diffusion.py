"""Stable Diffusion 1.x/2.x and SDXL: UNets over spatial latents.

- ``stable-diffusion``: epsilon or v-prediction (the scheduler config says which).
  One CLIP text encoder; the UNet is conditioned on its last hidden state.
- ``stable-diffusion-xl``: two text encoders (CLIP-L and a CLIP with projection).
  The UNet is conditioned on both penultimate hidden states side by side, plus
  ``added_cond_kwargs``: the second encoder's pooled embedding and the six
  ``add_time_ids`` (original size, crop top-left, target size).

Each encodes a batch of prompts in one pass per text encoder, exactly as its
diffusers pipeline does for one prompt. Latents are ``(1, 4, h, w)`` at 1/8 of
the image; a 9-channel UNet is an inpainting one (mask and masked-image latents
as extra input channels).
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor

from atelier.models.families.base import (
    INPAINT,
    MODES,
    Blend,
    Conditioning,
    Family,
    FamilyInfo,
    ImageStart,
    cat_rows,
    pad_rows,
)

#: UNet input layouts: latents only, or latents + mask + masked-image latents.
LATENT_CHANNELS_ONLY = 4
INPAINTING_CHANNELS = 9

#: Linear map from SD latent channels to RGB, for cheap previews.
_LATENT_RGB = torch.tensor([
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
])


class StableDiffusion(Family):
    name = "stable-diffusion"
    pipeline_class_name = "StableDiffusionPipeline"
    class_prefix = "StableDiffusion"

    def info(self, pipe) -> FamilyInfo:
        channels = pipe.unet.config.in_channels
        modes = (INPAINT,) if channels == INPAINTING_CHANNELS else MODES
        return FamilyInfo(self.name, pipe.unet.config.sample_size * pipe.vae_scale_factor,
                          pipe.vae_scale_factor, modes)

    def is_guided(self, pipe, guidance_scale: float) -> bool:
        """As the pipelines: guidance applies when the scale exceeds 1 and the UNet has
        no guidance embedding (``time_cond_proj_dim``)."""
        return guidance_scale > 1.0 and \
            getattr(pipe.unet.config, "time_cond_proj_dim", None) is None

    def encode_prompts(self, pipe, prompts, negatives, sizes, device):
        # The pipeline encodes "" for an empty negative prompt.
        texts = prompts + [n for n in negatives if n is not None]
        encoder = pipe.text_encoder
        tokens = _tokens(pipe.tokenizer, texts)
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        hidden = encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        hidden = hidden.to(dtype=encoder.dtype, device=device)
        rows = [Conditioning(hidden[i : i + 1]) for i in range(len(texts))]
        return rows[: len(prompts)], _spread(negatives, rows[len(prompts):])

    def batch_conditioning(self, rows: list[Conditioning]) -> dict:
        kwargs: dict = {"encoder_hidden_states": cat_rows(rows, "hidden")}
        if rows[0].pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": cat_rows(rows, "pooled"),
                                           "time_ids": cat_rows(rows, "time_ids")}
        return kwargs

    def pad_conditioning(self, kwargs: dict, rows: int) -> dict:
        out = {"encoder_hidden_states": pad_rows(kwargs["encoder_hidden_states"], rows)}
        if "added_cond_kwargs" in kwargs:
            out["added_cond_kwargs"] = {k: pad_rows(v, rows)
                                        for k, v in kwargs["added_cond_kwargs"].items()}
        return out

    def forward(self, denoiser, sample, timesteps, conditioning):
        return denoiser(sample, timesteps, **conditioning, return_dict=False)[0]

    def text_states(self, text_encoders, input_ids):
        return text_encoders[0](input_ids[0])[0], None

    lora_presets = {"attention": ["to_q", "to_k", "to_v", "to_out.0"],
                    "attention_mlp": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj",
                                      "ff.net.2"]}

    def training_latents(self, vae, latent_dist, generator):
        return (latent_dist.sample(generator=generator) * vae.config.scaling_factor).float()

    def training_forward(self, denoiser, noisy, timesteps, hidden, pooled, time_ids):
        kwargs = {}
        if pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        return denoiser(noisy, timesteps, hidden, return_dict=False, **kwargs)[0]

    def initial_latents(self, pipe, scheduler, size, generator, device, dtype):
        shape = (1, pipe.unet.config.in_channels, *self.latent_size(pipe, size))
        noise = randn_tensor(shape, generator=generator, device=torch.device(device),
                             dtype=dtype)
        return noise * scheduler.init_noise_sigma

    def start_from_image(self, pipe, scheduler, condition, cond, moments, size, steps,
                         generator, device, dtype):
        """The schedule from ``strength`` on, as the pipelines slice it; the init image's
        latents (sampled) noised to its first timestep; for inpainting the mask and the
        masked image's latents (an inpainting UNet's extra channels), or the blend of an
        ordinary UNet. Random draws in the pipelines' order."""
        c = condition
        t_start = max(steps - min(int(steps * c.strength), steps), 0)
        first_index = t_start * getattr(scheduler, "order", 1)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(first_index)
        first = scheduler.timesteps[first_index : first_index + 1]
        sf = pipe.vae.config.scaling_factor
        latent_size = self.latent_size(pipe, size)
        shape = (1, pipe.vae.config.latent_channels, *latent_size)
        inpaint_unet = pipe.unet.config.in_channels == INPAINTING_CHANNELS
        from_noise = c.inpaint and c.strength == 1.0
        image_latents = None
        if not from_noise or (c.inpaint and not inpaint_unet):
            image_latents = sample_posterior(moments["image"], generator, sf, dtype)
        noise = randn_tensor(shape, generator=generator, device=torch.device(device),
                             dtype=dtype)
        latents = noise * scheduler.init_noise_sigma if from_noise else \
            scheduler.add_noise(image_latents, noise, first)
        start = ImageStart(latents, first_index)
        if c.inpaint:
            masked = sample_posterior(moments["masked"], generator, sf, dtype)
            mask = torch.nn.functional.interpolate(c.mask, size=latent_size).to(device, dtype)
            if inpaint_unet:
                start.extra_channels = torch.cat([mask, masked], dim=1)
            else:
                start.blend = Blend(mask, image_latents, noise)
        return start

    def decode(self, pipe, latents, size):
        latents = latents.to(pipe.vae.dtype)
        return pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]

    def preview(self, latents, size):
        rgb = torch.einsum("bchw,cr->bhwr", latents.float().cpu(), _LATENT_RGB)
        return ((rgb + 1) / 2).clamp(0, 1)


class StableDiffusionXL(StableDiffusion):
    name = "stable-diffusion-xl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    class_prefix = "StableDiffusionXL"
    size_conditioned = True

    def text_states(self, text_encoders, input_ids):
        return sdxl_text_states(zip(text_encoders, input_ids, strict=True))

    def encode_prompts(self, pipe, prompts, negatives, sizes, device):
        # An empty negative prompt is all zeros when the model asks for it (SDXL base).
        zero_empty = bool(pipe.config.get("force_zeros_for_empty_prompt", True))
        encoded = [n for n in negatives if n is not None and not (zero_empty and n == "")]
        texts = prompts + encoded
        hidden, pooled = sdxl_text_states(
            (encoder, _tokens(tokenizer, texts).input_ids.to(device))
            for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder),
                                       (pipe.tokenizer_2, pipe.text_encoder_2)))
        dtype = pipe.text_encoder_2.dtype
        hidden = hidden.to(dtype=dtype, device=device)
        pooled = pooled.to(dtype=dtype, device=device)

        def row(i: int, size: tuple[int, int]) -> Conditioning:
            return Conditioning(hidden[i : i + 1], pooled[i : i + 1],
                                time_ids(size, dtype, device))

        conds = [row(i, size) for i, size in enumerate(sizes[: len(prompts)])]
        uncond: list[Conditioning | None] = []
        k = len(prompts)
        for negative, cond, size in zip(negatives, conds, sizes, strict=True):
            if negative is None:
                uncond.append(None)
            elif zero_empty and negative == "":
                uncond.append(Conditioning(torch.zeros_like(cond.hidden),
                                           torch.zeros_like(cond.pooled), cond.time_ids))
            else:
                uncond.append(row(k, size))
                k += 1
        return conds, uncond


def sample_posterior(moments: torch.Tensor, generator, scaling_factor: float,
                     dtype) -> torch.Tensor:
    """A draw from the VAE posterior with this image's generator, as the pipelines'
    ``retrieve_latents`` (sample mode), scaled."""
    return (DiagonalGaussianDistribution(moments).sample(generator) * scaling_factor).to(dtype)


def sdxl_text_states(encoders_and_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning of one batch of token ids per encoder: both encoders'
    penultimate hidden states side by side, and the projection encoder's pooled
    embedding. Shared by generation (no gradients) and training (gradients flow
    into the encoders that train)."""
    parts, pooled = [], None
    for encoder, input_ids in encoders_and_ids:
        out = encoder(input_ids, output_hidden_states=True)
        if out[0].ndim == 2:  # the projection encoder's pooled output
            pooled = out[0]
        parts.append(out.hidden_states[-2])
    return torch.cat(parts, dim=-1), pooled


def time_ids(size: tuple[int, int], dtype, device) -> torch.Tensor:
    """SDXL's micro-conditioning for an uncropped image generated at its own size:
    original size, crop top-left (0, 0), target size."""
    height, width = size
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)


def _tokens(tokenizer, texts: list[str]):
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt")


def _spread(negatives: list[str | None], rows: list[Conditioning]) -> list[Conditioning | None]:
    it = iter(rows)
    return [None if n is None else next(it) for n in negatives]
