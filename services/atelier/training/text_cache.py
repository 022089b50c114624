"""The text cache: every prompt of a job encoded once, for families whose text
encoder never trains (FLUX.2 [klein]'s Qwen3 is large next to a LoRA).

Rank 0 loads the encoder, encodes every prompt the job can use (captions, class
prompts, validation and evaluation prompts, and the empty negative prompt the
guided renders use), stores the states with the job
(``jobs/<id>/cache/text-<fingerprint>.safetensors``) and lets the encoder go;
every rank then loads the file. A resumed run finds the file and never loads
the encoder. The fingerprint covers the base model and the prompts, so a stale
cache is never read.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from collections.abc import Callable, Iterable

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from atelier.models.families import family_named
from atelier.training.jobs import job_key

log = logging.getLogger("atelier.training.text_cache")
ENCODE_BATCH = 8


def fingerprint(base_ref: str, family: str, prompts: list[str]) -> str:
    payload = json.dumps({"base": base_ref, "family": family, "prompts": sorted(prompts)})
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def cache_key(job_id: str, fingerprint_: str) -> str:
    return job_key(job_id, "cache", f"text-{fingerprint_}.safetensors")


def encode(family: str, tokenizer, encoder, prompts: list[str], device) -> dict[str, torch.Tensor]:
    """Each prompt's hidden states ``(1, L, D)``, float32 on the CPU."""
    model = family_named(family)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for start in range(0, len(prompts), ENCODE_BATCH):
            chunk = prompts[start:start + ENCODE_BATCH]
            hidden = model.prompt_states(tokenizer, encoder, chunk, device).float().cpu()
            out.update({p: hidden[i : i + 1].contiguous() for i, p in enumerate(chunk)})
    return out


def build_or_load(store, job_id: str, family: str, prompts: Iterable[str], *, base_ref: str,
                  model_path: str, tokenizer, device, rank: int, barrier: Callable[[], None]
                  ) -> dict[str, tuple[torch.Tensor, None]]:
    """Prompt -> (hidden states, None), as ``Batch.embeddings`` takes them, on ``device``.
    The encoder (the base's at ``model_path``) is loaded on rank 0, and only when the
    store lacks the cache."""
    from atelier.training.models import load_text_encoder

    prompts = sorted(set(prompts))
    key = cache_key(job_id, fingerprint(base_ref, family, prompts))
    if rank == 0 and not store.exists(key):
        encoder = load_text_encoder(model_path, family).to(device)
        states = encode(family, tokenizer, encoder, prompts, device)
        del encoder
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        store.put_bytes(key, save_safetensors(_named(states)))
        log.info("text cache stored", extra={"job": job_id, "prompts": len(states)})
    barrier()  # every rank, every time: none reads before rank 0 has written
    states = load_safetensors(store.get_bytes(key))
    return {p: (states[f"p{i}"].to(device), None) for i, p in enumerate(prompts)}


def _named(states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors keyed by each prompt's index in the sorted prompts (any text is safe)."""
    return {f"p{i}": states[p] for i, p in enumerate(sorted(states))}
