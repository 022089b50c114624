"""The flow-matching objective of a flow base (FLUX.2 [klein]), one batch at a time.

For clean latents ``x0``, noise ``n`` and a row's sigma ``s``:

    noisy  = (1 - s) * x0 + s * n
    target = n - x0              (the velocity the transformer predicts)

and the transformer is given ``s`` (as the scheduler's timestep ``1000 s``).

Sigmas are drawn as diffusers' training scripts draw them: ``u`` from
``compute_density_for_timestep_sampling`` (logit-normal, mode or uniform) picks
a sigma on the base scheduler's training grid of ``num_train_timesteps``
sigmas; ``resolution_shift`` then shifts it by the image's token count as the
model's sampler does (the family's ``sigma_shift_mu``), and ``min_sigma`` /
``max_sigma`` clamp it. A row's loss weight is ``compute_loss_weighting_for_sd3``
of its sigma.
"""

from __future__ import annotations

import math

import torch
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)

from atelier.training.train_config import FlowMatchingConfig


def draw_sigmas(config: FlowMatchingConfig, count: int, generator: torch.Generator,
                noise_scheduler, mu: float | None = None) -> torch.Tensor:
    """``count`` sigmas, on ``generator``'s device, with one draw from ``generator``;
    ``mu``: the family's shift exponent for the image size (``resolution_shift``)."""
    u = compute_density_for_timestep_sampling(
        config.sigma_sampling.value, count, logit_mean=config.logit_mean,
        logit_std=config.logit_std, mode_scale=config.mode_scale, device=generator.device,
        generator=generator)
    grid = training_grid(noise_scheduler).to(u.device)
    sigmas = grid[(u * grid.numel()).long().clamp(0, grid.numel() - 1)]
    if config.resolution_shift and mu is not None:
        sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    return sigmas.clamp(config.min_sigma, config.max_sigma)


def training_grid(noise_scheduler) -> torch.Tensor:
    """The scheduler's training sigmas, 1 down to 1/N, as a freshly loaded flow-matching
    Euler scheduler holds them: unshifted with dynamic shifting (klein), else shifted
    by its fixed ``shift``."""
    c = noise_scheduler.config
    n = c.num_train_timesteps
    sigmas = torch.linspace(1, n, n, dtype=torch.float32).flip(0) / n
    if not c.get("use_dynamic_shifting", False):
        shift = c.get("shift", 1.0)
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas


def loss_weights(config: FlowMatchingConfig, sigmas: torch.Tensor) -> torch.Tensor:
    """Each row's loss weight for its sigma."""
    return compute_loss_weighting_for_sd3(config.loss_weighting.value, sigmas)


def noised(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1 - s) * latents + s * noise


def velocity(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - latents
