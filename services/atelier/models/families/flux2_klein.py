"""FLUX.2 [klein]: a flow-matching transformer over packed latent tokens.

- **Prompts.** Each prompt is wrapped in the Qwen3 chat template (thinking off),
  padded to ``MAX_SEQUENCE_LENGTH`` tokens, and encoded by the Qwen3 text
  encoder; the conditioning is its hidden states at layers 9, 18 and 27 side by
  side (``TEXT_LAYERS``), so the joint attention width is three encoder widths.
- **Latents.** The VAE's latents are patchified 2x2 and normalised by its
  batch-norm statistics; a ``(1, 4C, h, w)`` grid is packed into ``(1, h*w, 4C)``
  tokens with 4-axis position ids (T, H, W, L). Images are multiples of 16 px.
- **Reference images** (multi-reference conditioning) are VAE-encoded at their
  mode, packed the same way and appended to the image tokens, each with its own
  T coordinate (10, 20, ...); only the image tokens' prediction is kept.
- **Denoiser.** ``Flux2Transformer2DModel`` predicts the flow velocity; the
  timestep it gets is sigma (``t / 1000``). Every row of a forward shares the
  rotary position ids, so a forward holds one image size and one reference
  layout (the generation group key says so).
- **Schedule.** ``FlowMatchEulerDiscreteScheduler`` over ``linspace(1, 1/n, n)``
  shifted by ``mu``, which grows with the image's token count and the step count.
- **Guidance.** The ``base`` model runs true classifier-free guidance (a negative
  prompt's row beside the prompt's); the distilled model (``is_distilled``) one
  row per image and no scale.
- **Inpainting** as ``Flux2KleinInpaintPipeline``: the init image's latents (at
  their mode) are the first reference (T 10) and, noised to the schedule's start
  at ``strength``, the first latents; after every step the latents outside the
  mask are the init image's, noised to the next step's sigma.

Packing, ids and the VAE normalisation are the pipeline's own static methods,
so the tokens are the pipeline's bit for bit.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from diffusers import Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from diffusers.utils.torch_utils import randn_tensor

from atelier.models.families.base import (
    INPAINT,
    TEXT_TO_IMAGE,
    Blend,
    Conditioning,
    Family,
    FamilyInfo,
    ImageStart,
    cat_rows,
    pad_rows,
)

#: Encoder layers whose hidden states condition the transformer.
TEXT_LAYERS = (9, 18, 27)
#: Prompt length in tokens, chat template included (prompts are padded to it).
MAX_SEQUENCE_LENGTH = 512
#: Default sampling steps of the base and the distilled model.
BASE_STEPS, DISTILLED_STEPS = 50, 4
#: Reference images larger than this many pixels are scaled down to it first.
MAX_REFERENCE_PIXELS = 1024 * 1024
#: T coordinate spacing of reference images in the position ids.
REFERENCE_T_SCALE = 10
#: LoRA targets: the attention linears of both block kinds (a peft regex); the single
#: blocks fuse attention with the MLP, so their fused projections count as attention.
ATTENTION_TARGETS = (r".*(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|"
                     r"to_add_out|to_qkv_mlp_proj|single_transformer_blocks\.\d+\.attn\.to_out)")
#: ...and the double blocks' MLP linears too (the default).
LORA_TARGETS = (r".*(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|"
                r"to_qkv_mlp_proj|single_transformer_blocks\.\d+\.attn\.to_out|"
                r"ff\.linear_in|ff\.linear_out|ff_context\.linear_in|ff_context\.linear_out)")


class Flux2Klein(Family):
    name = "flux2-klein"
    pipeline_class_name = "Flux2KleinPipeline"
    class_prefix = "Flux2Klein"
    denoiser_attribute = "transformer"
    prediction = "flow"
    samples_init_image = False

    def info(self, pipe) -> FamilyInfo:
        distilled = bool(pipe.config.get("is_distilled", False))
        return FamilyInfo(
            self.name, int(pipe.vae.config.sample_size), pipe.vae_scale_factor * 2,
            (TEXT_TO_IMAGE, INPAINT),
            default_steps=DISTILLED_STEPS if distilled else BASE_STEPS,
            default_guidance=1.0 if distilled else 4.0, guidance=not distilled,
            reference_images=True)

    def is_guided(self, pipe, guidance_scale: float) -> bool:
        return guidance_scale > 1.0 and not pipe.config.get("is_distilled", False)

    @staticmethod
    def templated(tokenizer, text: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             tokenize=False, add_generation_prompt=True,
                                             enable_thinking=False)

    def prompt_token_count(self, tokenizer, text: str) -> tuple[int, int]:
        return len(tokenizer(self.templated(tokenizer, text)).input_ids), MAX_SEQUENCE_LENGTH

    text_encoders_train = False
    lora_presets = {"attention": ATTENTION_TARGETS, "attention_mlp": LORA_TARGETS}
    default_lora_preset = "attention_mlp"

    def prompt_states(self, tokenizer, text_encoder, texts, device):
        tokens = tokenizer([self.templated(tokenizer, t) for t in texts],
                           return_tensors="pt", padding="max_length", truncation=True,
                           max_length=MAX_SEQUENCE_LENGTH)
        out = text_encoder(input_ids=tokens.input_ids.to(device),
                           attention_mask=tokens.attention_mask.to(device),
                           output_hidden_states=True, use_cache=False)
        layers = torch.stack([out.hidden_states[k] for k in TEXT_LAYERS], dim=1)
        batch, count, length, width = layers.shape
        hidden = layers.permute(0, 2, 1, 3).reshape(batch, length, count * width)
        return hidden.to(dtype=text_encoder.dtype, device=device)

    def encode_prompts(self, pipe, prompts, negatives, sizes, device):
        texts = prompts + [n for n in negatives if n is not None]
        hidden = self.prompt_states(pipe.tokenizer, pipe.text_encoder, texts, device)
        rows = [Conditioning(hidden[i : i + 1]) for i in range(len(texts))]
        it = iter(rows[len(prompts):])
        return rows[: len(prompts)], [None if n is None else next(it) for n in negatives]

    # -- latents and position ids -------------------------------------------------------
    def latent_size(self, pipe, size):
        step = pipe.vae_scale_factor * 2
        return size[0] // step, size[1] // step

    def image_ids(self, pipe, size, reference_grids: tuple, device) -> torch.Tensor:
        """Position ids of the image tokens then every reference's, ``(tokens, 4)``."""
        h, w = self.latent_size(pipe, size)
        ids = Flux2KleinPipeline._prepare_latent_ids(torch.empty(1, 1, h, w))[0]
        if reference_grids:
            grids = [torch.empty(1, 1, gh, gw) for gh, gw in reference_grids]
            ids = torch.cat([ids, Flux2KleinPipeline._prepare_image_ids(
                grids, scale=REFERENCE_T_SCALE)[0]])
        return ids.to(device)

    def initial_latents(self, pipe, scheduler, size, generator, device, dtype):
        h, w = self.latent_size(pipe, size)
        shape = (1, pipe.transformer.config.in_channels, h, w)
        noise = randn_tensor(shape, generator=generator, device=torch.device(device),
                             dtype=dtype)
        return Flux2KleinPipeline._pack_latents(noise)

    def reference_tokens(self, pipe, images: list[torch.Tensor]) -> tuple[
            torch.Tensor, tuple[tuple[int, int], ...]]:
        """The references' packed tokens ``(1, tokens, 4C)`` and latent grids, from
        preprocessed images (each ``(1, 3, H, W)`` in [-1, 1])."""
        vae = pipe.vae
        latents = []
        for image in images:  # one VAE pass each, as the pipeline
            moments = vae.encode(image.to(vae.device, vae.dtype)).latent_dist
            latents.append(_normalised(vae, Flux2KleinPipeline._patchify_latents(
                moments.mode())))
        packed = torch.cat([Flux2KleinPipeline._pack_latents(x)[0] for x in latents])
        return packed.unsqueeze(0), tuple(tuple(x.shape[-2:]) for x in latents)

    def request_conditioning(self, pipe, cond, uncond, size, references, device):
        tokens, grids = self.reference_tokens(pipe, references) if references else (None, ())
        ids = self.image_ids(pipe, size, grids, device)
        cond = replace(cond, references=tokens, positions=ids)
        return cond, None if uncond is None else replace(uncond, references=tokens,
                                                         positions=ids)

    def start_from_image(self, pipe, scheduler, condition, cond, moments, size, steps,
                         generator, device, dtype):
        """Inpainting, as the klein inpainting pipeline: its own strength slice of the
        schedule, the init image's tokens (the request's first reference) noised to
        the first step, and the mask at the token grid for the blend."""
        c = condition
        t_start = int(max(steps - min(steps * c.strength, steps), 0))
        scheduler.set_begin_index(t_start)
        h, w = self.latent_size(pipe, size)
        image = cond.references[:, : h * w].to(dtype)
        shape = (1, pipe.transformer.config.in_channels, h, w)
        noise = Flux2KleinPipeline._pack_latents(randn_tensor(
            shape, generator=generator, device=torch.device(device), dtype=dtype))
        latents = scheduler.scale_noise(image, scheduler.timesteps[t_start : t_start + 1],
                                        noise)
        mask = torch.nn.functional.interpolate(c.mask.to(device, dtype), size=(h, w),
                                               mode="bilinear")
        return ImageStart(latents, t_start,
                          blend=Blend(Flux2KleinPipeline._pack_latents(mask), image, noise))

    def set_timetable(self, pipe, scheduler, steps, size, device):
        h, w = self.latent_size(pipe, size)
        sigmas = None if scheduler.config.get("use_flow_sigmas", False) else \
            np.linspace(1.0, 1 / steps, steps)
        mu = compute_empirical_mu(image_seq_len=h * w, num_steps=steps)
        if sigmas is None:
            scheduler.set_timesteps(steps, device=device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        scheduler.set_begin_index(0)

    # -- the forward --------------------------------------------------------------------
    def batch_conditioning(self, rows: list[Conditioning]) -> dict:
        hidden = cat_rows(rows, "hidden")
        first = rows[0]
        text_ids = Flux2KleinPipeline._prepare_text_ids(first.hidden)[0].to(hidden.device)
        return {"encoder_hidden_states": hidden, "txt_ids": text_ids,
                "img_ids": first.positions,
                "references": None if first.references is None else
                cat_rows(rows, "references")}

    def pad_conditioning(self, kwargs: dict, rows: int) -> dict:
        refs = kwargs["references"]
        return {**kwargs, "encoder_hidden_states": pad_rows(kwargs["encoder_hidden_states"], rows),
                "references": None if refs is None else pad_rows(refs, rows)}

    def forward(self, denoiser, sample, timesteps, conditioning):
        # As the pipeline: the timestep in the latents' dtype, then divided by 1000.
        tokens = sample.shape[1]
        refs = conditioning["references"]
        hidden = sample if refs is None else torch.cat([sample, refs.to(sample.dtype)], dim=1)
        out = denoiser(hidden_states=hidden.to(denoiser.dtype),
                       timestep=timesteps.to(sample.dtype) / 1000, guidance=None,
                       encoder_hidden_states=conditioning["encoder_hidden_states"],
                       txt_ids=conditioning["txt_ids"], img_ids=conditioning["img_ids"],
                       return_dict=False)[0]
        return out[:, :tokens]

    # -- training -----------------------------------------------------------------------
    def sigma_shift_mu(self, image_tokens):
        # The base model's shift at its default step count.
        return compute_empirical_mu(image_seq_len=image_tokens, num_steps=BASE_STEPS)

    def training_latents(self, vae, latent_dist, generator):
        # At the posterior's mode, patchified and normalised, as the references are.
        return _normalised(vae, Flux2KleinPipeline._patchify_latents(
            latent_dist.mode().float()))

    def training_forward(self, denoiser, noisy, timesteps, hidden, pooled, time_ids):
        """``noisy``: normalised ``(B, 4C, h, w)`` grids; the prediction in that layout."""
        batch, channels, h, w = noisy.shape
        out = denoiser(hidden_states=Flux2KleinPipeline._pack_latents(noisy),
                       timestep=timesteps / 1000, guidance=None,
                       encoder_hidden_states=hidden,
                       txt_ids=Flux2KleinPipeline._prepare_text_ids(hidden[:1])[0].to(
                           noisy.device),
                       img_ids=Flux2KleinPipeline._prepare_latent_ids(noisy[:1])[0].to(
                           noisy.device),
                       return_dict=False)[0]
        return out.permute(0, 2, 1).reshape(batch, channels, h, w)

    # -- decoding -----------------------------------------------------------------------
    def _grid(self, latents: torch.Tensor, pipe, size) -> torch.Tensor:
        """Packed tokens back to the normalised ``(B, 4C, h, w)`` grid."""
        h, w = self.latent_size(pipe, size)
        return latents.permute(0, 2, 1).reshape(latents.shape[0], -1, h, w)

    def decode(self, pipe, latents, size):
        vae = pipe.vae
        grid = self._grid(latents, pipe, size)
        mean, std = _bn_statistics(vae, grid)
        grid = grid * std + mean
        spatial = Flux2KleinPipeline._unpatchify_latents(grid)
        return vae.decode(spatial.to(vae.dtype), return_dict=False)[0]

    def preview(self, latents, size):
        # No VAE: the normalised grid's first three channels, squashed to [0, 1].
        h = round((latents.shape[1] * size[0] / size[1]) ** 0.5)
        grid = latents.float().cpu().permute(0, 2, 1).reshape(latents.shape[0], -1, h,
                                                              latents.shape[1] // h)
        return torch.sigmoid(grid[:, :3]).permute(0, 2, 3, 1)


def _bn_statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's batch-norm mean and standard deviation, shaped and typed as ``like``."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean, std.to(like.device, like.dtype)


def _normalised(vae, patchified: torch.Tensor) -> torch.Tensor:
    mean, std = _bn_statistics(vae, patchified)
    return (patchified - mean) / std
