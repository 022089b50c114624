"""The text side of a run: every prompt's token ids, and the conditioning of
prompts whose encoders are frozen, computed once before the first step."""

from __future__ import annotations

import torch

from atelier.training.method import text_conditioning
from atelier.training.train_config import TrainConfig


def rendered(spec: TrainConfig) -> set[str]:
    """The prompts rank 0 renders besides the training prompts: validation prompts,
    the scored prompts and class prompts when the job scores itself, and "" (the
    guided renders' negative prompt)."""
    from atelier.training.evaluation import concept_prompts

    out = set(spec.validation_prompts) | {""}
    if spec.evaluation.enabled:
        scored = [concept_prompts(c, spec.evaluation, spec.validation_prompts)
                  for c in spec.concepts]
        out |= {p for c in scored for p, _ in c.prompts} | {c.class_prompt for c in scored}
    return out


def token_ids(tokenizers: list, prompts: list[str]) -> dict[str, list[torch.Tensor]]:
    """Per prompt: its padded token ids for each tokenizer."""
    return {p: [t(p, padding="max_length", truncation=True, max_length=t.model_max_length,
                  return_tensors="pt").input_ids[0] for t in tokenizers] for p in prompts}


def frozen_conditioning(family: str, text_encoders: list, ids: dict[str, list[torch.Tensor]],
                        device) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Per prompt: its (hidden, pooled) conditioning from encoders that do not train."""
    with torch.no_grad():
        return {p: text_conditioning(family, text_encoders, [i[None].to(device) for i in row])
                for p, row in ids.items()}
