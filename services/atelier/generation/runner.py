"""The tensor work of denoising: starting sequences, and one batched UNet forward per group.

Each image of each request is a :class:`Sequence` with its own noise scheduler,
``torch.Generator`` (seeded from the request), timestep, guidance and
conditioning. Starting a request does what its diffusers pipeline does before
the loop, in the same order of random draws from the image's generator:

- text to image: latents are noise times the scheduler's ``init_noise_sigma``;
- image to image: the schedule starts at ``strength``; the init image's VAE
  latents (sampled) are noised to that first timestep;
- inpainting: as image to image (pure noise at strength 1), plus the mask and the
  masked image's latents. An inpainting UNet (9 channels) takes them as extra
  input channels; an ordinary UNet's latents are blended after every step with
  the init latents noised to the next timestep, outside the mask.

``step`` runs one group's forward: unconditional rows of guided sequences, then
every conditional row, with per-row timesteps; ``guidance.apply_guidance``
combines them, and each sequence takes its own scheduler step. The arithmetic
per sequence is its pipeline's, so a request's images do not depend on what it
was batched with (tests/generation/test_fidelity*.py hold it to the pipelines).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils.torch_utils import randn_tensor

from atelier.generation import image_inputs
from atelier.generation.adapters import AdapterStacks, RowAdapters, rows_with_adapters
from atelier.generation.families import (
    INPAINTING_CHANNELS,
    Conditioning,
    encode_prompts,
    unet_conditioning,
)
from atelier.generation.guidance import apply_guidance, is_guided
from atelier.generation.job import Job
from atelier.generation.schedulers import step_kwargs_for

log = logging.getLogger("atelier.generation.runner")
_SEQ_IDS = itertools.count()


@dataclass
class Blend:
    """Latent blending for an ordinary UNet inpainting: keep ``image_latents`` (noised
    to the schedule) where ``mask`` is 0."""

    mask: torch.Tensor
    image_latents: torch.Tensor
    noise: torch.Tensor


@dataclass(eq=False)
class Sequence:
    """One image being denoised."""

    job: Job
    index: int
    generator: torch.Generator
    scheduler: Any
    timesteps: list
    latents: torch.Tensor
    cond: Conditioning
    uncond: Conditioning | None
    step_kwargs: dict
    extra_channels: torch.Tensor | None = None  # inpainting UNet: mask + masked latents
    blend: Blend | None = None
    seq_id: int = field(default_factory=lambda: next(_SEQ_IDS))
    i: int = 0


class DenoiseRunner:
    """Holds the running sequences' tensors; all of it runs on the worker thread.

    ``buckets``: pad every forward without adapters to the next of these batch
    sizes (rows), so shapes repeat; ``compile_unet``: run those forwards through
    ``torch.compile``. Padding rows copy the last real row and are dropped from
    the output; every row of the UNet is computed on its own (group norm and
    attention are per sample), so they do not change the real rows.
    """

    def __init__(self, *, device: str, buckets: list[int] | None = None,
                 compile_unet: bool = False) -> None:
        self.device = device
        self.buckets = sorted(buckets) if buckets else None
        self.compile_unet = compile_unet
        self.sequences: dict[int, Sequence] = {}
        self._rows_cache: dict[Any, tuple[tuple, Any]] = {}
        self._stacks = AdapterStacks()
        if compile_unet and self.buckets:
            import torch._dynamo

            # One graph per (bucket, latent size): room for several sizes per model.
            limit = 4 * len(self.buckets)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                       limit)

    def drop(self, seq_ids) -> None:
        for seq_id in seq_ids:
            self.sequences.pop(seq_id, None)

    def forget_groups(self, live: set) -> None:
        """Drop cached conditioning of groups that emptied."""
        for key in set(self._rows_cache) - live:
            del self._rows_cache[key]

    # -- starting requests ----------------------------------------------------------------
    def start(self, jobs: list[Job]) -> list[Sequence]:
        """Encode the jobs' prompts (one pass per text encoder) and any init images
        (one VAE pass per size), and make their sequences. All jobs share one text
        encoder model (``Job.encoder``) and one UNet model."""
        pipe = jobs[0].encoder.pipeline
        guided = [is_guided(job.guidance_scale, pipe.unet.config) for job in jobs]
        conds, unconds = encode_prompts(
            pipe, [job.prompt for job in jobs],
            [job.negative_prompt if g else None for job, g in zip(jobs, guided, strict=True)],
            [(job.height, job.width) for job in jobs], self.device)
        moments = self._encode_images(jobs[0].model.pipeline, jobs)
        sequences = []
        for job, cond, uncond in zip(jobs, conds, unconds, strict=True):
            for index, seed in enumerate(job.seeds):
                seq = self._new_sequence(job, index, seed, cond, uncond, moments.get(job.serial))
                sequences.append(seq)
        for seq in sequences:
            self.sequences[seq.seq_id] = seq
        return sequences

    def _encode_images(self, pipe, jobs: list[Job]) -> dict[int, dict[str, torch.Tensor]]:
        """VAE posterior moments of every init and masked image, one encoder pass per
        image size. The images become tensors here, on the worker thread
        (``image_inputs``: torch stays out of the helper threads)."""
        wanted: list[tuple[int, str, torch.Tensor]] = []
        for job in jobs:
            given = job.image_inputs
            if job.condition is None and given is not None:
                job.condition = image_inputs.preprocess(pipe, given.image, given.mask,
                                                        given.strength, job.width, job.height)
            c = job.condition
            if c is None:
                continue
            wanted.append((job.serial, "image", c.image))
            if c.inpaint:
                wanted.append((job.serial, "masked", c.masked_image))
        out: dict[int, dict[str, torch.Tensor]] = {}
        by_size: dict[tuple, list[tuple[int, str, torch.Tensor]]] = {}
        for item in wanted:  # one model's requests may ask for different sizes
            by_size.setdefault(tuple(item[2].shape), []).append(item)
        vae = pipe.vae
        for items in by_size.values():
            batch = torch.cat([t for _, _, t in items]).to(self.device, vae.dtype)
            moments = vae.encode(batch).latent_dist.parameters
            for row, (serial, name, _) in enumerate(items):
                out.setdefault(serial, {})[name] = moments[row : row + 1]
        return out

    def _new_sequence(self, job: Job, index: int, seed: int, cond: Conditioning,
                      uncond: Conditioning | None, moments: dict | None) -> Sequence:
        pipe = job.model.pipeline
        scheduler = job.make_scheduler()
        scheduler.set_timesteps(job.num_inference_steps, device=self.device)
        timesteps = list(scheduler.timesteps)
        generator = torch.Generator("cpu").manual_seed(seed)
        dtype = cond.hidden.dtype
        device = torch.device(self.device)
        scale = pipe.vae_scale_factor
        latent_size = (job.height // scale, job.width // scale)
        accepted = step_kwargs_for(type(scheduler))
        kwargs = {}
        if "eta" in accepted:
            kwargs["eta"] = 0.0
        if "generator" in accepted:
            kwargs["generator"] = generator
        seq = Sequence(job, index, generator, scheduler, timesteps, None, cond, uncond, kwargs)
        c = job.condition
        if c is None:
            shape = (1, pipe.unet.config.in_channels, *latent_size)
            noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
            seq.latents = noise * scheduler.init_noise_sigma
            return seq

        # Image-conditioned: the schedule from `strength` on, as the pipelines slice it.
        steps = job.num_inference_steps
        t_start = max(steps - min(int(steps * c.strength), steps), 0)
        order = getattr(scheduler, "order", 1)
        seq.timesteps = timesteps[t_start * order:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start * order)
        first = torch.stack([seq.timesteps[0]]) if torch.is_tensor(seq.timesteps[0]) \
            else torch.tensor([seq.timesteps[0]])
        sf = pipe.vae.config.scaling_factor
        shape = (1, pipe.vae.config.latent_channels, *latent_size)
        inpaint_unet = pipe.unet.config.in_channels == INPAINTING_CHANNELS
        from_noise = c.inpaint and c.strength == 1.0
        image_latents = None
        if not from_noise or (c.inpaint and not inpaint_unet):
            image_latents = self._sample(moments["image"], generator, sf, dtype)
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        if from_noise:
            seq.latents = noise * scheduler.init_noise_sigma
        else:
            seq.latents = scheduler.add_noise(image_latents, noise, first)
        if c.inpaint:
            masked = self._sample(moments["masked"], generator, sf, dtype)
            mask = torch.nn.functional.interpolate(c.mask, size=latent_size).to(device, dtype)
            if inpaint_unet:
                seq.extra_channels = torch.cat([mask, masked], dim=1)
            else:
                seq.blend = Blend(mask, image_latents, noise)
        return seq

    @staticmethod
    def _sample(moments: torch.Tensor, generator, scaling_factor: float, dtype) -> torch.Tensor:
        """A draw from the VAE posterior with this image's generator, as the pipelines'
        ``retrieve_latents`` (sample mode), scaled."""
        return (DiagonalGaussianDistribution(moments).sample(generator) * scaling_factor).to(dtype)

    # -- one batched step -----------------------------------------------------------------
    def step(self, group: Any, seq_ids: list[int]) -> list[Sequence]:
        """One UNet forward for the group's sequences (each row with its own request's
        adapters), then each one's scheduler step."""
        seqs = [self.sequences[i] for i in seq_ids]
        model = seqs[0].job.model
        unet = model.pipeline.unet
        guided = [s for s in seqs if s.uncond is not None]
        order = guided + seqs  # unconditional halves first, then every conditional half
        inputs = {}
        for s in seqs:
            x = s.scheduler.scale_model_input(s.latents, s.timesteps[s.i])
            if s.extra_channels is not None:
                x = torch.cat([x, s.extra_channels], dim=1)
            inputs[s.seq_id] = x
        sample = torch.cat([inputs[s.seq_id] for s in order])
        timesteps = torch.tensor([float(s.timesteps[s.i]) for s in order],
                                 device=self.device, dtype=torch.float32)
        conditioning, adapters, rows = self._conditioning(group, guided, seqs, unet.dtype)
        if rows > len(order):
            sample, timesteps = _pad(sample, rows), _pad(timesteps, rows)
        with rows_with_adapters(adapters, model.unet_modules):
            forward = self._compiled(model) if adapters is None else unet
            output = forward(sample, timesteps, **conditioning, return_dict=False)[0]
        output = output[: len(order)]
        predictions = apply_guidance(
            output, [s.job.guidance_scale if s.uncond is not None else None for s in seqs],
            [s.job.guidance_rescale for s in seqs])
        for s, pred in zip(seqs, predictions, strict=True):
            t = s.timesteps[s.i]
            s.latents = s.scheduler.step(pred, t, s.latents, **s.step_kwargs,
                                         return_dict=False)[0]
            if s.blend is not None:
                self._blend(s)
            s.i += 1
        return seqs

    @staticmethod
    def _blend(s: Sequence) -> None:
        b = s.blend
        known = b.image_latents
        if s.i < len(s.timesteps) - 1:
            nxt = s.timesteps[s.i + 1]
            known = s.scheduler.add_noise(known, b.noise, torch.tensor([nxt]))
        s.latents = (1 - b.mask) * known + b.mask * s.latents

    def _conditioning(self, group: Any, guided: list[Sequence], seqs: list[Sequence],
                      dtype) -> tuple[dict, RowAdapters | None, int]:
        """The batch's UNet conditioning, its rows' adapters and its padded row count,
        rebuilt only when the group's members change. An unconditional row has its
        request's adapters too, as in the pipelines' guided batch."""
        members = (*(s.seq_id for s in guided), -1, *(s.seq_id for s in seqs))
        cached = self._rows_cache.get(group)
        if cached is not None and cached[0] == members:
            return cached[1]
        kwargs = unet_conditioning([s.uncond for s in guided] + [s.cond for s in seqs])
        adapters = RowAdapters.plan([s.job.adapters for s in guided + seqs], self.device,
                                    dtype, self._stacks)
        rows = len(guided) + len(seqs)
        if adapters is None:
            rows = self.bucket(rows)
            kwargs = _pad_conditioning(kwargs, rows)
        self._rows_cache[group] = (members, (kwargs, adapters, rows))
        return kwargs, adapters, rows

    def bucket(self, rows: int) -> int:
        """The batch size a forward of ``rows`` rows runs at: the next bucket (or
        ``rows`` itself without buckets, or beyond the largest)."""
        for size in self.buckets or ():
            if size >= rows:
                return size
        return rows

    def _compiled(self, model) -> Any:
        """The model's UNet as the forwards without adapters call it."""
        if not self.compile_unet:
            return model.pipeline.unet
        if model.compiled_unet is None:
            model.compiled_unet = torch.compile(model.pipeline.unet, dynamic=False)
        return model.compiled_unet

    def warm(self, model, height: int, width: int) -> int:
        """Run (and so compile) the model's UNet once at every bucket size for
        ``height`` by ``width`` images; returns how many buckets were run."""
        pipe = model.pipeline
        conds, _ = encode_prompts(pipe, [""], [None], [(height, width)], self.device)
        scale = pipe.vae_scale_factor
        unet = self._compiled(model)
        for rows in self.buckets or ():
            sample = torch.zeros((rows, pipe.unet.config.in_channels, height // scale,
                                  width // scale), device=self.device, dtype=pipe.unet.dtype)
            timesteps = torch.full((rows,), 500.0, device=self.device)
            unet(sample, timesteps, **unet_conditioning(conds * rows), return_dict=False)
        return len(self.buckets or ())



def _pad(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with copies of its last row appended, to ``rows`` rows."""
    return torch.cat([t, t[-1:].expand(rows - t.shape[0], *t.shape[1:])])


def _pad_conditioning(kwargs: dict, rows: int) -> dict:
    if rows == kwargs["encoder_hidden_states"].shape[0]:
        return kwargs
    out = {"encoder_hidden_states": _pad(kwargs["encoder_hidden_states"], rows)}
    if "added_cond_kwargs" in kwargs:
        out["added_cond_kwargs"] = {k: _pad(v, rows)
                                    for k, v in kwargs["added_cond_kwargs"].items()}
    return out
