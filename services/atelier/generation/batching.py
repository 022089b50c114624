"""Step-level continuous batching of denoising.

Each image of each request is a *sequence* with its own scheduler instance,
its own ``torch.Generator`` (seeded from the request), its own timestep,
guidance scale, guidance rescale and negative prompt. One worker thread runs
the loop; at every iteration it

1. runs maintenance tasks (adapter attach/detach) between steps,
2. drops sequences of cancelled requests,
3. admits waiting requests up to ``max_batch_size`` sequences, encoding all
   their prompts and negative prompts in one text-encoder pass per model,
4. runs **one UNet forward per (model, latent shape) group**, with the
   unconditional and conditional halves concatenated and a per-sample
   timestep tensor, then applies each sequence's guidance and scheduler step,
5. decodes, in one VAE pass per group, the sequences that finished together
   (or within ``decode_wait_steps`` of each other).

The arithmetic per sequence is the one diffusers' ``StableDiffusionPipeline``
performs, so a request's images do not depend on what it was batched with
(tests/generation/test_fidelity.py holds it to the pipeline's output).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils.torch_utils import randn_tensor

from atelier.generation.metrics import GenerationMetrics
from atelier.generation.registry import LoadedModel
from atelier.generation.schedulers import step_kwargs_for
from atelier.kit.errors import ResourceExhausted

log = logging.getLogger("atelier.generation.batching")
_SERIALS = itertools.count()

#: Linear map from SD-1.x latent channels to RGB, for cheap previews.
_LATENT_RGB = torch.tensor([
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
])


# -- events a job reports, from the worker thread -------------------------------------
@dataclass
class Progress:
    step: int
    total_steps: int
    batch_size: int


@dataclass
class Preview:
    step: int
    images: list  # PIL images, 1/8 of the output size


@dataclass
class Finished:
    images: list  # PIL images, in request order
    queue_wait_s: float
    denoise_s: float
    decode_s: float


@dataclass
class Failed:
    error: BaseException


@dataclass(eq=False)
class Job:
    """One request: ``len(seeds)`` images of one prompt with one set of parameters."""

    model: LoadedModel
    prompt: str
    negative_prompt: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    guidance_rescale: float
    seeds: list[int]
    make_scheduler: Callable[[], Any]
    emit: Callable[[Any], None]
    preview_interval: int = 0
    report_progress: bool = True
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueue_time: float = field(default_factory=time.perf_counter)
    start_time: float = 0.0
    first_step_time: float = 0.0
    last_step_time: float = 0.0
    images: dict[int, Any] = field(default_factory=dict)
    decode_s: float = 0.0
    done: bool = False

    @property
    def cfg(self) -> bool:
        # As the pipeline: guidance applies when scale > 1 and the UNet has no
        # guidance embedding.
        return self.guidance_scale > 1.0 and self.model.pipeline.unet.config.time_cond_proj_dim \
            is None

    @property
    def group_key(self) -> tuple:
        return (id(self.model), self.height, self.width)


@dataclass(eq=False)
class Sequence:
    """One image being denoised."""

    job: Job
    index: int
    generator: torch.Generator
    scheduler: Any
    timesteps: list
    latents: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor | None
    step_kwargs: dict
    serial: int = field(default_factory=lambda: next(_SERIALS))  # unique, never reused
    i: int = 0
    decode_wait: int = 0  # steps spent finished, waiting to share a VAE pass

    @property
    def done(self) -> bool:
        return self.i >= len(self.timesteps)


class DenoiseBatcher:
    """The worker thread and its queues."""

    def __init__(self, *, device: str, dtype: torch.dtype, max_batch_size: int,
                 max_queue_length: int, min_retry_after_s: float, decode_wait_steps: int,
                 metrics: GenerationMetrics) -> None:
        self.device = device
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.max_queue_length = max_queue_length
        self.min_retry_after_s = min_retry_after_s
        self.decode_wait_steps = decode_wait_steps
        self.metrics = metrics
        self._cv = threading.Condition()
        self._pending: deque[Job] = deque()
        self._tasks: list[tuple[Callable[[], Any], Future]] = []
        self._active: list[Sequence] = []
        self._stopping = False
        self._recent_job_seconds = 1.0  # moving average, for retry hints
        self._hidden_cache: dict[tuple, tuple[tuple, torch.Tensor]] = {}
        self._thread = threading.Thread(target=self._run, name="denoise-worker", daemon=True)

    # -- called from the event loop -----------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(30)

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse at once with RESOURCE_EXHAUSTED when the queue is full."""
        with self._cv:
            if len(self._pending) >= self.max_queue_length:
                self.metrics.rejected.labels("queue_full").inc()
                raise ResourceExhausted(
                    f"generation queue is full ({self.max_queue_length} requests waiting)",
                    retry_after=self._retry_hint(),
                )
            self._pending.append(job)
            self.metrics.queue_depth.set(len(self._pending))
            self._cv.notify_all()

    def cancel(self, job: Job) -> None:
        """Cancel a job: a waiting one leaves the queue at once (its slot is free for
        the next request), a running one's sequences leave the batch at the next step."""
        job.cancelled.set()
        with self._cv:
            if job in self._pending:
                self._pending.remove(job)
                self.metrics.queue_depth.set(len(self._pending))
                job.done = True  # never admitted: nothing of it is in the batch
            self._cv.notify_all()

    def run_on_worker(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the worker thread between two steps."""
        future: Future = Future()
        with self._cv:
            self._tasks.append((fn, future))
            self._cv.notify_all()
        return future

    def _retry_hint(self) -> float:
        batches_ahead = (len(self._pending) + 1) / max(1, self.max_batch_size)
        return max(self.min_retry_after_s, round(batches_ahead * self._recent_job_seconds, 2))

    # -- the worker thread --------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._stopping or self._pending or self._active or self._tasks):
                        self._cv.wait()
                    if self._stopping:
                        break
                    tasks, self._tasks = self._tasks, []
                    admitted = self._take_admissible()
                for fn, future in tasks:
                    self._run_task(fn, future)
                try:
                    self._iterate(admitted)
                except Exception as exc:  # never let the worker die
                    log.exception("denoising iteration failed")
                    for job in {s.job for s in self._active} | set(admitted):
                        self._fail(job, exc)
        with self._cv:
            for job in self._pending:
                self._fail(job, RuntimeError("generation engine stopped"))
            self._pending.clear()
        for job in {s.job for s in self._active}:
            self._fail(job, RuntimeError("generation engine stopped"))

    @staticmethod
    def _run_task(fn: Callable[[], Any], future: Future) -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    def _take_admissible(self) -> list[Job]:
        """Pop waiting jobs, first come first served, while their images fit the batch."""
        admitted = []
        room = self.max_batch_size - len(self._active)
        while self._pending:
            job = self._pending[0]
            if job.cancelled.is_set():
                self._pending.popleft()
                self._fail(job, None)
                continue
            if len(job.seeds) > room:
                break
            self._pending.popleft()
            room -= len(job.seeds)
            admitted.append(job)
        self.metrics.queue_depth.set(len(self._pending))
        return admitted

    def _iterate(self, admitted: list[Job]) -> None:
        self._drop_cancelled()
        if admitted:
            self._start_jobs(admitted)
        groups: dict[tuple, list[Sequence]] = {}
        for seq in self._active:
            if not seq.done:  # finished ones may be waiting to share a decode
                groups.setdefault(seq.job.group_key, []).append(seq)
        self._each_group(groups, self._step, "denoising step failed")
        for key in set(self._hidden_cache) - set(groups):
            del self._hidden_cache[key]  # groups that emptied
        self._finish_done()
        self.metrics.active_sequences.set(len(self._active))

    def _drop_cancelled(self) -> None:
        cancelled = {s.job for s in self._active if s.job.cancelled.is_set()}
        for job in cancelled:
            self._fail(job, None)

    def _fail(self, job: Job, error: BaseException | None) -> None:
        """Remove a job's sequences; report the error (None: it was cancelled)."""
        self._active = [s for s in self._active if s.job is not job]
        if not job.done:
            job.done = True
            job.emit(Failed(error if error is not None else _Cancelled()))

    # -- admission: text encoding and latent initialisation -------------------------------
    def _start_jobs(self, jobs: list[Job]) -> None:
        by_model: dict[int, list[Job]] = {}
        for job in jobs:
            by_model.setdefault(id(job.model), []).append(job)
        for group in by_model.values():
            try:
                self._start_group(group)
            except Exception as exc:
                log.exception("starting jobs failed")
                for job in group:
                    self._fail(job, exc)

    def _start_group(self, jobs: list[Job]) -> None:
        model = jobs[0].model
        model.activate()
        pipe = model.pipeline
        texts = [job.prompt for job in jobs] + [job.negative_prompt for job in jobs if job.cfg]
        embeddings = self._encode(pipe, texts)
        negatives = iter(range(len(jobs), len(texts)))
        now = time.perf_counter()
        for j, job in enumerate(jobs):
            cond = embeddings[j : j + 1]
            uncond = None
            if job.cfg:
                k = next(negatives)
                uncond = embeddings[k : k + 1]
            job.start_time = now
            self.metrics.request_seconds.labels("queue_wait").observe(now - job.enqueue_time)
            for index, seed in enumerate(job.seeds):
                self._active.append(self._new_sequence(job, index, seed, cond, uncond))

    def _encode(self, pipe, texts: list[str]) -> torch.Tensor:
        tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
        tokens = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        hidden = encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]
        return hidden.to(dtype=encoder.dtype, device=self.device)

    def _new_sequence(self, job: Job, index: int, seed: int, cond, uncond) -> Sequence:
        pipe = job.model.pipeline
        scheduler = job.make_scheduler()
        scheduler.set_timesteps(job.num_inference_steps, device=self.device)
        generator = torch.Generator("cpu").manual_seed(seed)
        scale = pipe.vae_scale_factor
        shape = (1, pipe.unet.config.in_channels, job.height // scale, job.width // scale)
        latents = randn_tensor(shape, generator=generator, device=torch.device(self.device),
                               dtype=cond.dtype)
        latents = latents * scheduler.init_noise_sigma
        accepted = step_kwargs_for(type(scheduler))
        kwargs = {}
        if "eta" in accepted:
            kwargs["eta"] = 0.0
        if "generator" in accepted:
            kwargs["generator"] = generator
        return Sequence(job, index, generator, scheduler, list(scheduler.timesteps), latents,
                        cond, uncond, kwargs)

    # -- one batched step -----------------------------------------------------------------
    def _step(self, seqs: list[Sequence]) -> None:
        start = time.perf_counter()
        model = seqs[0].job.model
        model.activate()
        unet = model.pipeline.unet
        guided = [s for s in seqs if s.uncond is not None]
        order = guided + seqs  # unconditional halves first, then every conditional half
        scaled = {}
        for s in seqs:
            t = s.timesteps[s.i]
            scaled[id(s)] = s.scheduler.scale_model_input(s.latents, t)
        sample = torch.cat([scaled[id(s)] for s in order])
        timesteps = torch.tensor([float(s.timesteps[s.i]) for s in order],
                                 device=self.device, dtype=torch.float32)
        hidden = self._hidden_states(seqs[0].job.group_key, guided, order)
        noise = unet(sample, timesteps, encoder_hidden_states=hidden, return_dict=False)[0]
        uncond_out, cond_out = noise[: len(guided)], noise[len(guided):]
        guided_pred = None
        if guided:
            # Every guided sequence's own scale, applied in one operation.
            where = torch.tensor([j for j, s in enumerate(seqs) if s.uncond is not None],
                                 device=noise.device)
            scales = torch.tensor([s.job.guidance_scale for s in guided], dtype=noise.dtype,
                                  device=noise.device).view(-1, 1, 1, 1)
            text_out = cond_out.index_select(0, where)
            guided_pred = uncond_out + scales * (text_out - uncond_out)
        g = 0
        for j, s in enumerate(seqs):
            pred = cond_out[j : j + 1]
            if s.uncond is not None:
                text = pred
                pred = guided_pred[g : g + 1]
                if s.job.guidance_rescale > 0.0:
                    pred = rescale_noise_cfg(pred, text, guidance_rescale=s.job.guidance_rescale)
                g += 1
            s.latents = s.scheduler.step(pred, s.timesteps[s.i], s.latents, **s.step_kwargs,
                                         return_dict=False)[0]
            s.i += 1
        now = time.perf_counter()
        self.metrics.unet_step_seconds.observe(now - start)
        self.metrics.batch_size.observe(len(seqs))
        for job in {s.job: None for s in seqs}:
            if not job.first_step_time:
                job.first_step_time = start
            job.last_step_time = now
            if not job.report_progress:
                continue
            step = next(s.i for s in seqs if s.job is job)
            total = len(next(s.timesteps for s in seqs if s.job is job))
            job.emit(Progress(step, total, len(seqs)))
            if job.preview_interval and step % job.preview_interval == 0 and step < total:
                job.emit(Preview(step, self._previews([s for s in seqs if s.job is job])))

    def _hidden_states(self, group_key: tuple, guided: list[Sequence],
                       order: list[Sequence]) -> torch.Tensor:
        """The batch's text embeddings, rebuilt only when the group's members change."""
        members = tuple(s.serial for s in order)
        cached = self._hidden_cache.get(group_key)
        if cached is not None and cached[0] == members:
            return cached[1]
        hidden = torch.cat([s.uncond for s in guided] + [s.cond for s in order[len(guided):]])
        self._hidden_cache[group_key] = (members, hidden)
        return hidden

    def _previews(self, seqs: list[Sequence]) -> list:
        from PIL import Image

        latents = torch.cat([s.latents for s in sorted(seqs, key=lambda s: s.index)]).float()
        rgb = torch.einsum("bchw,cr->bhwr", latents.cpu(), _LATENT_RGB)
        rgb = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
        return [Image.fromarray(frame) for frame in rgb]

    # -- decode -------------------------------------------------------------------------
    def _finish_done(self) -> None:
        """Decode finished sequences, one VAE pass per group.

        A group's finished sequences wait (at most ``decode_wait_steps`` steps) when
        another of its sequences will finish within that many steps, so that they
        share the VAE pass instead of each paying for a small one.
        """
        finished = [s for s in self._active if s.done]
        if not finished:
            return
        groups: dict[tuple, list[Sequence]] = {}
        for s in finished:
            groups.setdefault(s.job.group_key, []).append(s)
        for key in list(groups):
            soon = [s for s in self._active if s.job.group_key == key and not s.done
                    and len(s.timesteps) - s.i <= self.decode_wait_steps]
            waited = max(s.decode_wait for s in groups[key])
            if soon and waited < self.decode_wait_steps:
                for s in groups.pop(key):
                    s.decode_wait += 1
        decoding = {id(s) for seqs in groups.values() for s in seqs}
        self._active = [s for s in self._active if id(s) not in decoding]
        self._each_group(groups, self._decode, "decoding failed")

    def _each_group(self, groups: dict, work: Callable[[list[Sequence]], None],
                    failure: str) -> None:
        """Run ``work`` on each group; a group that raises fails only its own requests."""
        for seqs in groups.values():
            try:
                work(seqs)
            except Exception as exc:
                log.exception(failure)
                for job in {s.job for s in seqs}:
                    self._fail(job, exc)

    def _decode(self, seqs: list[Sequence]) -> None:
        start = time.perf_counter()
        pipe = seqs[0].job.model.pipeline
        latents = torch.cat([s.latents for s in seqs])
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        images = pipe.image_processor.postprocess(image, output_type="pil",
                                                  do_denormalize=[True] * len(seqs))
        elapsed = time.perf_counter() - start
        for s, img in zip(seqs, images, strict=True):
            s.job.images[s.index] = img
        for job in {s.job: None for s in seqs}:
            job.decode_s += elapsed
            if len(job.images) == len(job.seeds) and not job.done:
                job.done = True
                compute = time.perf_counter() - job.start_time
                self.metrics.request_seconds.labels("compute").observe(compute)
                self.metrics.images.labels(job.model.model_id).inc(len(job.seeds))
                self._recent_job_seconds = 0.8 * self._recent_job_seconds + 0.2 * compute
                job.emit(Finished(
                    [job.images[i] for i in range(len(job.seeds))],
                    queue_wait_s=job.start_time - job.enqueue_time,
                    denoise_s=job.last_step_time - job.first_step_time,
                    decode_s=job.decode_s,
                ))


class _Cancelled(Exception):
    """The job was cancelled by its caller; nobody waits for an answer."""
