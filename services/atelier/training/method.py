"""The DreamBooth objective (Ruiz et al.): one micro-batch of instance and prior rows.

A batch is laid out as rows ``[instance..., class images..., base-model prior...]``:

- instance rows: the subject's images with their captions;
- class-image rows: generated class images with their concept's class prompt;
- base-model prior rows: the instance rows' own noisy latents again, with the
  class prompt; their target is the frozen base model's prediction on them
  (``PRIOR_SOURCE_BASE_MODEL``: no class images are needed).

The loss is

    loss = mean(instance rows) + mean(prior_weight[row] * prior row)

where each prior row's weight is its concept's ``loss_weight`` (with one
concept: ``mse(instance) + prior_loss_weight * mse(class)``). The target of an
image row is chosen by the base scheduler's ``prediction_type`` (epsilon or v),
or, for a flow family (FLUX.2 [klein]), is the flow velocity with each row
weighted by its sigma (``flow_matching``).
An instance row with a mask is a weighted mean over the latent pixels, the mask
(area-resized to the latents) weighing 1 inside and ``outside_weight`` outside,
so that the loss scale does not depend on the mask's area. Min-SNR-gamma weights
(Hang et al. 2023) are computed per row from that row's own timestep, so they
apply to the prior rows too.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from atelier.models.families import family_named
from atelier.training import flow_matching
from atelier.training.train_config import FlowMatchingConfig


@dataclass
class LossParts:
    """The total loss and its two terms (prior term before weighting)."""

    loss: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor


@dataclass
class Batch:
    """One micro-batch's tensors, rows as in the module docstring."""

    num_instance: int
    input_ids: list[torch.Tensor]
    """Per text encoder: token ids of every row."""
    pixels: torch.Tensor | None = None
    """[-1, 1] pixels of the image rows (instance, class images); or ``latent_params``."""
    latent_params: torch.Tensor | None = None
    """The VAE's latent distribution of each image row, cached (mean and log-variance)."""
    embeddings: tuple[torch.Tensor, torch.Tensor | None] | None = None
    """Cached text conditioning of every row (hidden states, pooled), frozen encoders."""
    time_ids: torch.Tensor | None = None
    """SDXL: every row's (original h, w, crop top, left, target h, w)."""
    masks: torch.Tensor | None = None
    """Per-pixel loss weights of the instance rows, [n, 1, H, W], already combined with
    the outside weight; None: weight 1 everywhere."""
    prior_weights: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    """Loss weight of each prior row (class image rows, then base-model rows)."""
    base_rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    """For each base-model prior row: the instance row whose noisy latents it reuses."""

    def to(self, device) -> Batch:
        def move(t):
            return None if t is None else _to_device(t, device)

        return Batch(
            num_instance=self.num_instance, input_ids=[move(t) for t in self.input_ids],
            pixels=move(self.pixels), latent_params=move(self.latent_params),
            embeddings=None if self.embeddings is None else
            (move(self.embeddings[0]), move(self.embeddings[1])),
            time_ids=move(self.time_ids), masks=move(self.masks),
            prior_weights=move(self.prior_weights), base_rows=move(self.base_rows))


def _to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """Copy to the device without making the host wait for the GPU's queue."""
    if torch.device(device).type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def diffusion_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity (v)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}")


def snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample min-SNR-gamma weights, for epsilon or v prediction."""
    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def dreambooth_loss(model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                    num_instance: int, prior_loss_weight: float | torch.Tensor,
                    noise_scheduler=None, snr_gamma: float = 0.0,
                    masks: torch.Tensor | None = None,
                    row_weights: torch.Tensor | None = None) -> LossParts:
    """The DreamBooth loss of one batch laid out as [instance..., prior...].
    ``prior_loss_weight``: one weight, or one per prior row; ``masks``: per-pixel
    weights of the instance rows (any resolution; area-resized to the latents);
    ``row_weights``: each row's weight from its noise level (flow matching's
    weighting; min-SNR comes from ``snr_gamma``)."""
    error = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    dims = list(range(1, error.ndim))
    per_sample = error.mean(dim=dims)
    if masks is not None:
        weights = F.interpolate(masks.float(), size=error.shape[-2:], mode="area")
        weights = weights.expand_as(error[:num_instance])
        masked = (error[:num_instance] * weights).sum(dim=dims) / \
            weights.sum(dim=dims).clamp_min(1e-8)
        per_sample = torch.cat([masked, per_sample[num_instance:]])
    if snr_gamma > 0:
        per_sample = per_sample * snr_weights(noise_scheduler, timesteps, snr_gamma)
    if row_weights is not None:
        per_sample = per_sample * row_weights.to(per_sample)
    instance = per_sample[:num_instance].mean()
    prior_rows = per_sample[num_instance:]
    if prior_rows.shape[0] == 0:
        zero = torch.zeros((), device=per_sample.device)
        return LossParts(instance, instance, zero)
    if not torch.is_tensor(prior_loss_weight):
        prior_loss_weight = torch.full_like(prior_rows, float(prior_loss_weight))
    weighted = (prior_loss_weight.to(prior_rows) * prior_rows).mean()
    return LossParts(instance + weighted, instance, prior_rows.mean())


def text_conditioning(family: str, text_encoders: list, input_ids: list[torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states, pooled embedding or None) of every row, as the family's UNet
    takes them (``Family.text_states``)."""
    return family_named(family).text_states(text_encoders, input_ids)


