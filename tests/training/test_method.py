"""The training method, checked against a plain reimplementation of the formula of
diffusers' examples/dreambooth/train_dreambooth.py, and its data stream."""

from __future__ import annotations

import grpc
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextModel

from atelier.models.pipelines import SD
from atelier.training.data import INSTANCE
from atelier.training.method import Batch, batch_loss
from atelier.training.priors import cache_key
from tests.training.conftest import S, spec, start_training, subject_photo


@pytest.fixture(scope="module")
def parts(tiny_sd):
    return {
        "vae": AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae"),
        "unet": UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet"),
        "text_encoder": CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder"),
        "tokenizer": AutoTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer"),
        "scheduler_config": DDPMScheduler.load_config(tiny_sd, subfolder="scheduler"),
    }


def our_loss(p, scheduler, pixels, ids, seed, prior_weight, **kwargs):
    """atelier's batch_loss on 2 instance + 2 class rows."""
    batch = Batch(num_instance=2, input_ids=[ids], pixels=pixels,
                  prior_weights=torch.full((2,), prior_weight))
    return batch_loss(unet=p["unet"], text_encoders=[p["text_encoder"]], vae=p["vae"],
                      noise_scheduler=scheduler, family=SD, batch=batch,
                      generator=torch.Generator().manual_seed(seed), **kwargs)


def reference_loss(p, scheduler, pixels, ids, seed, prior_weight):
    """train_dreambooth.py's loss, written out plainly: sample latents, add noise at
    random timesteps, predict, split instance/class halves, mse + weight * prior mse."""
    g = torch.Generator().manual_seed(seed)
    latents = p["vae"].encode(pixels).latent_dist.sample(generator=g)
    latents = latents * p["vae"].config.scaling_factor
    noise = torch.randn(latents.shape, generator=g)
    torch.randn((*latents.shape[:2], 1, 1), generator=g)  # the offset draw (unused at 0)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g)
    noisy = scheduler.add_noise(latents, noise, t)
    hidden = p["text_encoder"](ids)[0]
    pred = p["unet"](noisy, t, hidden).sample
    target = noise if scheduler.config.prediction_type == "epsilon" else \
        scheduler.get_velocity(latents, noise, t)
    pred, pred_prior = torch.chunk(pred, 2, dim=0)
    target, target_prior = torch.chunk(target, 2, dim=0)
    loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
    prior = F.mse_loss(pred_prior.float(), target_prior.float(), reduction="mean")
    return loss + prior_weight * prior


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_matches_the_reference_formula(parts, prediction_type):
    scheduler = DDPMScheduler.from_config(parts["scheduler_config"],
                                          prediction_type=prediction_type)
    torch.manual_seed(0)
    pixels = torch.rand(4, 3, 64, 64) * 2 - 1  # 2 instance + 2 class examples
    prompts = ["a photo of sks toy"] * 2 + ["a photo of a toy"] * 2
    ids = parts["tokenizer"](prompts, padding="max_length", max_length=77, truncation=True,
                             return_tensors="pt").input_ids
    with torch.no_grad():
        ours = our_loss(parts, scheduler, pixels, ids, 5, 0.7)
        want = reference_loss(parts, scheduler, pixels, ids, 5, 0.7)
    torch.testing.assert_close(ours.loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.instance + 0.7 * ours.prior, ours.loss)


