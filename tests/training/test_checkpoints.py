"""Checkpoints verified before a resume: the seal's hashes, skipping a corrupt one for the
newest intact one, and a failure that names each checkpoint and what is wrong with it."""

from __future__ import annotations

import pytest
import torch

from atelier.training import checkpoints
from atelier.training.records import failure_reason

JOB = "verified"


def _checkpoint(store, step: int) -> None:
    """A real checkpoint of a tiny model: its files, then its seal."""
    layer = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    layer(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    checkpoints.save_rank_part(store, JOB, step, 0)
    digests = checkpoints.save_main_part(
        store, JOB, step, trainable=dict(layer.state_dict()), optimizer=optimizer,
        lr_scheduler=schedule, scaler=None, state={"global_step": step, "losses": []})
    checkpoints.seal(store, JOB, step, digests)


def _key(step: int, name: str) -> str:
    return f"{checkpoints.checkpoint_prefix(JOB, step)}/{name}"


def test_a_corrupt_checkpoint_is_skipped_for_the_newest_intact_one(local_store):
    for step in (2, 4, 6):
        _checkpoint(local_store, step)
    assert all(checkpoints.verify(local_store, JOB, s) is None for s in (2, 4, 6))
    assert checkpoints.latest_intact(local_store, JOB) == 6

    data = local_store.get_bytes(_key(6, "trainable.safetensors"))
    local_store.put_bytes(_key(6, "trainable.safetensors"), data[:len(data) // 2])
    local_store.delete(_key(4, "rng-rank0.pt"))
    skipped = []
    assert checkpoints.latest_intact(local_store, JOB, lambda s, why: skipped.append(
        (s, why))) == 2
    assert [s for s, _ in skipped] == [6, 4]
    assert "trainable.safetensors is corrupt" in skipped[0][1]
    assert "rng-rank0.pt is missing" in skipped[1][1]

    # Flipped bytes of the same length are caught too.
    state = bytearray(local_store.get_bytes(_key(2, "optimizer.pt")))
    state[-5] ^= 0xFF
    local_store.put_bytes(_key(2, "optimizer.pt"), bytes(state))
    with pytest.raises(checkpoints.CheckpointsCorrupt) as caught:
        checkpoints.latest_intact(local_store, JOB)
    message = str(caught.value)
    assert "step 6: trainable.safetensors is corrupt" in message
    assert "step 4: rng-rank0.pt is missing" in message
    assert "step 2: optimizer.pt is corrupt" in message


def test_no_checkpoint_is_a_fresh_start(local_store):
    assert checkpoints.latest_intact(local_store, "never-saved") is None


def test_a_worker_groups_failure_reason_is_the_ranks_own_error():
    """Ray reports a worker's failure as "Training failed due to worker errors:"; the
    job's reason is the first failing rank's error, which names the checkpoints."""
    from ray.train import WorkerGroupError

    cause = checkpoints.CheckpointsCorrupt("no intact checkpoint to resume from: step 4: "
                                           "trainable.safetensors is corrupt")
    failure = WorkerGroupError("rank 1 and 0 failed", {1: RuntimeError("peer"), 0: cause})
    assert failure_reason(failure) == ("CheckpointsCorrupt: no intact checkpoint to resume from: "
                                "step 4: trainable.safetensors is corrupt")
