"""What leaves the denoising loop: progress and previews after a step, images after a decode.

``after_step`` reports each request of a stepped group once (its step count, the
group's batch size, and a cheap latent preview every ``preview_interval``
steps). ``decode`` runs one VAE pass for sequences that finished together and
sends ``Finished`` to each request whose images are all done.
"""

from __future__ import annotations

import time

import torch

from atelier.generation.job import Finished, Job, Preview, Progress
from atelier.generation.metrics import GenerationMetrics
from atelier.generation.runner import Sequence
from atelier.generation.worker_clock import WorkerClock
from atelier.kit.retry_hint import RecentSeconds


class OutputProcessor:
    """Events and images for the requests of the batch."""

    def __init__(self, metrics: GenerationMetrics, clock: WorkerClock | None = None) -> None:
        self.metrics = metrics
        self.clock = clock if clock is not None else WorkerClock()
        self.recent_job = RecentSeconds()  # for retry hints

    def after_step(self, seqs: list[Sequence], started: float) -> None:
        now = time.perf_counter()
        self.metrics.unet_step_seconds.observe(now - started)
        self.metrics.batch_size.observe(len(seqs))
        self.metrics.forward_rows.observe(len(seqs) + sum(s.uncond is not None for s in seqs))
        self.metrics.forward_adapters.observe(
            len({id(use.adapter) for s in seqs for use in s.job.adapters}))
        by_job: dict[Job, list[Sequence]] = {}
        for s in seqs:
            by_job.setdefault(s.job, []).append(s)
        for job, own in by_job.items():
            if not job.first_step_time:
                job.first_step_time = started
            job.last_step_time = now
            if not job.report_progress:
                continue
            step, total = own[0].i, len(own[0].timesteps)
            job.emit(Progress(step, total, len(seqs)))
            if job.preview_interval and step % job.preview_interval == 0 and step < total:
                job.emit(Preview(step, _previews(own)))

    def decode(self, seqs: list[Sequence]) -> None:
        start = time.perf_counter()
        first = seqs[0].job
        pipe = first.model.pipeline
        latents = torch.cat([s.latents for s in seqs])
        with self.clock.phase("vae_decode"):
            image = first.model.family.decode(pipe, latents, (first.height, first.width))
        images = pipe.image_processor.postprocess(image, output_type="pil",
                                                  do_denormalize=[True] * len(seqs))
        elapsed = time.perf_counter() - start
        for s, img in zip(seqs, images, strict=True):
            s.job.images[s.index] = img
        for job in {s.job: None for s in seqs}:
            job.decode_s += elapsed
            if len(job.images) == len(job.seeds) and not job.done:
                compute = time.perf_counter() - job.start_time
                self.metrics.request_seconds.labels("compute").observe(compute)
                label = job.model_id or job.model.model_id
                self.metrics.images.labels(label, job.mode).inc(len(job.seeds))
                self.recent_job.observe(compute)
                job.finish(Finished(
                    [job.images[i] for i in range(len(job.seeds))],
                    queue_wait_s=job.start_time - job.enqueue_time,
                    denoise_s=job.last_step_time - job.first_step_time,
                    decode_s=job.decode_s,
                ))


def _previews(seqs: list[Sequence]) -> list:
    from PIL import Image

    latents = torch.cat([s.latents for s in sorted(seqs, key=lambda s: s.index)]).float()
    job = seqs[0].job
    rgb = job.model.family.preview(latents, (job.height, job.width))
    rgb = rgb.mul(255).round().to(torch.uint8).numpy()
    return [Image.fromarray(frame) for frame in rgb]
