"""The seam between the analysis engine and the model: the ``Backend`` protocol, and
the plain data that crosses it (``Sampling`` in, token ids and one ``DoneEvent`` out).

Two backends implement it: ``transformers_backend.TransformersBackend`` (the
model in this process behind atelier's batcher) and ``vllm_backend.VllmBackend``
(vLLM's asynchronous engine). The engine does everything else, alike for both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from atelier.analysis.engine import Prepared
    from atelier.kit.admission import Admission


@dataclass(frozen=True)
class Sampling:
    """Decoding mode; only requests with equal modes share a generate call."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class DoneEvent:
    """The end of one request's generation: every token id and how it stopped."""

    token_ids: list[int]
    stopped_by_eos: bool
    closing: bool
    """The JSON grammar's closing tokens ended it (the budget ran out)."""
    queue_wait_s: float
    first_token_time: float
    """``time.perf_counter()`` when the first token was sampled."""
    end_time: float
    final = True


class Backend(Protocol):
    """What the engine asks of a backend."""

    name: str
    """``transformers`` or ``vllm``, for logs."""
    context_tokens: int
    """The model's context length: prompt plus answer, tokens."""

    @property
    def admission(self) -> Admission:
        """The queue's admission (its refusal is RESOURCE_EXHAUSTED with a retry hint)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def has_room(self, waiting_elsewhere: int) -> bool:
        """Whether one more request fits, counting ``waiting_elsewhere`` requests that
        are admitted but not yet queued (waiting for the decode budget)."""

    def retry_hint(self) -> float:
        """Seconds a refused client should wait before retrying."""

    def arriving(self, delta: int) -> None:
        """A request is being prepared (+1), or has been queued or refused (-1)."""

    def generate(self, prepared: Prepared, sampling: Sampling, stream: bool,
                 priority: int) -> AsyncIterator[int | DoneEvent]:
        """Token ids as they are sampled (when ``stream``), then one DoneEvent. It ends
        the request's arrival (``arriving(-1)``) once queued or refused."""