def encode_latents(vae, pixels: torch.Tensor):
    """The VAE's latent distribution of ``pixels`` (float32 when the VAE needs it)."""
    upcast = bool(vae.config.get("force_upcast", False))
    context = torch.autocast(pixels.device.type, enabled=False) if upcast \
        else contextlib.nullcontext()
    with torch.no_grad(), context:
        return vae.encode(pixels.to(vae.dtype)).latent_dist


def batch_loss(*, unet, text_encoders, vae, noise_scheduler, family: str, batch: Batch,
               generator: torch.Generator, snr_gamma: float = 0.0, noise_offset: float = 0.0,
               base_model=None, flow: FlowMatchingConfig | None = None) -> LossParts:
    """Encode (or take the cached latents), noise, predict and score one batch. Every
    random draw (latent sample, noise, offset noise, timesteps or sigmas, in that
    order) comes from ``generator``, so the caller owns all randomness (exact resume).
    ``base_model``: a context giving the untrained (unet, text encoders), needed when
    the batch has base-model prior rows; ``flow``: a flow family's objective settings
    (``flow_matching``)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    model = family_named(family)
    if batch.latent_params is not None:
        latent_dist = DiagonalGaussianDistribution(batch.latent_params)
    else:
        latent_dist = encode_latents(vae, batch.pixels)
    latents = model.training_latents(vae, latent_dist, generator)
    # Drawn where the generator lives (the training device), so no host round trip.
    where = generator.device
    noise = torch.randn(latents.shape, generator=generator, device=where).to(latents.device)
    offset_noise = torch.randn((*latents.shape[:2], 1, 1), generator=generator,
                               device=where).to(latents.device)
    if noise_offset > 0:
        noise = noise + noise_offset * offset_noise
    row_weights = None
    if model.prediction == "flow":
        flow = flow or FlowMatchingConfig()
        mu = model.sigma_shift_mu(latents.shape[-2] * latents.shape[-1])
        sigmas = flow_matching.draw_sigmas(flow, latents.shape[0], generator, noise_scheduler,
                                           mu).to(latents.device)
        noisy = flow_matching.noised(latents, noise, sigmas)
        target = flow_matching.velocity(latents, noise)
        timesteps = sigmas * noise_scheduler.config.num_train_timesteps
        row_weights = flow_matching.loss_weights(flow, sigmas)
    else:
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps,
                                  (latents.shape[0],), generator=generator, device=where
                                  ).to(latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    base_rows = batch.base_rows
    if base_rows.numel():
        noisy = torch.cat([noisy, noisy[base_rows]])
        timesteps = torch.cat([timesteps, timesteps[base_rows]])
    if batch.embeddings is not None:
        hidden, pooled = batch.embeddings
    else:
        hidden, pooled = text_conditioning(family, text_encoders, batch.input_ids)
    model_pred = model.training_forward(unet, noisy, timesteps, hidden, pooled, batch.time_ids)
    if base_rows.numel():
        target = torch.cat([target, _base_prediction(
            base_model, family, batch, noisy, timesteps, hidden, pooled).to(target.dtype)])
        if row_weights is not None:
            row_weights = torch.cat([row_weights, row_weights[base_rows]])
    return dreambooth_loss(model_pred, target, timesteps, batch.num_instance,
                           batch.prior_weights, noise_scheduler, snr_gamma, batch.masks,
                           row_weights)


def _base_prediction(base_model, family, batch: Batch, noisy, timesteps, hidden, pooled):
    """The untrained model's prediction on the base-model prior rows (the last rows)."""
    count = batch.base_rows.numel()
    rows = slice(noisy.shape[0] - count, None)
    time_ids = batch.time_ids[rows] if batch.time_ids is not None else None
    with torch.no_grad(), base_model() as (unet, text_encoders):
        if batch.embeddings is not None:  # frozen encoders: the cached rows are the base's
            base_hidden, base_pooled = hidden[rows], None if pooled is None else pooled[rows]
        else:
            base_hidden, base_pooled = text_conditioning(
                family, text_encoders, [ids[rows] for ids in batch.input_ids])
        return family_named(family).training_forward(unet, noisy[rows], timesteps[rows],
                                                     base_hidden, base_pooled, time_ids)
