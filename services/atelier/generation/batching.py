"""Step-level continuous batching of denoising: the worker loop over three layers.

- ``batch_scheduler.BatchScheduler`` decides (plain data, no model): which
  waiting requests start, which sequences step together, which decode now.
- ``runner.DenoiseRunner`` does the tensor work: text and image encoding at
  admission, one UNet forward per group, guidance (``guidance.py``) and each
  sequence's scheduler step.
- ``output.OutputProcessor`` reports: progress, previews, VAE decode and the
  finished images.

Requests reach the loop through the kit's bounded ``WorkQueue`` (RESOURCE_EXHAUSTED
with a retry hint when full). One worker thread runs every iteration:

1. maintenance tasks (the compiled UNet's warm-up) between steps;
2. requests cancelled while running leave the batch;
3. admission (``BatchScheduler.admit``) and start (``DenoiseRunner.start``);
4. one forward per group (``StepPlan``), then progress;
5. decodes (``DecodePlan``), one VAE pass per group.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from atelier.generation.batch_scheduler import (
    BatchScheduler,
    SequenceState,
    StepPlan,
    WaitingRequest,
)
from atelier.generation.job import Job
from atelier.generation.metrics import GenerationMetrics
from atelier.generation.output import OutputProcessor
from atelier.generation.runner import DenoiseRunner
from atelier.generation.worker_clock import WorkerClock
from atelier.kit.work_queue import Cancelled, Failed, WorkQueue

log = logging.getLogger("atelier.generation.batching")

#: Seconds of waiting counted as idle at a time.
IDLE_SLICE_S = 0.1


class DenoiseBatcher:
    """The worker thread, its queue, and the scheduler, runner and output processor."""

    def __init__(self, *, device: str, max_batch_size: int, max_queue_length: int,
                 min_retry_after_s: float, decode_wait_steps: int,
                 metrics: GenerationMetrics, mix_adapters: bool = True,
                 buckets: list[int] | None = None, compile_unet: bool = False,
                 cuda_graphs: bool = False) -> None:
        self.min_retry_after_s = min_retry_after_s
        self.mix_adapters = mix_adapters
        self.metrics = metrics
        self.scheduler = BatchScheduler(max_batch_size, decode_wait_steps)
        self.clock = WorkerClock(device, lambda phase, seconds:
                                 metrics.worker_seconds.labels(phase).inc(seconds))
        self.runner = DenoiseRunner(device=device, buckets=buckets, compile_unet=compile_unet,
                                    cuda_graphs=cuda_graphs, clock=self.clock)
        self.output = OutputProcessor(metrics, self.clock)
        self.queue: WorkQueue[Job] = WorkQueue(
            max_queue_length, what="generation queue", retry_after_s=self.retry_hint,
            on_reject=metrics.rejected.labels("queue_full").inc,
            on_depth=metrics.queue_depth.set)
        self._running: dict[int, Job] = {}  # by serial
        self._tasks: list[tuple[Callable[[], Any], Future]] = []
        self._tasks_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="denoise-worker", daemon=True)

    # -- called from the event loop -----------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.queue.close(RuntimeError("generation engine stopped"))
        self._thread.join(30)

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse at once with RESOURCE_EXHAUSTED when the queue is full."""
        self.queue.submit(job)

    def cancel(self, job: Job) -> None:
        """A waiting job leaves the queue at once (its slot is free for the next request);
        a running one's sequences leave the batch at the next step."""
        self.queue.cancel(job)
        self.queue.wake()

    def run_on_worker(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the worker thread between two steps."""
        future: Future = Future()
        with self._tasks_lock:
            self._tasks.append((fn, future))
        self.queue.wake()
        return future

    def retry_hint(self) -> float:
        """Seconds a refused client should wait: the batches ahead of it."""
        batches_ahead = (len(self.queue) + 1) / max(1, self.scheduler.max_batch_size)
        return self.output.recent_job.hint(self.min_retry_after_s, batches_ahead)

    # -- the worker thread --------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while self._wait():
                self.clock.begin_iteration()
                with self._tasks_lock:
                    tasks, self._tasks = self._tasks, []
                for fn, future in tasks:
                    _run_task(fn, future)
                try:
                    self._iterate()
                except Exception as exc:  # never let the worker die
                    log.exception("denoising iteration failed")
                    for job in list(self._running.values()):
                        self._fail(job, exc)
                self.clock.end_iteration()
        for job in list(self._running.values()):
            self._fail(job, RuntimeError("generation engine stopped"))

    def _wait(self) -> bool:
        """Block until there is work; False once the queue closed. Waiting is counted
        as idle in slices of ``IDLE_SLICE_S``, so the idle counter grows while the
        worker waits, not in one lump when work arrives."""
        def busy() -> bool:
            return bool(self._tasks or self._running)

        if busy():
            return self.queue.wait(busy=lambda: True)
        while True:
            with self.clock.phase("idle"):
                still_open = self.queue.wait(busy=busy, timeout=IDLE_SLICE_S)
            if not still_open or busy() or len(self.queue):
                return still_open

    def _iterate(self) -> None:
        for job in [j for j in self._running.values() if j.cancelled.is_set()]:
            self._fail(job, None)
        self._start(self.queue.take(self._admissible))
        plan = self.scheduler.schedule()
        for group, ids in plan.groups.items():
            started = time.perf_counter()
            try:
                seqs = self.runner.step(group, ids)
                self.output.after_step(seqs, started)
            except Exception as exc:
                log.exception("denoising step failed")
                self._fail_group(ids, exc)
        self.runner.forget_groups(set(plan.groups))
        self._decode(plan)
        self.metrics.active_sequences.set(len(self.scheduler.running))

    def _admissible(self, waiting: list[Job]) -> list[Job]:
        by_serial = {job.serial: job for job in waiting}
        chosen = self.scheduler.admit(WaitingRequest(job.serial, len(job.seeds))
                                      for job in waiting)
        return [by_serial[r.request_id] for r in chosen]

    def _start(self, jobs: list[Job]) -> None:
        now = time.perf_counter()
        by_model: dict[tuple[int, int], list[Job]] = {}
        for job in jobs:
            by_model.setdefault((id(job.model), id(job.encoder)), []).append(job)
            job.start_time = now
            self.metrics.request_seconds.labels("queue_wait").observe(now - job.enqueue_time)
        for group in by_model.values():
            try:
                seqs = self.runner.start(group)
            except Exception as exc:
                log.exception("starting jobs failed")
                for job in group:
                    job.finish(Failed(exc))
                continue
            for job in group:
                self._running[job.serial] = job
            self.scheduler.add(SequenceState(s.seq_id, s.job.serial, self._group_of(s.job),
                                             len(s.timesteps)) for s in seqs)

    def _group_of(self, job: Job) -> tuple:
        """The forward a job's sequences join: one per UNet and size, whatever the
        adapters; or, with ``mix_adapters`` off, one per adapter set too."""
        return job.group_key if self.mix_adapters else (*job.group_key, job.adapter_key)

    def _decode(self, plan: StepPlan) -> None:
        decodes = self.scheduler.update_after_step(plan)
        for ids in decodes.groups.values():
            seqs = [self.runner.sequences[i] for i in ids]
            self.runner.drop(ids)
            try:
                self.output.decode(seqs)
            except Exception as exc:
                log.exception("decoding failed")
                for job in {s.job for s in seqs}:
                    self._fail(job, exc)
        for serial in [s for s, job in self._running.items() if job.done]:
            del self._running[serial]

    def _fail_group(self, seq_ids: list[int], error: BaseException) -> None:
        for job in {self.runner.sequences[i].job for i in seq_ids if i in self.runner.sequences}:
            self._fail(job, error)

    def _fail(self, job: Job, error: BaseException | None) -> None:
        """Remove a job's sequences; report the error (None: it was cancelled)."""
        self.runner.drop(self.scheduler.abort(job.serial))
        self._running.pop(job.serial, None)
        job.finish(Failed(error if error is not None else Cancelled()))


def _run_task(fn: Callable[[], Any], future: Future) -> None:
    try:
        future.set_result(fn())
    except BaseException as exc:
        future.set_exception(exc)
