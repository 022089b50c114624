"""The transformers backend: the model in this process, atelier's own batcher in front.

``AutoModelForImageTextToText`` runs batched ``generate`` calls on the worker
thread of ``batching.AnalysisBatcher``; ``generate`` here submits one prepared
request and turns the batcher's events into the backend-neutral stream the
engine reads (token ids when streaming, then one ``DoneEvent``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from atelier.analysis.backend import DoneEvent
from atelier.analysis.batching import AnalysisBatcher, AnalysisJob
from atelier.analysis.metrics import AnalysisMetrics
from atelier.analysis.structured import JsonGrammars
from atelier.kit.work_queue import EventChannel


class TransformersBackend:
    """Owns the model and the batcher."""

    name = "transformers"

    def __init__(self, config, metrics: AnalysisMetrics, path: str, device: str, dtype,
                 processor) -> None:
        from transformers import AutoModelForImageTextToText

        self.config = config
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        self.model = model.to(device).eval()
        text_config = getattr(self.model.config, "text_config", self.model.config)
        self.context_tokens = text_config.max_position_embeddings
        eos = self.model.generation_config.eos_token_id
        stop_ids = eos if isinstance(eos, list) else [eos]
        vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.grammars = JsonGrammars(processor.tokenizer, vocab_size, stop_ids)
        self.batcher = AnalysisBatcher(
            model=self.model, tokenizer=processor.tokenizer, grammars=self.grammars,
            device=device, max_batch_size=config.max_batch_size,
            max_queue_length=config.max_queue_length,
            batch_wait_ms=config.batch_wait_ms, metrics=metrics)

    @property
    def admission(self):
        return self.batcher.queue

    async def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        await asyncio.to_thread(self.batcher.stop)

    def has_room(self, waiting_elsewhere: int) -> bool:
        return self.batcher.has_room(waiting_elsewhere)

    def retry_hint(self) -> float:
        return self.batcher.retry_hint()

    def arriving(self, delta: int) -> None:
        self.batcher.arriving(delta)

    async def generate(self, prepared, sampling, stream: bool,
                       priority: int) -> AsyncIterator[int | DoneEvent]:
        channel = EventChannel()
        job = AnalysisJob(
            inputs=prepared.inputs, budget=prepared.budget, sampling=sampling,
            emit=channel.emit,
            grammar=prepared.grammar,
            extra_budget=self.config.json_completion_tokens if prepared.grammar else 0,
            stream=stream, priority=priority)
        try:
            try:
                self.batcher.submit(job)
            finally:
                self.batcher.arriving(-1)  # queued (or refused): no longer arriving
            async for event in channel.events():
                yield event
        finally:
            if not job.done:
                self.batcher.cancel(job)
