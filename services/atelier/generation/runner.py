"""The tensor work of denoising: starting sequences, and one batched denoiser forward per group.

Each image of each request is a :class:`Sequence` with its own noise scheduler,
``torch.Generator`` (seeded from the request), timestep, guidance and
conditioning. Starting a request does what its diffusers pipeline does before
the loop, in the same order of random draws from the image's generator. What
differs between model families (prompt encoding, latent layout, the denoiser's
call, the schedule) is the family's (``atelier.models.families``):

- text to image: the family's first latents (SD: noise times the scheduler's
  ``init_noise_sigma``; klein: packed noise tokens, its reference images'
  tokens appended in every forward);
- image to image: the schedule starts at ``strength``; the init image's VAE
  latents (sampled) are noised to that first timestep;
- inpainting: as image to image (pure noise at strength 1), plus the mask and the
  masked image's latents. An inpainting UNet (9 channels) takes them as extra
  input channels; an ordinary UNet's latents are blended after every step with
  the init latents noised to the next timestep, outside the mask.

``step`` runs one group's forward: unconditional rows of guided sequences, then
every conditional row, with per-row timesteps; ``guidance.apply_guidance``
combines them, and ``scheduler_updates`` steps every row of one scheduler kind
at once, each with its own timetable and history. The arithmetic per sequence
is its pipeline's, so a request's images do not depend on what it was batched
with (tests/generation/test_fidelity*.py hold it to the pipelines), and the
host work of a step does not grow with the batch.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from atelier.generation import image_inputs
from atelier.generation.adapters import AdapterStacks, RowAdapters, rows_with_adapters
from atelier.generation.guidance import apply_guidance
from atelier.generation.job import Job
from atelier.generation.scheduler_updates import RowState, UpdateKind, kind_for
from atelier.generation.schedulers import freeze, step_kwargs_for
from atelier.generation.worker_clock import WorkerClock
from atelier.models.families import Conditioning
from atelier.models.families.base import Blend, pad_rows

log = logging.getLogger("atelier.generation.runner")
_SEQ_IDS = itertools.count()


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
    kind: UpdateKind | None = None  # the batched update; None: the scheduler's own step
    row: RowState | None = None  # this sequence's state in ``kind``
    timestep_values: list[float] = field(default_factory=list)  # ``timesteps`` as floats
    seq_id: int = field(default_factory=lambda: next(_SEQ_IDS))
    i: int = 0


class DenoiseRunner:
    """Holds the running sequences' tensors; all of it runs on the worker thread.

    ``buckets``: pad every forward without adapters to the next of these batch
    sizes (rows), so shapes repeat; ``compile_unet``: run those forwards through
    ``torch.compile`` (``cuda_graphs``: captured and replayed as CUDA graphs).
    Padding rows copy the last real row and are dropped from the output; every
    row of the UNet is computed on its own (group norm and attention are per
    sample), so they do not change the real rows.
    """

    def __init__(self, *, device: str, buckets: list[int] | None = None,
                 compile_unet: bool = False, cuda_graphs: bool = False,
                 clock: WorkerClock | None = None) -> None:
        self.device = device
        self.buckets = sorted(buckets) if buckets else None
        self.compile_unet = compile_unet
        self.cuda_graphs = cuda_graphs and compile_unet
        self.clock = clock if clock is not None else WorkerClock(device)
        self.sequences: dict[int, Sequence] = {}
        self._kinds: dict[tuple, UpdateKind] = {}
        self._rows_cache: dict[Any, tuple[tuple, Any]] = {}
        self._stacks = AdapterStacks()
        # The empty negative prompt's rows, one per text encoder: the unconditional
        # half of most guided requests, encoded once (weak: gone with its model).
        self._empty_prompt: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
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
        encoder model (``Job.encoder``) and one denoiser model."""
        pipe = jobs[0].encoder.pipeline
        model = jobs[0].model
        family = model.family
        guided = [family.is_guided(model.pipeline, job.guidance_scale) for job in jobs]
        negatives = [job.negative_prompt if g else None
                     for job, g in zip(jobs, guided, strict=True)]
        with self.clock.phase("text_encode"):
            conds, unconds = self._encode(jobs[0].encoder.family, pipe,
                                          [job.prompt for job in jobs], negatives,
                                          [(job.height, job.width) for job in jobs])
        moments = self._encode_images(model.pipeline, jobs)
        encodes = any(job.references or job.condition is not None for job in jobs)
        with self.clock.phase("vae_encode") if encodes else contextlib.nullcontext():
            conds, unconds = self._with_references(model, jobs, conds, unconds)
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
        image size (for families that sample them). The images become tensors here,
        on the worker thread (``image_inputs``: torch stays out of the helper threads)."""
        wanted: list[tuple[int, str, torch.Tensor]] = []
        for job in jobs:
            given = job.image_inputs
            if job.condition is None and given is not None:
                job.condition = image_inputs.preprocess(pipe, given.image, given.mask,
                                                        given.strength, job.width, job.height)
            c = job.condition
            if c is None or not job.model.family.samples_init_image:
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
            with self.clock.phase("vae_encode"):
                moments = vae.encode(batch).latent_dist.parameters
            for row, (serial, name, _) in enumerate(items):
                out.setdefault(serial, {})[name] = moments[row : row + 1]
        return out

    def _encode(self, family, pipe, prompts: list[str], negatives: list[str | None],
                sizes: list[tuple[int, int]]):
        """The family's prompt encoding, with the empty negative prompt's rows taken from
        (or put in) ``_empty_prompt`` where the family's rows depend on the text alone."""
        if family.size_conditioned or "" not in negatives:
            return family.encode_prompts(pipe, prompts, negatives, sizes, self.device)
        empty = self._empty_prompt.get(pipe.text_encoder)
        if empty is None:
            empty = family.encode_prompts(pipe, [""], [None], sizes[:1], self.device)[0][0]
            self._empty_prompt[pipe.text_encoder] = empty
        conds, unconds = family.encode_prompts(
            pipe, prompts, [None if n == "" else n for n in negatives], sizes, self.device)
        return conds, [empty if n == "" else u for n, u in zip(negatives, unconds, strict=True)]

    def _with_references(self, model, jobs: list[Job], conds: list[Conditioning],
                         unconds: list[Conditioning | None]):
        """Each request's rows with what its family adds per request: reference-image
        tokens (led by the init image where the family does not sample it) and the
        forward's position ids (both halves of a guided request)."""
        family, pipe = model.family, model.pipeline
        out_c, out_u = [], []
        for job, cond, uncond in zip(jobs, conds, unconds, strict=True):
            refs = job.references
            if refs and not torch.is_tensor(refs[0]):
                job.references = refs = [image_inputs.to_tensor(pipe, r) for r in refs]
            c = job.condition
            leading = [c.image] if c is not None and not family.samples_init_image else []
            cond, uncond = family.request_conditioning(pipe, cond, uncond,
                                                       (job.height, job.width),
                                                       leading + list(refs), self.device)
            out_c.append(cond)
            out_u.append(uncond)
        return out_c, out_u

    def _new_sequence(self, job: Job, index: int, seed: int, cond: Conditioning,
                      uncond: Conditioning | None, moments: dict | None) -> Sequence:
        pipe = job.model.pipeline
        family = job.model.family
        size = (job.height, job.width)
        scheduler = job.make_scheduler()
        family.set_timetable(pipe, scheduler, job.num_inference_steps, size, self.device)
        timesteps = list(scheduler.timesteps)
        generator = torch.Generator("cpu").manual_seed(seed)
        dtype = cond.hidden.dtype
        accepted = step_kwargs_for(type(scheduler))
        kwargs = {}
        if "eta" in accepted:
            kwargs["eta"] = 0.0
        if "generator" in accepted:
            kwargs["generator"] = generator
        seq = Sequence(job, index, generator, scheduler, timesteps, None, cond, uncond, kwargs)
        c = job.condition
        if c is None:
            seq.latents = family.initial_latents(pipe, scheduler, size, generator,
                                                 self.device, dtype)
            return self._with_update(seq, 0)
        start = family.start_from_image(pipe, scheduler, c, cond, moments, size,
                                        job.num_inference_steps, generator, self.device,
                                        dtype)
        seq.timesteps = timesteps[start.first_index:]
        seq.latents, seq.blend = start.latents, start.blend
        seq.extra_channels = start.extra_channels
        return self._with_update(seq, start.first_index)

    def _with_update(self, seq: Sequence, first_index: int) -> Sequence:
        """The sequence's batched scheduler kind and row state (none for a scheduler no
        kind covers), and its timesteps as floats for the forward."""
        scheduler = seq.scheduler
        seq.timestep_values = scheduler.timesteps[first_index:].tolist()
        cls = kind_for(scheduler)
        if cls is not None:
            key = (cls, freeze(dict(scheduler.config)))
            kind = self._kinds.get(key)
            if kind is None:
                kind = self._kinds[key] = cls(scheduler)
            seq.kind, seq.row = kind, kind.begin(scheduler, first_index)
        return seq

    # -- one batched step -----------------------------------------------------------------
    def step(self, group: Any, seq_ids: list[int]) -> list[Sequence]:
        """One denoiser forward for the group's sequences (each row with its own
        request's adapters), then one scheduler update per scheduler kind over its rows."""
        seqs = [self.sequences[i] for i in seq_ids]
        model = seqs[0].job.model
        unet = model.denoiser
        guided = [s for s in seqs if s.uncond is not None]
        order = guided + seqs  # unconditional halves first, then every conditional half
        with self.clock.phase("scheduler"):
            latents = torch.cat([s.latents for s in seqs])
            sample = self._model_input(seqs, latents, len(guided))
            timesteps = torch.tensor([s.timestep_values[s.i] for s in order],
                                     device=self.device, dtype=torch.float32)
        conditioning, adapters, rows = self._conditioning(group, guided, seqs, unet.dtype)
        if rows > len(order):
            sample, timesteps = pad_rows(sample, rows), pad_rows(timesteps, rows)
        with self.clock.phase("denoise"), rows_with_adapters(adapters, model.unet_modules):
            forward = self._compiled(model) if adapters is None else unet
            output = model.family.forward(forward, sample, timesteps, conditioning)
        with self.clock.phase("scheduler"):
            predictions = apply_guidance(
                output[: len(order)],
                [s.job.guidance_scale if s.uncond is not None else None for s in seqs],
                [s.job.guidance_rescale for s in seqs])
            updated = self._update(seqs, latents, predictions)
            for s, new in zip(seqs, updated.split(1), strict=True):
                s.latents = new
                s.i += 1
        return seqs

    def _model_input(self, seqs: list[Sequence], latents: torch.Tensor,
                     guided: int) -> torch.Tensor:
        """The forward's input rows: each sequence's latents scaled as its scheduler
        scales them (Euler kinds divide by sqrt(sigma^2 + 1)), plus an inpainting UNet's
        extra channels, the guided sequences' rows first once more."""
        divisors = [s.kind.input_divisor(s.row) if s.kind is not None else 1.0 for s in seqs]
        x = latents
        if any(d != 1.0 for d in divisors):
            column = torch.tensor(divisors, dtype=torch.float32, device=latents.device)
            x = (latents.float() / column.view(-1, *([1] * (latents.dim() - 1)))).to(
                latents.dtype)
        for j, s in enumerate(seqs):  # only schedulers no batched kind covers
            if s.kind is None:
                x = x.clone() if x is latents else x
                x[j : j + 1] = s.scheduler.scale_model_input(s.latents, s.timesteps[s.i])
        if seqs[0].extra_channels is not None:  # one UNet: all rows or none
            x = torch.cat([x, torch.cat([s.extra_channels for s in seqs])], dim=1)
        if guided == len(seqs):
            return torch.cat([x, x])
        if guided:
            where = torch.tensor([j for j, s in enumerate(seqs) if s.uncond is not None],
                                 device=x.device)
            return torch.cat([x.index_select(0, where), x])
        return x

    def _update(self, seqs: list[Sequence], latents: torch.Tensor,
                predictions: torch.Tensor) -> torch.Tensor:
        """Every sequence's next latents, one update per scheduler kind (then the
        inpainting blend of an ordinary UNet), as one ``(R, C, H, W)`` tensor."""
        by_kind: dict[UpdateKind | None, list[int]] = {}
        for j, s in enumerate(seqs):
            by_kind.setdefault(s.kind, []).append(j)
        x, out = latents.float(), predictions.float()
        if len(by_kind) == 1 and None not in by_kind:
            kind = seqs[0].kind
            updated = kind.update([s.row for s in seqs], x, out, [s.generator for s in seqs],
                                  predictions.dtype)
        else:
            updated = torch.empty_like(x)
            for kind, positions in by_kind.items():
                if kind is None:
                    for j in positions:
                        updated[j : j + 1] = self._own_step(seqs[j], predictions[j : j + 1])
                    continue
                where = torch.tensor(positions, device=x.device)
                rows = [seqs[j] for j in positions]
                updated.index_copy_(0, where, kind.update(
                    [s.row for s in rows], x.index_select(0, where), out.index_select(0, where),
                    [s.generator for s in rows], predictions.dtype))
        blended = [j for j, s in enumerate(seqs) if s.blend is not None and s.kind is not None]
        if blended:
            updated = self._blend(seqs, updated, blended)
        return updated.to(latents.dtype)

    def _own_step(self, s: Sequence, prediction: torch.Tensor) -> torch.Tensor:
        """A sequence whose scheduler no batched kind covers: its own ``step`` (and blend)."""
        t = s.timesteps[s.i]
        latents = s.scheduler.step(prediction, t, s.latents, **s.step_kwargs,
                                   return_dict=False)[0]
        b = s.blend
        if b is not None:
            known = b.image_latents
            if s.i < len(s.timesteps) - 1:
                nxt = s.timesteps[s.i + 1]
                known = s.scheduler.add_noise(known, b.noise, torch.tensor([nxt]))
            latents = (1 - b.mask) * known + b.mask * latents
        return latents.float()

    @staticmethod
    def _blend(seqs: list[Sequence], updated: torch.Tensor, positions: list[int]) -> torch.Tensor:
        """Inpainting with an ordinary UNet: outside the mask, the init latents noised to
        each row's next timestep (none after the last), as the pipeline blends."""
        coefficients = []
        for j in positions:
            s = seqs[j]
            last = s.i >= len(s.timesteps) - 1
            coefficients.append((1.0, 0.0) if last else s.kind.noise_coefficients(s.row))
        rows = [seqs[j].blend for j in positions]
        c = torch.tensor(coefficients, dtype=torch.float32, device=updated.device)
        shape = (-1, *([1] * (updated.dim() - 1)))
        known = (c[:, 0].view(shape) * torch.cat([b.image_latents for b in rows]).float()
                 + c[:, 1].view(shape) * torch.cat([b.noise for b in rows]).float())
        mask = torch.cat([b.mask for b in rows]).float()
        every = len(positions) == len(seqs)
        where = None if every else torch.tensor(positions, device=updated.device)
        current = updated if every else updated.index_select(0, where)
        mixed = (1 - mask) * known + mask * current
        return mixed if every else updated.index_copy(0, where, mixed)

    def _conditioning(self, group: Any, guided: list[Sequence], seqs: list[Sequence],
                      dtype) -> tuple[dict, RowAdapters | None, int]:
        """The batch's UNet conditioning, its rows' adapters and its padded row count,
        rebuilt only when the group's members change. An unconditional row has its
        request's adapters too, as in the pipelines' guided batch."""
        members = (*(s.seq_id for s in guided), -1, *(s.seq_id for s in seqs))
        cached = self._rows_cache.get(group)
        if cached is not None and cached[0] == members:
            return cached[1]
        family = seqs[0].job.model.family
        kwargs = family.batch_conditioning([s.uncond for s in guided] + [s.cond for s in seqs])
        adapters = RowAdapters.plan([s.job.adapters for s in guided + seqs], self.device,
                                    dtype, self._stacks)
        rows = len(guided) + len(seqs)
        if adapters is None:
            rows = self.bucket(rows)
            if rows > len(guided) + len(seqs):
                kwargs = family.pad_conditioning(kwargs, rows)
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
        """The model's denoiser as the forwards without adapters call it."""
        if not self.compile_unet:
            return model.denoiser
        if model.compiled_unet is None:
            mode = "reduce-overhead" if self.cuda_graphs else None
            model.compiled_unet = torch.compile(model.denoiser, dynamic=False, mode=mode)
        if self.cuda_graphs:
            # Each step is a new replay: the previous step's outputs are consumed.
            torch.compiler.cudagraph_mark_step_begin()
        return model.compiled_unet

    def warm(self, model, height: int, width: int) -> int:
        """Run (and so compile) the model's UNet once at every bucket size for
        ``height`` by ``width`` images; returns how many buckets were run."""
        pipe, family = model.pipeline, model.family
        conds, _ = family.encode_prompts(pipe, [""], [None], [(height, width)], self.device)
        scale = pipe.vae_scale_factor
        for rows in self.buckets or ():
            sample = torch.zeros((rows, pipe.unet.config.in_channels, height // scale,
                                  width // scale), device=self.device, dtype=pipe.unet.dtype)
            timesteps = torch.full((rows,), 500.0, device=self.device)
            # CUDA graphs are recorded on a shape's later runs, after a warm-up run.
            for _ in range(3 if self.cuda_graphs else 1):
                family.forward(self._compiled(model), sample, timesteps,
                               family.batch_conditioning(conds * rows))
        return len(self.buckets or ())

