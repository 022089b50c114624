"""The DreamBooth objective (Ruiz et al.): one batch of instance and class examples.

A batch holds the instance examples first, then as many class examples when
prior preservation is on. The loss is

    loss = mse(instance) + prior_loss_weight * mse(class)

with the target chosen by the base scheduler's ``prediction_type`` (epsilon or
v). Min-SNR-gamma weights (Hang et al. 2023) are computed per sample from that
sample's own timestep, so they apply to both halves of the batch, not only to
the instance half.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr


@dataclass
class LossParts:
    """The total loss and its two terms (prior term before weighting)."""

    loss: torch.Tensor
    instance: torch.Tensor
    prior: torch.Tensor


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
                    num_instance: int, prior_loss_weight: float, noise_scheduler=None,
                    snr_gamma: float = 0.0) -> LossParts:
    """The DreamBooth loss of one batch laid out as [instance..., class...]."""
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=list(range(1, per_sample.ndim)))
    if snr_gamma > 0:
        per_sample = per_sample * snr_weights(noise_scheduler, timesteps, snr_gamma)
    instance = per_sample[:num_instance].mean()
    if per_sample.shape[0] > num_instance:
        prior = per_sample[num_instance:].mean()
    else:
        prior = torch.zeros((), device=per_sample.device)
    return LossParts(instance + prior_loss_weight * prior, instance, prior)


def batch_loss(*, unet, text_encoder, vae, noise_scheduler, pixel_values: torch.Tensor,
               input_ids: torch.Tensor, generator: torch.Generator, num_instance: int,
               prior_loss_weight: float, snr_gamma: float = 0.0,
               noise_offset: float = 0.0) -> LossParts:
    """Encode, noise, predict and score one batch. Every random draw (latent sample,
    noise, offset noise, timesteps, in that order) comes from ``generator``, so the
    caller owns all randomness (exact resume)."""
    with torch.no_grad():
        dist = vae.encode(pixel_values.to(vae.dtype)).latent_dist
        latents = dist.sample(generator=generator)
        latents = (latents * vae.config.scaling_factor).float()
    # Drawn where the generator lives (the training device), so no host round trip.
    where = generator.device
    noise = torch.randn(latents.shape, generator=generator, device=where).to(latents.device)
    offset_noise = torch.randn((*latents.shape[:2], 1, 1), generator=generator,
                               device=where).to(latents.device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps,
                              (latents.shape[0],), generator=generator, device=where
                              ).to(latents.device)
    if noise_offset > 0:
        noise = noise + noise_offset * offset_noise
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    hidden = text_encoder(input_ids)[0]
    model_pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    return dreambooth_loss(model_pred, target, timesteps, num_instance, prior_loss_weight,
                           noise_scheduler, snr_gamma)