def test_min_snr_works_with_prior_preservation(parts):
    """The combination that crashes diffusers' script: each sample of both halves is
    weighted by min(SNR(t), gamma) / SNR(t) of its own timestep."""
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler.from_config(parts["scheduler_config"])
    torch.manual_seed(1)
    pixels = torch.rand(4, 3, 64, 64) * 2 - 1
    ids = parts["tokenizer"](["a photo of sks toy"] * 2 + ["a photo of a toy"] * 2,
                             padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
    with torch.no_grad():
        ours = our_loss(parts, scheduler, pixels, ids, 1, 1.0, snr_gamma=5.0)
        g = torch.Generator().manual_seed(1)
        latents = parts["vae"].encode(pixels).latent_dist.sample(generator=g)
        latents = latents * parts["vae"].config.scaling_factor
        noise = torch.randn(latents.shape, generator=g)
        torch.randn((*latents.shape[:2], 1, 1), generator=g)
        t = torch.randint(0, 1000, (4,), generator=g)
        pred = parts["unet"](scheduler.add_noise(latents, noise, t), t,
                             parts["text_encoder"](ids)[0]).sample
        errors = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        snr = compute_snr(scheduler, t)
        weights = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
        want = (errors * weights)[:2].mean() + (errors * weights)[2:].mean()
    torch.testing.assert_close(ours.loss, want, rtol=1e-5, atol=1e-6)


def test_every_rank_sees_a_distinct_shard_and_the_stream_is_reproducible(local_store):
    from tests.training.test_data_pipeline import examples_of

    examples = examples_of(local_store, [subject_photo(i) for i in range(5)], prior=True,
                           train_batch_size=2, gradient_accumulation_steps=2,
                           options=S.TrainingOptions(random_flip=True))
    plans = {rank: examples.plan(step=3, micro=1, rank=rank, world=2) for rank in (0, 1)}
    ids = {p: [torch.zeros(77, dtype=torch.long)] for p in examples.prompts(plans[0])
           + examples.prompts(plans[1])}
    rank0, rank1 = (examples.batch(plans[r], ids).pixels for r in (0, 1))
    again = examples.batch(examples.plan(step=3, micro=1, rank=1, world=2), ids).pixels
    assert rank0.shape == (4, 3, 64, 64)
    assert examples.prompts(plans[1]) == ["a photo of sks toy"] * 2 + ["a photo of a toy"] * 2
    assert [r.kind for r in plans[1].rows[:2]] == [INSTANCE] * 2
    assert not torch.equal(rank0, rank1)
    torch.testing.assert_close(rank1, again, rtol=0, atol=0)
    # Over an epoch's worth of micro-batches every image is seen.
    seen = {r.index for step in range(3) for rank in (0, 1) for micro in (0, 1)
            for r in examples.plan(step=step, micro=micro, rank=rank, world=2).rows
            if r.kind == INSTANCE}
    assert seen == set(range(5))


def test_prior_cache_key_changes_with_every_input():
    base = dict(base_ref="tiny://stable-diffusion", fingerprint="f1", prompt="a toy",
                resolution=128, steps=25, guidance=7.5, seed=1)
    key = cache_key(**base)
    for field, value in (("base_ref", "store://x"), ("fingerprint", "f2"), ("prompt", "a dog"),
                         ("resolution", 64), ("steps", 30), ("guidance", 5.0), ("seed", 2)):
        assert cache_key(**{**base, field: value}) != key, field


def _image(data: bytes):
    from atelier.v1 import common_pb2

    return common_pb2.ImageInput(data=data)


#: Clears the one-concept fields of conftest's spec(), for specs with concepts.
ONE_CONCEPT_FORM = dict(instance_images=[], identifier_token="", instance_prompt="",
                        class_prompt="", prior_preservation=S.PriorPreservation())


@pytest.fixture(scope="module")
def bad_input_server(tmp_path_factory, model_cache):
    from atelier.kit.settings import StorageSettings

    settings = StorageSettings(local_root=tmp_path_factory.mktemp("bad") / "store",
                               bucket="atelier-test")
    server = start_training(settings, model_cache, max_instance_images=5)
    from atelier.v1 import training_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        yield training_pb2_grpc.TrainingServiceStub(channel), settings
    server.stop()


@pytest.mark.parametrize(("overrides", "field"), [
    (dict(instance_images=[]), "spec.instance_images"),
    (dict(instance_images=[_image(subject_photo(0))] * 6), "spec.instance_images"),
    (dict(instance_images=[_image(b"not an image")]), "spec.instance_images[0]"),
    (dict(instance_images=[_image(subject_photo(0, size=32))]), "spec.instance_images[0]"),
    (dict(instance_prompt="a photo of a toy"), "spec.instance_prompt"),
    (dict(identifier_token="two words"), "spec.identifier_token"),
    (dict(resolution=100), "spec.resolution"),
    (dict(max_train_steps=100_001), "spec.max_train_steps"),
    (dict(learning_rate=0.5), "spec.learning_rate"),
    (dict(resources=S.TrainingResources(num_workers=99)), "spec.resources.num_workers"),
    (dict(class_prompt=""), "spec.class_prompt"),
    # The data pipeline's inputs.
    (dict(**ONE_CONCEPT_FORM, concepts=[S.Concept(identifier_token="sks", images=[
        S.InstanceImage(image=_image(subject_photo(0)), caption="a photo of a toy")])]),
     "spec.concepts[0].images[0].caption"),
    (dict(**ONE_CONCEPT_FORM, concepts=[S.Concept(
        identifier_token="sks", instance_prompt="a photo of sks toy",
        images=[S.InstanceImage(image=_image(subject_photo(0)),
                                mask=_image(subject_photo(1, size=80)))])]),
     "spec.concepts[0].images[0].mask"),
    (dict(**ONE_CONCEPT_FORM, concepts=[
        S.Concept(identifier_token="sks", instance_prompt="a photo of sks toy",
                  images=[S.InstanceImage(image=_image(subject_photo(0)))]),
        S.Concept(identifier_token="zwx", instance_prompt="a photo of zwx toy")]),
     "spec.concepts[1].images"),
    (dict(resolution=96, options=S.TrainingOptions(aspect_ratio_bucketing=True)),
     "spec.resolution"),
    (dict(ema=S.EmaConfig(enabled=True, decay=1.0)), "spec.ema.decay"),
    (dict(text_encoder_2=S.TextEncoderTraining(enabled=True)), "spec.text_encoder_2.enabled"),
    # Subject scores: prompts name the subject; the gate and best export need them on.
    (dict(evaluation=S.SubjectEvaluation(enabled=True, prompts=["a toy on the beach"])),
     "spec.evaluation.prompts[0]"),
    (dict(evaluation=S.SubjectEvaluation(enabled=True, images_per_prompt=9)),
     "spec.evaluation.images_per_prompt"),
    (dict(evaluation=S.SubjectEvaluation(enabled=True, quality_gate=S.QualityGate(
        max_drift=2.5))), "spec.evaluation.quality_gate.max_drift"),
    (dict(evaluation=S.SubjectEvaluation(enabled=False, quality_gate=S.QualityGate(
        min_dino=0.5))), "spec.evaluation.quality_gate"),
    (dict(evaluation=S.SubjectEvaluation(export_best_by=S.SUBJECT_SCORE_DINO)),
     "spec.evaluation.export_best_by"),
    (dict(evaluation=S.SubjectEvaluation(enabled=True, export_best_by=99)),
     "spec.evaluation.export_best_by"),
])
def test_bad_input_is_invalid_argument_and_nothing_is_stored(bad_input_server, overrides,
                                                             field):
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    from atelier.storage import open_store

    stub, settings = bad_input_server
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateTrainingJob(S.CreateTrainingJobRequest(spec=spec(**overrides)), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = set()
    for detail in rpc_status.from_call(err.value).details:
        bad = error_details_pb2.BadRequest()
        if detail.Is(bad.DESCRIPTOR):
            detail.Unpack(bad)
            fields = {v.field for v in bad.field_violations}
    assert field in fields, fields
    assert list(open_store(settings).list("training/")) == []


def test_unknown_base_model_is_not_found(bad_input_server):
    stub, _ = bad_input_server
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateTrainingJob(S.CreateTrainingJobRequest(
            spec=spec(base_model="models/no-such-base")), timeout=60)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        stub.GetTrainingJob(S.GetTrainingJobRequest(name="trainingJobs/nope"), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        stub.GetTrainingJob(S.GetTrainingJobRequest(name="jobs/../x"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
