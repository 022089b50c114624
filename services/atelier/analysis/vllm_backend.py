"""The vLLM backend: vLLM's asynchronous engine in the service process.

Requests go straight into ``AsyncLLM`` (vLLM v1): its scheduler does the
continuous batching, paged KV cache and prefix caching; atelier adds only its
admission limits in front. ``request_to_vllm`` maps a prepared request onto
vLLM's inputs as plain data (unit-tested without an engine): the chat prompt
with the model's vision placeholders, ``multi_modal_data`` with the decoded
images and the sampled video frames (timestamps as metadata, as the
transformers backend passes them), and sampling settings, including the JSON
grammar and the closing budget (``vllm_closing.py``).

Leaving ``generate`` early (a cancelled RPC, an expired deadline) aborts the
request inside the engine, which frees its KV blocks. vLLM's own engine metrics
(``vllm:*``: KV-cache use, running and waiting requests, ...) are exposed on
the service's ``/metrics`` next to the ``atelier_analysis_*`` series.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.registry import Collector

from atelier.analysis.backend import DoneEvent, Sampling
from atelier.analysis.metrics import AnalysisMetrics
from atelier.analysis.vllm_closing import CLOSE_AFTER
from atelier.kit.retry_hint import RecentSeconds
from atelier.kit.work_queue import Admission


@dataclass
class VllmRequest:
    """What vLLM needs for one request."""

    prompt: dict[str, Any]
    sampling: dict[str, Any]


def request_to_vllm(*, prompt: str, images: list, video=None, sampling: Sampling,
                    max_new_tokens: int, grammar: str | None = None,
                    closing_tokens: int = 0) -> VllmRequest:
    """Map one request; ``video`` is a DecodedVideo (frames and timestamps) or None.
    ``grammar`` is a JSON answer's grammar as EBNF text: the very grammar the
    transformers backend compiles (from the schema, or any JSON value), so both
    backends constrain alike. A JSON answer may run ``closing_tokens`` past
    ``max_new_tokens`` to close."""
    multi_modal: dict[str, Any] = {}
    if images:
        multi_modal["image"] = images if len(images) > 1 else images[0]
    if video is not None:
        rate = 1000.0  # timestamps in milliseconds, as frame indices at 1 kHz
        multi_modal["video"] = (video.frames, {
            "fps": rate,
            "frames_indices": [round(t * rate) for t in video.timestamps],
            "total_num_frames": len(video.timestamps),
            "duration": video.timestamps[-1] if video.timestamps else 0.0,
            "do_sample_frames": False,
        })
    params: dict[str, Any] = {
        "max_tokens": max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k if sampling.top_k > 0 else -1,
        "repetition_penalty": sampling.repetition_penalty,
    }
    if sampling.seed is not None:
        params["seed"] = sampling.seed
    if grammar is not None:
        params["structured_outputs"] = {"grammar": grammar}
        params["max_tokens"] = max_new_tokens + closing_tokens
        params["extra_args"] = {CLOSE_AFTER: max_new_tokens}
    prompt_input: dict[str, Any] = {"prompt": prompt}
    if multi_modal:
        prompt_input["multi_modal_data"] = multi_modal
    return VllmRequest(prompt=prompt_input, sampling=params)


def sampling_params(request: VllmRequest):
    """vLLM ``SamplingParams`` for a mapped request: token ids only, as deltas."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    kwargs = dict(request.sampling)
    structured = kwargs.pop("structured_outputs", None)
    if structured is not None:
        kwargs["structured_outputs"] = StructuredOutputsParams(**structured)
    return SamplingParams(**kwargs, detokenize=False, output_kind=RequestOutputKind.DELTA)


class VllmMetrics(Collector):
    """vLLM's engine series (``vllm:*``, in the process registry) on the service's own
    registry; their names cannot clash with ``atelier_*``."""

    def collect(self):
        for family in REGISTRY.collect():
            if family.name.startswith("vllm:"):
                yield family


class VllmBackend:
    """One ``AsyncLLM`` per service; admission counts the requests inside it."""

    name = "vllm"

    def __init__(self, config, metrics: AnalysisMetrics, path: str, device: str,
                 dtype: str) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        from atelier.analysis.vllm_compat import allow_unexpanded_video_placeholders
        from atelier.analysis.vllm_settings import engine_args

        allow_unexpanded_video_placeholders()
        self.config = config
        self.metrics = metrics
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        args = engine_args(config, path, device,
                           {"float32": "float32", "float16": "float16",
                            "bfloat16": "bfloat16"}.get(dtype, "auto"))
        self.engine = AsyncLLM.from_engine_args(args)
        self.context_tokens = self.engine.model_config.max_model_len
        # Requests admitted: being prepared or inside the engine (which queues them).
        self.admission = Admission(
            config.vllm.max_num_seqs + config.max_queue_length, what="analysis queue",
            retry_after_s=self.retry_hint, on_reject=metrics.rejected.labels("queue_full").inc)
        self._waiting = 0  # of those, the ones without a first token yet
        self._ids = itertools.count()
        self._recent_request = RecentSeconds()
        metrics.registry.register(VllmMetrics())

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        await asyncio.to_thread(self.engine.shutdown)

    def has_room(self, waiting_elsewhere: int) -> bool:
        return self.admission.has_room(waiting_elsewhere)

    def retry_hint(self) -> float:
        return self._recent_request.hint()

    def arriving(self, delta: int) -> None:
        """+1 admits a request; it leaves when ``generate`` ends (or with -1 when its
        preparation fails). Until its first token it counts as queued."""
        self.admission.arriving(delta)
        self._queued(delta)

    def _queued(self, delta: int) -> None:
        self._waiting += delta
        self.metrics.queue_depth.set(self._waiting)

    async def generate(self, prepared, sampling: Sampling, stream: bool,
                       priority: int) -> AsyncIterator[int | DoneEvent]:
        request = request_to_vllm(
            prompt=prepared.prompt, images=prepared.images, video=prepared.video,
            sampling=sampling, max_new_tokens=prepared.budget,
            grammar=str(prepared.grammar.grammar) if prepared.grammar is not None else None,
            closing_tokens=self.config.json_completion_tokens)
        start = time.perf_counter()
        tokens: list[int] = []
        first = 0.0
        finish = None
        try:
            async for output in self.engine.generate(
                    request.prompt, sampling_params(request), f"analysis-{next(self._ids)}",
                    priority=priority):
                new = output.outputs[0].token_ids
                if new and not first:
                    first = time.perf_counter()
                    self._queued(-1)
                tokens.extend(new)
                if stream:
                    for token in new:
                        yield token
                if output.finished:
                    finish = output.outputs[0].finish_reason
        finally:
            self.admission.arriving(-1)
            if not first:
                self._queued(-1)
        end = time.perf_counter()
        self._recent_request.observe(end - start)
        self.metrics.tokens.inc(len(tokens))
        if first and end > first and len(tokens) > 1:  # this request's decode rate
            self.metrics.tokens_per_second.set((len(tokens) - 1) / (end - first))
        stats = getattr(output, "metrics", None)
        queue_wait = max(0.0, stats.scheduled_ts - stats.queued_ts) \
            if stats is not None and stats.scheduled_ts else 0.0
        yield DoneEvent(token_ids=tokens, stopped_by_eos=finish == "stop",
                        closing=prepared.grammar is not None and len(tokens) > prepared.budget,
                        queue_wait_s=queue_wait, first_token_time=first or end, end_time=end)
