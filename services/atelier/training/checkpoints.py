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
- ``complete.json``: the seal, written last, after every rank has written its
  part: the step and the SHA-256 of every file above.

Only sealed checkpoints are ever resumed from, and only intact ones: before a
resume each file is hashed again and compared with its seal. A checkpoint with
a missing, truncated or altered file is skipped for the newest intact one
(``latest_intact``). Seals from before the hashes were kept are trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Callable, Iterable

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from atelier.storage import ObjectNotFound, ObjectStore
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


SEAL = "complete.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_rank_part(store: ObjectStore, job_id: str, step: int, rank: int) -> None:
    store.put_bytes(f"{checkpoint_prefix(job_id, step)}/rng-rank{rank}.pt",
                    _torch_bytes(rng_state()))


def save_main_part(store: ObjectStore, job_id: str, step: int, *, trainable: dict,
                   optimizer, lr_scheduler, scaler, state: dict,
                   ema: dict | None = None) -> dict[str, str]:
    """Write rank 0's files; return their SHA-256 by file name, for the seal."""
    prefix = checkpoint_prefix(job_id, step)
    files = {"trainable.safetensors": save_safetensors(trainable),
             "optimizer.pt": _torch_bytes(optimizer.state_dict()),
             "lr_scheduler.pt": _torch_bytes(lr_scheduler.state_dict()),
             "state.json": json.dumps(state, sort_keys=True, indent=1).encode()}
    if ema is not None:
        files["ema.safetensors"] = save_safetensors(ema)
    if scaler is not None:
        files["grad_scaler.pt"] = _torch_bytes(scaler.state_dict())
    for name, data in files.items():
        store.put_bytes(f"{prefix}/{name}", data, content_type="application/json"
                        if name.endswith(".json") else "application/octet-stream")
    return {name: _sha256(data) for name, data in files.items()}


def seal(store: ObjectStore, job_id: str, step: int, digests: dict[str, str]) -> None:
    """Mark a checkpoint complete (every rank has written its part), with the SHA-256 of
    each file: ``digests`` of rank 0's, and the ranks' RNG files read back (small)."""
    prefix = checkpoint_prefix(job_id, step)
    hashes = dict(digests)
    for info in store.list(prefix + "/"):
        name = info.key.rsplit("/", 1)[-1]
        if name.startswith("rng-rank"):
            hashes[name] = _sha256(store.get_bytes(info.key))
    store.put_json(f"{prefix}/{SEAL}", {"step": step, "sha256": hashes})


def verify(store: ObjectStore, job_id: str, step: int) -> str | None:
    """Why the sealed checkpoint at ``step`` is not intact (a file missing or not the
    bytes its seal hashed), or None when it is."""
    prefix = checkpoint_prefix(job_id, step)
    try:
        hashes = json.loads(store.get_bytes(f"{prefix}/{SEAL}")).get("sha256", {})
    except (ObjectNotFound, ValueError, AttributeError):
        return f"its seal {SEAL} is unreadable"
    for name, digest in sorted(hashes.items()):
        try:
            data = store.get_bytes(f"{prefix}/{name}")
        except ObjectNotFound:
            return f"{name} is missing"
        if _sha256(data) != digest:
            return f"{name} is corrupt ({len(data)} bytes, SHA-256 differs from its seal)"
    return None


def latest_intact(store: ObjectStore, job_id: str,
                  on_skip: Callable[[int, str], None] = lambda step, why: None) -> int | None:
    """The newest sealed checkpoint that verifies, calling ``on_skip(step, why)`` for each
    newer one that does not; None when there is none. Raises CheckpointsCorrupt when
    there are sealed checkpoints and none is intact."""
    steps = complete_steps(store, job_id)
    skipped = []
    for step in reversed(steps):
        why = verify(store, job_id, step)
        if why is None:
            return step
        skipped.append(f"step {step}: {why}")
        on_skip(step, why)
    if skipped:
        raise CheckpointsCorrupt("no intact checkpoint to resume from: " + "; ".join(skipped))
    return None


class CheckpointsCorrupt(RuntimeError):
    """Every sealed checkpoint of a job failed verification."""


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
        if info.key.endswith(f"/{SEAL}"):
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
