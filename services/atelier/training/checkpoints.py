"""Full-state checkpoints in the object store, and keeping the last K.

A checkpoint at step n is the folder ``jobs/<id>/checkpoints/step-<n>/``:

- ``trainable.safetensors``: the trainable weights (LoRA adapters, or the full
  UNet and text encoder), fp32;
- ``optimizer.pt``, ``lr_scheduler.pt``, ``grad_scaler.pt``: their state dicts,
  loaded back with ``torch.load(weights_only=True)`` (no arbitrary unpickling);
- ``ema.safetensors``: the EMA of the trainable weights, when the job keeps one
  (its step count is in ``state.json``);
- ``rng-rank<r>.pt``: the torch, numpy and Python RNG states of every rank;
- ``state.json``: global step, data position and the loss curve so far;
- ``complete.json``: written last, after every rank has written its part.

Only complete checkpoints are ever resumed from.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterable

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from atelier.storage import ObjectStore
from atelier.training.jobs import job_key


def checkpoint_prefix(job_id: str, step: int) -> str:
    return job_key(job_id, "checkpoints", f"step-{step:08d}")


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _torch_load(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].copy()),
            "numpy_pos": np_state[2], "python": repr(random.getstate())}


def restore_rng(state: dict) -> None:
    import ast

    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy(), state["numpy_pos"], 0, 0.0))
    random.setstate(ast.literal_eval(state["python"]))


def save_rank_part(store: ObjectStore, job_id: str, step: int, rank: int) -> None:
    store.put_bytes(f"{checkpoint_prefix(job_id, step)}/rng-rank{rank}.pt",
                    _torch_bytes(rng_state()))


def save_main_part(store: ObjectStore, job_id: str, step: int, *, trainable: dict,
                   optimizer, lr_scheduler, scaler, state: dict,
                   ema: dict | None = None) -> None:
    prefix = checkpoint_prefix(job_id, step)
    store.put_bytes(f"{prefix}/trainable.safetensors", save_safetensors(trainable))
    if ema is not None:
        store.put_bytes(f"{prefix}/ema.safetensors", save_safetensors(ema))
    store.put_bytes(f"{prefix}/optimizer.pt", _torch_bytes(optimizer.state_dict()))
    store.put_bytes(f"{prefix}/lr_scheduler.pt", _torch_bytes(lr_scheduler.state_dict()))
    if scaler is not None:
        store.put_bytes(f"{prefix}/grad_scaler.pt", _torch_bytes(scaler.state_dict()))
    store.put_json(f"{prefix}/state.json", state)


def seal(store: ObjectStore, job_id: str, step: int) -> None:
    """Mark a checkpoint complete: every rank has written its part."""
    store.put_json(f"{checkpoint_prefix(job_id, step)}/complete.json", {"step": step})


def prune(store: ObjectStore, job_id: str, keep_last: int,
          protect: Iterable[int] = ()) -> list[int]:
    """Delete all complete checkpoints but the newest ``keep_last`` and the ``protect``ed
    ones (the best-scored, while it is the export's candidate); return the kept steps."""
    steps = complete_steps(store, job_id)
    keep = set(steps[-keep_last:]) | set(protect)
    for old in steps:
        if old not in keep:
            store.delete_prefix(checkpoint_prefix(job_id, old) + "/")
    return [s for s in steps if s in keep]


def complete_steps(store: ObjectStore, job_id: str) -> list[int]:
    steps = []
    for info in store.list(job_key(job_id, "checkpoints") + "/"):
        if info.key.endswith("/complete.json"):
            steps.append(int(info.key.split("/")[-2].removeprefix("step-")))
    return sorted(steps)


def latest_step(store: ObjectStore, job_id: str) -> int | None:
    steps = complete_steps(store, job_id)
    return steps[-1] if steps else None


def load_trainable(store: ObjectStore, job_id: str, step: int) -> dict[str, torch.Tensor]:
    return load_safetensors(store.get_bytes(f"{checkpoint_prefix(job_id, step)}/"
                                            "trainable.safetensors"))


def load_ema_weights(store: ObjectStore, job_id: str, step: int) -> dict[str, torch.Tensor]:
    return load_safetensors(store.get_bytes(f"{checkpoint_prefix(job_id, step)}/"
                                            "ema.safetensors"))


def load_into(store: ObjectStore, job_id: str, step: int, rank: int, *, optimizer,
              lr_scheduler, scaler) -> dict:
    """Restore optimizer, schedule, scaler and this rank's RNG; return state.json."""
    prefix = checkpoint_prefix(job_id, step)
    optimizer.load_state_dict(_torch_load(store.get_bytes(f"{prefix}/optimizer.pt")))
    lr_scheduler.load_state_dict(_torch_load(store.get_bytes(f"{prefix}/lr_scheduler.pt")))
    if scaler is not None and store.exists(f"{prefix}/grad_scaler.pt"):
        scaler.load_state_dict(_torch_load(store.get_bytes(f"{prefix}/grad_scaler.pt")))
    rng_key = f"{prefix}/rng-rank{rank}.pt"
    if store.exists(rng_key):
        restore_rng(_torch_load(store.get_bytes(rng_key)))
    return json.loads(store.get_bytes(f"{prefix}/state.json"))
