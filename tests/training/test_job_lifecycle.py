"""The training engine's bookkeeping without Ray: owners and what they see, the
per-principal limit, deletion that leaves nothing (class priors go with the last
job that used them), retention of instance images, and the audit log. Jobs are
submitted for real and their finished state is written as a run would."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from atelier.kit.auth import Principal, principal_var
from atelier.kit.errors import FailedPrecondition, NotFound, ResourceExhausted
from atelier.kit.metrics import ServerMetrics
from atelier.storage import open_store
from atelier.training import priors
from atelier.training.config import Settings
from atelier.training.engine import TrainingEngine
from atelier.training.jobs import CLASS_PRIORS, job_key
from atelier.training.metrics import TrainingMetrics
from atelier.training.records import set_state
from tests.training.conftest import S, spec

ALICE, BOB, ROOT = Principal("alice"), Principal("bob"), Principal("root", admin=True)


@pytest.fixture(params=["local", "minio"])
def engine(request, model_cache) -> TrainingEngine:
    storage = request.getfixturevalue(f"{request.param}_settings")
    settings = Settings(storage=storage.model_dump(), models={"cache_dir": model_cache},
                        training={"max_active_jobs_per_principal": 2,
                                  "instance_image_retention_s": 60})
    engine = TrainingEngine(settings, TrainingMetrics(ServerMetrics().registry))
    engine.attach(open_store(settings.storage))  # start() would also resume jobs on Ray
    return engine


def as_(principal: Principal, call, *args):
    token = principal_var.set(principal)
    try:
        return call(*args)
    finally:
        principal_var.reset(token)


def submit(engine, principal, job_id, **overrides):
    return as_(principal, engine._create, "", job_id, spec(**overrides), lambda: False)


def finish(engine, job_id, state=S.TRAINING_JOB_STATE_SUCCEEDED, prior_key=None):
    """What a run leaves behind: checkpoints, events, validation images, the outcome."""
    jobs = engine.jobs
    for key in ("checkpoints/step-2/trainable.safetensors", "checkpoints/step-2/state.json",
                "validation/step-2-0.png", "tensorboard/events.out", "progress.json"):
        engine.store.put_bytes(job_key(job_id, key), b"x")
    if prior_key is not None:
        for i in range(2):
            engine.store.put_bytes(priors.image_key(prior_key, i), b"png")
        jobs.mark(job_id, CLASS_PRIORS, {"key": prior_key, "generated": 2, "count": 2})
    job = jobs.load(job_id)
    set_state(jobs, job, state)
    engine.table.record(job_id, job)


def test_other_principals_see_no_such_job_and_admins_see_all(engine):
    job = submit(engine, ALICE, "alices")
    assert job.owner == "alice"
    for call in (engine._visible, engine._cancel, engine._delete):
        with pytest.raises(NotFound):
            as_(BOB, call, "alices")
    assert as_(ROOT, engine._visible, "alices").owner == "alice"

    def listed(principal):
        jobs, _ = as_(principal, lambda: asyncio.run(engine.list(0, "", [])))
        return {job.name for job in jobs}

    submit(engine, BOB, "bobs-first")
    assert listed(ALICE) == {"trainingJobs/alices"}
    assert listed(BOB) == {"trainingJobs/bobs-first"}
    assert listed(ROOT) == {"trainingJobs/alices", "trainingJobs/bobs-first"}


def test_each_principal_has_a_limit_of_unfinished_jobs(engine):
    submit(engine, ALICE, "one")
    submit(engine, ALICE, "two")
    with pytest.raises(ResourceExhausted, match="limit is 2"):
        submit(engine, ALICE, "three")
    submit(engine, BOB, "bobs")  # others are not affected
    submit(engine, ROOT, "admins-1")
    submit(engine, ROOT, "admins-2")
    submit(engine, ROOT, "admins-3")  # admins are not limited
    finish(engine, "one")
    submit(engine, ALICE, "three")  # a finished job frees a place


def test_delete_leaves_nothing_and_class_priors_go_with_their_last_job(engine, caplog):
    for job_id in ("first", "second"):
        submit(engine, ALICE, job_id)
        finish(engine, job_id, prior_key="shared-key")
    # Unfinished, but without prior preservation: it cannot be about to use the priors.
    submit(engine, ROOT, "queued", prior_preservation=S.PriorPreservation(enabled=False))
    with pytest.raises(FailedPrecondition):  # not finished: cancel it first
        as_(ROOT, engine._delete, "queued")
    with caplog.at_level(logging.INFO, logger="atelier.audit"):
        removed = as_(ALICE, engine._delete, "first")
        assert removed >= 8
        assert list(engine.store.list(job_key("first") + "/")) == []
        assert engine.store.exists(priors.image_key("shared-key", 0))  # "second" uses them
        as_(ALICE, engine._delete, "second")
    assert list(engine.store.list(job_key("second") + "/")) == []
    assert list(engine.store.list(priors.PRIORS)) == []
    assert not engine.jobs.model_id_holder("first")
    with pytest.raises(NotFound):
        as_(ALICE, engine._visible, "first")
    lines = [r for r in caplog.records if r.name == "atelier.audit"]
    assert {r.getMessage() for r in lines} == {"deleted training job",
                                               "deleted unreferenced class priors"}
    assert {r.job for r in lines if hasattr(r, "job")} == {"trainingJobs/first",
                                                          "trainingJobs/second"}
    assert all(r.principal == "alice" for r in lines)


def test_retention_purges_instance_images_after_a_job_ends(engine, caplog):
    submit(engine, ALICE, "old")
    submit(engine, ALICE, "recent")
    finish(engine, "old")
    finish(engine, "recent")
    record = engine.jobs.load("old")
    record.end_time.FromSeconds(int(time.time()) - 3600)  # ended an hour ago
    engine.jobs.save(record)
    with caplog.at_level(logging.INFO, logger="atelier.audit"):
        assert engine.purge_expired_instance_images() == 4
        assert engine.purge_expired_instance_images() == 0  # once
    assert list(engine.store.list(job_key("old", "instance") + "/")) == []
    assert len(list(engine.store.list(job_key("recent", "instance") + "/"))) == 4
    assert engine.store.exists(job_key("old", "job.json"))  # the record stays
    assert [r.getMessage() for r in caplog.records if r.name == "atelier.audit"] == [
        "purged instance images after retention"]
