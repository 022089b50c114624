"""The JSON closing steer as a vLLM logits processor (runs in vLLM's engine core).

A JSON request asks for ``max_tokens = budget + json_completion_tokens`` and
names its budget in ``SamplingParams.extra_args["atelier_close_after"]``. Once
its answer has that many tokens, this processor keeps only the closing tokens
the grammar allows (``structured.ClosingTokens``, the same classes the
transformers backend uses), so a cut-off answer still parses. vLLM applies the
structured-output bitmask before custom logits processors, so the processor
sees logits the grammar has already masked, as ``RowControl`` does.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

CLOSE_AFTER = "atelier_close_after"


class CloseJsonPastBudget(LogitsProcessor):
    """Steers JSON answers past their token budget to close."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        from transformers import AutoTokenizer, GenerationConfig

        from atelier.analysis.structured import ClosingTokens

        # Built with the engine (it reads the whole vocabulary), not at the first JSON
        # request, so no decoding step ever waits for it.
        path = vllm_config.model_config.tokenizer
        eos = GenerationConfig.from_pretrained(path).eos_token_id
        self._closing = ClosingTokens(AutoTokenizer.from_pretrained(path),
                                      eos if isinstance(eos, list) else [eos])
        self._rows: dict[int, tuple[int, list[int]]] = {}  # batch index -> (budget, output)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._rows.pop(index, None)
        for index, params, _, output in batch_update.added:
            budget = (params.extra_args or {}).get(CLOSE_AFTER) if params else None
            if budget is None:
                self._rows.pop(index, None)
            else:
                self._rows[index] = (int(budget), output)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self._rows.pop(a, None), self._rows.pop(b, None)
            if row_a is not None:
                self._rows[b] = row_a
            if row_b is not None and direction.name == "SWAP":
                self._rows[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, (budget, output) in self._rows.items():
            if len(output) >= budget and index < logits.shape[0]:
                self._closing.steer(logits[index], list(output))
        return logits
