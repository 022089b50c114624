"""The flow-matching objective of klein jobs, against diffusers' own formulas and a
plain write-out of the loss of diffusers' FLUX.2 DreamBooth LoRA script."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)
from transformers import AutoTokenizer, Qwen3ForCausalLM

from atelier.models.families import family_named
from atelier.models.pipelines import FLUX2_KLEIN
from atelier.training import flow_matching
from atelier.training.method import Batch, batch_loss
from atelier.training.train_config import FlowMatchingConfig, LossWeighting, SigmaSampling

SAMPLINGS = [FlowMatchingConfig(sigma_sampling=SigmaSampling.LOGIT_NORMAL, logit_mean=0.3,
                                logit_std=1.2),
             FlowMatchingConfig(sigma_sampling=SigmaSampling.MODE, mode_scale=1.29),
             FlowMatchingConfig(sigma_sampling=SigmaSampling.UNIFORM)]


@pytest.fixture(scope="module")
def klein(tiny_klein_base):
    path = tiny_klein_base
    return {
        "vae": AutoencoderKLFlux2.from_pretrained(path, subfolder="vae"),
        "transformer": Flux2Transformer2DModel.from_pretrained(path, subfolder="transformer"),
        "text_encoder": Qwen3ForCausalLM.from_pretrained(path, subfolder="text_encoder"),
        "tokenizer": AutoTokenizer.from_pretrained(path, subfolder="tokenizer"),
        "scheduler": FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler"),
        "path": path,
    }


@pytest.mark.parametrize("config", SAMPLINGS, ids=lambda c: c.sigma_sampling.value)
def test_sigmas_are_the_scripts_draws(klein, config):
    """Seeded: u from diffusers' density, then the scheduler's own sigma at index u*N."""
    scheduler = klein["scheduler"]
    ours = flow_matching.draw_sigmas(config, 64, torch.Generator().manual_seed(7), scheduler)
    u = compute_density_for_timestep_sampling(
        config.sigma_sampling.value, 64, logit_mean=config.logit_mean,
        logit_std=config.logit_std, mode_scale=config.mode_scale,
        generator=torch.Generator().manual_seed(7))
    indices = (u * scheduler.config.num_train_timesteps).long()
    assert torch.equal(ours, scheduler.sigmas[indices])
    assert torch.equal(ours * 1000, scheduler.timesteps[indices])


def test_clamp_and_resolution_shift(klein):
    scheduler = klein["scheduler"]
    plain = flow_matching.draw_sigmas(FlowMatchingConfig(), 256,
                                      torch.Generator().manual_seed(1), scheduler)
    clamped = flow_matching.draw_sigmas(FlowMatchingConfig(min_sigma=0.3, max_sigma=0.6), 256,
                                        torch.Generator().manual_seed(1), scheduler)
    assert torch.equal(clamped, plain.clamp(0.3, 0.6))
    assert clamped.min() >= 0.3 and clamped.max() <= 0.6
    mu = family_named(FLUX2_KLEIN).sigma_shift_mu(4096)
    shifted = flow_matching.draw_sigmas(FlowMatchingConfig(resolution_shift=True), 256,
                                        torch.Generator().manual_seed(1), scheduler, mu)
    # The sampler's exponential time shift (the scheduler's own, at its mu).
    assert torch.allclose(shifted, scheduler.time_shift(mu, 1.0, plain), atol=1e-6)
    assert (shifted >= plain).all() and mu > 0


@pytest.mark.parametrize("weighting", list(LossWeighting))
def test_weights_are_diffusers(weighting):
    sigmas = torch.rand(32, generator=torch.Generator().manual_seed(3)).clamp_min(0.01)
    ours = flow_matching.loss_weights(FlowMatchingConfig(loss_weighting=weighting), sigmas)
    assert torch.equal(ours, compute_loss_weighting_for_sd3(weighting.value, sigmas))


def _pixels(n: int, seed: int, size: tuple[int, int] = (64, 64)) -> torch.Tensor:
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _states(klein, prompts: list[str]) -> torch.Tensor:
    pipe = Flux2KleinPipeline(scheduler=klein["scheduler"], vae=klein["vae"],
                              text_encoder=klein["text_encoder"], tokenizer=klein["tokenizer"],
                              transformer=klein["transformer"], is_distilled=False)
    with torch.no_grad():
        return pipe.encode_prompt(prompts, device="cpu")[0]


def reference_loss(klein, pixels, hidden, seed, config, prior_weight, masks=None):
    """The FLUX.2 DreamBooth LoRA script's step, written out: latents at the posterior's
    mode, patchified and normalised by the VAE's batch-norm statistics; u from the
    density, sigma = the scheduler's sigma at u*N; noisy = (1 - s) x0 + s n; the
    transformer on packed tokens at timestep s; target n - x0; weighted mse per row;
    instance half + prior_weight x class half."""
    vae, transformer, scheduler = klein["vae"], klein["transformer"], klein["scheduler"]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x0 = vae.encode(pixels).latent_dist.mode()
    x0 = Flux2KleinPipeline._patchify_latents(x0)
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    x0 = (x0 - mean) / std
    noise = torch.randn(x0.shape, generator=g)
    torch.randn((*x0.shape[:2], 1, 1), generator=g)  # atelier's offset draw (unused at 0)
    u = compute_density_for_timestep_sampling(
        config.sigma_sampling.value, x0.shape[0], logit_mean=config.logit_mean,
        logit_std=config.logit_std, mode_scale=config.mode_scale, generator=g)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    sigmas = scheduler.sigmas[indices].view(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    packed = Flux2KleinPipeline._pack_latents(noisy)
    ids = Flux2KleinPipeline._prepare_latent_ids(noisy)
    text_ids = Flux2KleinPipeline._prepare_text_ids(hidden)
    pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=None,
                       encoder_hidden_states=hidden, txt_ids=text_ids, img_ids=ids,
                       return_dict=False)[0]
    pred = Flux2KleinPipeline._unpack_latents_with_ids(pred, ids)
    target = noise - x0
    weighting = compute_loss_weighting_for_sd3(config.loss_weighting.value, sigmas)
    half = x0.shape[0] // 2
    error = weighting.float() * (pred.float() - target.float()) ** 2
    per_row = error.reshape(x0.shape[0], -1).mean(1)
    if masks is not None:  # the instance rows' weighted mean over the latent grid
        w = torch.nn.functional.interpolate(masks, size=x0.shape[-2:], mode="area")
        w = w.expand_as(error[:half])
        per_row = torch.cat([(error[:half] * w).sum((1, 2, 3)) / w.sum((1, 2, 3)),
                             per_row[half:]])
    return per_row[:half].mean() + prior_weight * per_row[half:].mean()


@pytest.mark.parametrize("config", [
    FlowMatchingConfig(),
    FlowMatchingConfig(sigma_sampling=SigmaSampling.MODE, loss_weighting=LossWeighting.COSMAP),
    FlowMatchingConfig(sigma_sampling=SigmaSampling.UNIFORM,
                       loss_weighting=LossWeighting.SIGMA_SQRT),
], ids=["logit_normal-none", "mode-cosmap", "uniform-sigma_sqrt"])
def test_batch_loss_is_the_scripts_loss(klein, config):
    """atelier's batch_loss on 2 instance + 2 class rows of the tiny klein base equals
    the script's formula, draw for draw."""
    pixels = _pixels(4, 11)
    hidden = _states(klein, ["a sks toy", "a sks toy", "a toy", "a toy"])
    batch = Batch(num_instance=2, input_ids=[], pixels=pixels, embeddings=(hidden, None),
                  prior_weights=torch.full((2,), 0.7))
    ours = batch_loss(unet=klein["transformer"], text_encoders=[], vae=klein["vae"],
                      noise_scheduler=klein["scheduler"], family=FLUX2_KLEIN, batch=batch,
                      generator=torch.Generator().manual_seed(5), flow=config)
    reference = reference_loss(klein, pixels, hidden, 5, config, 0.7)
    assert torch.allclose(ours.loss, reference, rtol=1e-5, atol=1e-6), (ours.loss, reference)
    assert math.isfinite(float(ours.prior.detach())) and float(ours.prior.detach()) > 0


