"""Model families the generation service serves, and each one's text conditioning.

- ``stable-diffusion``: SD 1.x and 2.x (epsilon or v-prediction; the scheduler
  config says which). One CLIP text encoder; the UNet is conditioned on its last
  hidden state.
- ``stable-diffusion-xl``: two text encoders (CLIP-L and a CLIP with projection).
  The UNet is conditioned on both penultimate hidden states side by side, plus
  ``added_cond_kwargs``: the second encoder's pooled embedding and the six
  ``add_time_ids`` (original size, crop top-left, target size).

Each family encodes a batch of prompts in one pass per text encoder, exactly as
its diffusers pipeline does for one prompt, and describes a request's
conditioning as :class:`Conditioning` rows that the runner concatenates for a
batched UNet forward (:func:`unet_conditioning`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atelier.models.pipelines import SDXL, family_of, sdxl_text_states

#: UNet input layouts: latents only, or latents + mask + masked-image latents.
LATENT_CHANNELS_ONLY = 4
INPAINTING_CHANNELS = 9


@dataclass
class Conditioning:
    """One prompt's conditioning, each tensor with a batch dimension of 1."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None  # SDXL: the pooled text embedding
    time_ids: torch.Tensor | None = None  # SDXL: add_time_ids


def encode_prompts(pipe, prompts: list[str], negatives: list[str | None],
                   sizes: list[tuple[int, int]], device) -> tuple[
                       list[Conditioning], list[Conditioning | None]]:
    """Conditioning for each prompt, and for each non-None negative prompt (the
    unconditional half of a guided request); ``sizes`` are the (height, width)
    outputs, for SDXL's time ids."""
    if family_of(pipe) == SDXL:
        return _encode_sdxl(pipe, prompts, negatives, sizes, device)
    return _encode_sd(pipe, prompts, negatives, device)


def unet_conditioning(rows: list[Conditioning]) -> dict:
    """The UNet keyword arguments for a batch laid out as ``rows``."""
    kwargs: dict = {"encoder_hidden_states": torch.cat([r.hidden for r in rows])}
    if rows[0].pooled is not None:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.cat([r.pooled for r in rows]),
            "time_ids": torch.cat([r.time_ids for r in rows]),
        }
    return kwargs


def _tokens(tokenizer, texts: list[str]):
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt")


def _encode_sd(pipe, prompts, negatives, device):
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


def _encode_sdxl(pipe, prompts, negatives, sizes, device):
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
        return Conditioning(hidden[i : i + 1], pooled[i : i + 1], time_ids(size, dtype, device))

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


def time_ids(size: tuple[int, int], dtype, device) -> torch.Tensor:
    """SDXL's micro-conditioning for an uncropped image generated at its own size:
    original size, crop top-left (0, 0), target size."""
    height, width = size
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)


def _spread(negatives: list[str | None], rows: list[Conditioning]) -> list[Conditioning | None]:
    it = iter(rows)
    return [None if n is None else next(it) for n in negatives]
