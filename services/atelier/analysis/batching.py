"""Batched generation: concurrent requests share one ``generate`` call.

Requests arrive already preprocessed (one row of processor output each). The
worker thread takes up to ``max_batch_size`` requests with the same decoding
mode, left-pads their token rows, concatenates their image and video patches
in row order, and runs one ``generate``. Requests are taken by priority
(lower values first), then in arrival order. Each row keeps its own token budget,
grammar, stream and cancellation (``structured.Row``), so a request's greedy
answer does not depend on its batch-mates.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from atelier.analysis.backend import DoneEvent, Sampling
from atelier.analysis.metrics import AnalysisMetrics
from atelier.analysis.structured import JsonGrammars, Row, RowControl, RowStop
from atelier.kit.retry_hint import RecentSeconds
from atelier.kit.work_queue import Failed, WorkItem, WorkQueue

log = logging.getLogger("atelier.analysis.batching")

_PADDED_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")
_CONCAT_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


@dataclass(eq=False, kw_only=True)
class AnalysisJob(WorkItem):
    """One request, preprocessed into a single row of model inputs. Between its
    submission and its DoneEvent it emits token ids when ``stream``."""

    inputs: dict[str, torch.Tensor]
    budget: int
    sampling: Sampling
    grammar: Any = None
    extra_budget: int = 0
    stream: bool = False
    priority: int = 0


class AnalysisBatcher:
    """The worker thread, its bounded queue, and collation."""

    def __init__(self, *, model, tokenizer, grammars: JsonGrammars | None, device: str,
                 max_batch_size: int, max_queue_length: int, batch_wait_ms: float,
                 metrics: AnalysisMetrics) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.grammars = grammars
        self.device = device
        self.max_batch_size = max_batch_size
        self.max_queue_length = max_queue_length
        self.batch_wait_s = batch_wait_ms / 1000
        self.metrics = metrics
        config = model.generation_config
        eos = config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = config.pad_token_id if config.pad_token_id is not None \
            else tokenizer.pad_token_id
        self._running: list[AnalysisJob] = []
        self._recent_batch = RecentSeconds()
        self.queue: WorkQueue[AnalysisJob] = WorkQueue(
            max_queue_length, what="analysis queue", retry_after_s=self.retry_hint,
            on_reject=metrics.rejected.labels("queue_full").inc,
            on_depth=metrics.queue_depth.set)
        self._thread = threading.Thread(target=self._run, name="analysis-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker; a generate call in progress ends at its next token."""
        for job in list(self._running):
            job.cancelled.set()
        self.queue.close(RuntimeError("analysis engine stopped"))
        self._thread.join(60)

    def arriving(self, delta: int) -> None:
        """Count requests being prepared (+1 when one starts, -1 when it is submitted or
        fails), so the worker can wait briefly for them to join a batch."""
        self.queue.arriving(delta)

    def retry_hint(self) -> float:
        """Seconds a refused client should wait: about one batch."""
        return self._recent_batch.hint()

    def has_room(self, waiting_elsewhere: int = 0) -> bool:
        """Whether one more request fits the queue, counting those waiting, being
        prepared, and ``waiting_elsewhere`` (for admission) as its occupants."""
        return self.queue.has_room(waiting_elsewhere)

    def submit(self, job: AnalysisJob) -> None:
        self.queue.submit(job)

    def cancel(self, job: AnalysisJob) -> None:
        """Cancel a job: a waiting one leaves the queue now, a running row stops at its
        next token."""
        self.queue.cancel(job)

    # -- worker thread --------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                break
            if not batch:  # everything waiting had been cancelled
                continue
            try:
                self._generate(batch)
            except Exception as exc:
                log.exception("batched generation failed")
                for job in batch:
                    job.finish(Failed(exc))
            self._running = []

    def _next_batch(self) -> list[AnalysisJob] | None:
        if not self.queue.wait():
            return None
        # Requests already being prepared (media decoding, tokenizing) join this
        # batch if they are ready within batch_wait_s; nobody else is waited for.
        self.queue.wait_for_arrivals(self.max_batch_size, self.batch_wait_s)
        batch = self.queue.take(self._select)
        self._running = batch
        return batch

    def _select(self, waiting: list[AnalysisJob]) -> list[AnalysisJob]:
        """Lower priority values first, then arrival (sorted() is stable); one decoding
        mode per batch, and a seeded sample alone (it needs its own generator)."""
        batch: list[AnalysisJob] = []
        mode = None
        for job in sorted(waiting, key=lambda j: j.priority):
            if mode is None:
                mode = job.sampling
            solo = mode.seed is not None
            if job.sampling == mode and len(batch) < self.max_batch_size and \
                    not (solo and batch):
                batch.append(job)
        return batch

    def _collate(self, jobs: list[AnalysisJob]) -> dict[str, torch.Tensor]:
        """Left-pad token rows; concatenate vision inputs in row order."""
        length = max(job.inputs["input_ids"].shape[1] for job in jobs)
        batch: dict[str, torch.Tensor] = {}
        for key in _PADDED_KEYS:
            if key not in jobs[0].inputs:
                continue
            fill = self.pad_id if key == "input_ids" else 0
            rows = []
            for job in jobs:
                row = job.inputs[key]
                pad = torch.full((1, length - row.shape[1]), fill, dtype=row.dtype)
                rows.append(torch.cat([pad, row], dim=1))
            batch[key] = torch.cat(rows)
        for key in _CONCAT_KEYS:
            parts = [job.inputs[key] for job in jobs if key in job.inputs]
            if parts:
                batch[key] = torch.cat(parts)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _generate(self, jobs: list[AnalysisJob]) -> None:
        start = time.perf_counter()
        first_token = [0.0] * len(jobs)

        def on_token(i: int, job: AnalysisJob):
            def handle(token_id: int) -> None:
                if not first_token[i]:
                    first_token[i] = time.perf_counter()
                if job.stream:
                    job.emit(token_id)
            return handle

        rows = [Row(budget=job.budget, grammar=job.grammar, extra_budget=job.extra_budget,
                    cancelled=job.cancelled.is_set, on_token=on_token(i, job))
                for i, job in enumerate(jobs)]
        inputs = self._collate(jobs)
        sampling = jobs[0].sampling
        kwargs: dict[str, Any] = {"do_sample": not sampling.greedy}
        if not sampling.greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k)
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
        if sampling.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = sampling.repetition_penalty
        max_new = max(job.budget + job.extra_budget for job in jobs)
        self.metrics.batch_size.observe(len(jobs))
        with torch.inference_mode():
            self.model.generate(
                **inputs,
                max_new_tokens=max_new,
                logits_processor=LogitsProcessorList([RowControl(rows, self.grammars)]),
                stopping_criteria=StoppingCriteriaList([RowStop(rows, self.eos_ids)]),
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids),
                **kwargs,
            )
        end = time.perf_counter()
        self._recent_batch.observe(end - start)
        produced = sum(len(r.tokens) for r in rows)
        self.metrics.tokens.inc(produced)
        if end > start:
            self.metrics.tokens_per_second.set(produced / (end - start))
        for i, (job, row) in enumerate(zip(jobs, rows, strict=True)):
            if job.cancelled.is_set():
                job.finish(None)
                continue
            job.finish(DoneEvent(
                token_ids=row.tokens, stopped_by_eos=row.stopped_by_eos, closing=row.closing,
                queue_wait_s=start - job.enqueue_time,
                first_token_time=first_token[i] or end, end_time=end))