def test_a_bucketed_batch_packs_its_own_grid(klein):
    """An aspect-ratio bucket (64 x 128 px): tokens, position ids and the unpacked
    prediction follow the non-square grid, as the script's step does."""
    pixels = _pixels(4, 14, (64, 128))
    hidden = _states(klein, ["a sks toy", "a sks toy", "a toy", "a toy"])
    config = FlowMatchingConfig()
    batch = Batch(num_instance=2, input_ids=[], pixels=pixels, embeddings=(hidden, None),
                  prior_weights=torch.ones(2))
    ours = batch_loss(unet=klein["transformer"], text_encoders=[], vae=klein["vae"],
                      noise_scheduler=klein["scheduler"], family=FLUX2_KLEIN, batch=batch,
                      generator=torch.Generator().manual_seed(8), flow=config)
    reference = reference_loss(klein, pixels, hidden, 8, config, 1.0)
    assert torch.allclose(ours.loss, reference, rtol=1e-5, atol=1e-6)


def test_masked_klein_loss_weighs_the_latent_grid(klein):
    """A loss mask (1 inside, 0.1 outside) area-resized to klein's 2x2-patch grid."""
    pixels = _pixels(4, 13)
    hidden = _states(klein, ["a sks toy", "a sks toy", "a toy", "a toy"])
    masks = torch.full((2, 1, 64, 64), 0.1)
    masks[:, :, 16:48, 8:40] = 1.0
    config = FlowMatchingConfig(loss_weighting=LossWeighting.COSMAP)
    batch = Batch(num_instance=2, input_ids=[], pixels=pixels, embeddings=(hidden, None),
                  prior_weights=torch.ones(2), masks=masks)
    ours = batch_loss(unet=klein["transformer"], text_encoders=[], vae=klein["vae"],
                      noise_scheduler=klein["scheduler"], family=FLUX2_KLEIN, batch=batch,
                      generator=torch.Generator().manual_seed(6), flow=config)
    reference = reference_loss(klein, pixels, hidden, 6, config, 1.0, masks)
    unmasked = reference_loss(klein, pixels, hidden, 6, config, 1.0)
    assert torch.allclose(ours.loss, reference, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(reference, unmasked)


def test_base_model_prior_targets_the_frozen_velocity(klein):
    """Base-model prior rows: the instance rows' noisy latents again, with the class
    prompt, their target the untrained transformer's own velocity; with the adapters
    off (the untrained model) their loss is zero."""
    import contextlib

    pixels = _pixels(2, 12)
    hidden = _states(klein, ["a sks toy", "a sks toy", "a toy", "a toy"])
    batch = Batch(num_instance=2, input_ids=[], pixels=pixels, embeddings=(hidden, None),
                  prior_weights=torch.ones(2), base_rows=torch.tensor([0, 1]))

    @contextlib.contextmanager
    def base_model():
        yield klein["transformer"], []

    parts = batch_loss(unet=klein["transformer"], text_encoders=[], vae=klein["vae"],
                       noise_scheduler=klein["scheduler"], family=FLUX2_KLEIN, batch=batch,
                       generator=torch.Generator().manual_seed(5), base_model=base_model,
                       flow=FlowMatchingConfig(loss_weighting=LossWeighting.COSMAP))
    assert float(parts.prior) == 0.0 and float(parts.instance) > 0
