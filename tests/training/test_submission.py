"""Submitting a job is atomic on both store backends: concurrent calls make one job,
model ids are reserved, a failed or cancelled submission leaves nothing, images are
bounded before they are decoded, and prompts fit the tokenizer. (submit_job is what
CreateTrainingJob and the standalone entrypoint run; no Ray is needed here.)"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from atelier.kit.auth import Principal
from atelier.kit.errors import AlreadyExists, Cancelled, InvalidArgument, NotFound
from atelier.storage import open_store
from atelier.training.config import TrainingEngineSettings
from atelier.training.jobs import JobStore
from atelier.training.records import set_state
from atelier.training.submission import submit_job, sweep_orphans
from atelier.v1 import common_pb2
from tests.training.conftest import S, spec

CONFIG = TrainingEngineSettings()
ALICE = Principal("alice")


@pytest.fixture(params=["local", "minio"])
def jobs(request) -> JobStore:
    return JobStore(open_store(request.getfixturevalue(f"{request.param}_settings")))


def job_objects(jobs: JobStore) -> list[str]:
    return [o.key for o in jobs.store.list("training/")]


def concurrently(n: int, call):
    def attempt(i):
        try:
            return call(i)
        except AlreadyExists as exc:
            return exc

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(attempt, range(n)))


def test_concurrent_calls_with_one_request_id_make_one_job(jobs):
    for round_ in range(3):
        results = concurrently(4, lambda i, r=round_: submit_job(
            jobs, CONFIG, f"req-{r}", "", spec(), principal=ALICE))
        names = {job.name for job, _ in results}
        assert len(names) == 1  # every response names the one job
        assert [created for _, created in results].count(True) == 1
    assert len(jobs.ids()) == 3


def test_concurrent_calls_with_one_job_id_create_it_once(jobs):
    results = concurrently(4, lambda i: submit_job(
        jobs, CONFIG, f"other-request-{i}", "rex", spec(), principal=ALICE))
    created = [r for r in results if not isinstance(r, AlreadyExists)]
    assert len(created) == 1 and created[0][1] is True
    assert len(results) - len(created) == 3
    assert jobs.ids() == ["rex"]
    events = [o.key for o in jobs.store.list("training/jobs/rex/events/")]
    assert len(events) == 1  # one QUEUED event
    # The losers left no images behind: only the winner's upload folder exists.
    folders = {k.split("/")[4] for k in job_objects(jobs) if "/instance/" in k}
    assert len(folders) == 1
    record = jobs.load("rex")
    assert {i.object.key.split("/")[4] for i in record.spec.instance_images} == folders


def test_request_ids_belong_to_their_owner(jobs):
    first, _ = submit_job(jobs, CONFIG, "same", "", spec(), principal=ALICE)
    again, created = submit_job(jobs, CONFIG, "same", "", spec(), principal=ALICE)
    assert again.name == first.name and not created
    other, created = submit_job(jobs, CONFIG, "same", "", spec(), principal=Principal("bob"))
    assert created and other.name != first.name and other.owner == "bob"


def test_a_model_id_held_by_a_live_job_or_a_model_is_refused(jobs):
    submit_job(jobs, CONFIG, "", "first", spec(model_id="rex"), principal=ALICE)
    with pytest.raises(AlreadyExists, match="held by trainingJobs/first"):
        submit_job(jobs, CONFIG, "", "second", spec(model_id="rex"), principal=ALICE)
    # A job's default model id is its job id, and is reserved the same way.
    submit_job(jobs, CONFIG, "", "plain", spec(), principal=ALICE)
    with pytest.raises(AlreadyExists, match="held by trainingJobs/plain"):
        submit_job(jobs, CONFIG, "", "third", spec(model_id="plain"), principal=ALICE)
    # Another principal learns that the id is taken, not which job holds it.
    with pytest.raises(AlreadyExists) as err:
        submit_job(jobs, CONFIG, "", "bobs", spec(model_id="rex"), principal=Principal("bob"))
    assert "first" not in str(err.value) and "another principal's training job" in \
        str(err.value)
    jobs.store.put_bytes("models/taken/manifest.json", b"{}")
    with pytest.raises(AlreadyExists, match="models/taken already exists"):
        submit_job(jobs, CONFIG, "", "fourth", spec(model_id="taken"), principal=ALICE)
    # Once the holder has failed without exporting, the id is free again.
    holder = jobs.load("first")
    set_state(jobs, holder, S.TRAINING_JOB_STATE_FAILED, "test")
    _, created = submit_job(jobs, CONFIG, "", "second", spec(model_id="rex"),
                              principal=ALICE)
    assert created


def test_a_cancelled_submission_undoes_everything(jobs):
    checks = []

    def stop_after_two_uploads() -> bool:
        checks.append(1)
        return len(checks) > 2

    with pytest.raises(Cancelled):
        submit_job(jobs, CONFIG, "req", "half", spec(model_id="m1"), principal=ALICE,
                   should_stop=stop_after_two_uploads)
    assert job_objects(jobs) == []  # no images, no record, no claims
    _, created = submit_job(jobs, CONFIG, "req", "half", spec(model_id="m1"),
                              principal=ALICE)
    assert created  # the request id, job id and model id were all released


def test_orphans_of_a_submission_cut_off_by_an_outage_are_swept(minio_settings):
    from tests.storage.test_minio_retries import FlakyProxy

    proxy = FlakyProxy(minio_settings.endpoint)
    try:
        through_proxy = minio_settings.model_copy(update={"endpoint": proxy.address,
                                                          "max_retries": 1})
        jobs = JobStore(open_store(through_proxy))
        checks = []

        def outage_after_two_uploads() -> bool:
            checks.append(1)
            proxy.failures = 10**9 if len(checks) > 2 else 0
            return False

        with pytest.raises(Exception, match="object store"):
            submit_job(jobs, CONFIG, "", "cut", spec(), principal=ALICE,
                       should_stop=outage_after_two_uploads)
        proxy.failures = 0
        left = job_objects(jobs)
        assert left and not jobs.ids()  # leftovers that no record names
        assert sweep_orphans(jobs, older_than_s=3600) == 0  # too young: could be in progress
        assert sweep_orphans(jobs, older_than_s=0) == len(
            [k for k in left if k.startswith("training/jobs/")])
        assert not [k for k in job_objects(jobs) if k.startswith("training/jobs/")]
    finally:
        proxy.close()


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_instance_images_are_bounded_before_decoding(local_settings):
    jobs = JobStore(open_store(local_settings))
    bomb = png(12000, 12000)  # a few KB that would decode to 432 MB on every worker
    assert len(bomb) < 600_000
    images = [common_pb2.ImageInput(data=bomb), *spec().instance_images]
    with pytest.raises(InvalidArgument) as err:
        submit_job(jobs, CONFIG, "", "", spec(instance_images=images), principal=ALICE)
    assert err.value.violations[0].field == "spec.instance_images[0]"
    assert "12000x12000" in err.value.violations[0].description
    assert job_objects(jobs) == []


def test_prompts_longer_than_the_tokenizer_limit_are_refused(local_settings, tiny_sd):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    jobs = JobStore(open_store(local_settings))
    late = "a photo of " + "very " * 80 + "sks toy"  # the identifier would be cut off
    bad = spec(instance_prompt=late, validation_prompts=["ok", "a " * 90])
    with pytest.raises(InvalidArgument) as err:
        submit_job(jobs, CONFIG, "", "", bad, principal=ALICE, tokenizer=tokenizer)
    assert {v.field for v in err.value.violations} == {"spec.instance_prompt",
                                                       "spec.validation_prompts[1]"}
    assert job_objects(jobs) == []


def test_object_references_only_under_the_callers_uploads(local_settings):
    jobs = JobStore(open_store(local_settings))
    photo = spec().instance_images[0].data
    jobs.store.put_bytes("uploads/alice/1.png", photo)
    jobs.store.put_bytes("uploads/bob/1.png", photo)
    ref = lambda key: spec(instance_images=[  # noqa: E731
        common_pb2.ImageInput(object=common_pb2.ObjectRef(key=key))])
    job, _ = submit_job(jobs, CONFIG, "", "", ref("uploads/alice/1.png"), principal=ALICE)
    stored = jobs.store.get_bytes(job.spec.instance_images[0].object.key)
    assert stored == photo
    for key in ("uploads/bob/1.png", job.spec.instance_images[0].object.key):
        with pytest.raises(NotFound):
            submit_job(jobs, CONFIG, "", "", ref(key), principal=ALICE)
    submit_job(jobs, CONFIG, "", "", ref("uploads/bob/1.png"),
               principal=Principal("root", admin=True))


def test_the_base_gives_the_family_and_default_resolution(local_settings, tiny_sdxl):
    from atelier.models.pipelines import SDXL
    from atelier.training.bases import BaseModelInfo, describe_base

    assert describe_base(str(tiny_sdxl)) == BaseModelInfo(SDXL, 128)
    jobs = JobStore(open_store(local_settings))
    xl = spec(resolution=0, text_encoder_2=S.TextEncoderTraining(enabled=True))
    job, _ = submit_job(jobs, CONFIG, "", "xl", xl, principal=ALICE,
                        base=BaseModelInfo(SDXL, 192))
    assert job.spec.resolution == 192 and job.spec.text_encoder_2.enabled
    with pytest.raises(InvalidArgument) as err:  # not for an SD base
        submit_job(jobs, CONFIG, "", "sd", xl, principal=ALICE)
    assert "spec.text_encoder_2.enabled" in {v.field for v in err.value.violations}


def test_concept_images_and_masks_are_stored_and_referenced(local_settings):
    image = Image.open(io.BytesIO(spec().instance_images[0].data)).convert("RGBA")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    mask = io.BytesIO()
    Image.new("L", image.size, 255).save(mask, format="PNG")
    concept = S.Concept(identifier_token="sks", instance_prompt="a photo of sks toy", images=[
        S.InstanceImage(image=common_pb2.ImageInput(data=buffer.getvalue()),
                        mask=common_pb2.ImageInput(data=mask.getvalue())),
        S.InstanceImage(image=common_pb2.ImageInput(data=buffer.getvalue()),
                        caption="sks toy, close up", mask_from_alpha=True)])
    jobs = JobStore(open_store(local_settings))
    job, _ = submit_job(jobs, CONFIG, "", "concepts", spec(
        instance_images=[], identifier_token="", instance_prompt="", class_prompt="",
        prior_preservation=S.PriorPreservation(), concepts=[concept]), principal=ALICE)
    stored = job.spec.concepts[0].images
    keys = [stored[0].image.object.key, stored[0].mask.object.key, stored[1].image.object.key]
    assert all(jobs.store.exists(k) for k in keys) and len(set(keys)) == 3
    assert not stored[1].HasField("mask") and stored[1].caption == "sks toy, close up"
    assert len(job_objects(jobs)) == len(keys) + 3  # + record, QUEUED event, model id


def test_klein_bases_train_and_distilled_models_are_refused(tiny_klein_base, tiny_klein):
    """A klein base is described from its configs (its family and native size); a
    distilled klein is a typed refusal, by path and by configured id (naming the base)."""
    from atelier.kit.errors import FailedPrecondition
    from atelier.training.bases import describe_base, resolve_base, serving_bases
    from atelier.training.config import TrainingEngineSettings

    info = describe_base(str(tiny_klein_base))
    assert info.family == "flux2-klein" and info.default_resolution % 16 == 0
    with pytest.raises(FailedPrecondition, match="distilled"):
        describe_base(str(tiny_klein))
    settings = TrainingEngineSettings()
    with pytest.raises(FailedPrecondition, match="models/tiny-klein-base"):
        resolve_base("models/tiny-klein", settings)
    assert resolve_base("models/tiny-klein-base", settings)[0] == "tiny-klein-base"
    assert serving_bases("tiny-klein-base", settings) == ["tiny-klein-base", "tiny-klein"]
    assert serving_bases("tiny-sd", settings) == ["tiny-sd"]
