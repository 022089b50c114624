"""FLUX.2 [klein] DreamBooth LoRA jobs end to end: trained on the tiny klein base
through the service (2 Ray workers, class-image prior, subject scores), exported as a
LoRA that fits the distilled model too, and served by name there, alone and beside
another klein LoRA in one forward; exact resume after a worker dies; bad input."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from atelier.storage import open_store
from atelier.training import checkpoints
from atelier.training.evaluation import read_scores
from atelier.training.jobs import JobStore, job_key
from atelier.v1 import generation_pb2, generation_pb2_grpc, model_pb2, training_pb2_grpc
from tests.training.conftest import S, spec, start_training, watch_to_end


def klein_spec(**overrides) -> S.TrainingJobSpec:
    base = dict(base_model="models/tiny-klein-base", resolution=64, max_train_steps=4,
                text_encoder=S.TextEncoderTraining(enabled=False),
                resources=S.TrainingResources(num_workers=2),
                options=S.TrainingOptions(flow_matching=S.FlowMatching(
                    sigma_sampling=S.SIGMA_SAMPLING_LOGIT_NORMAL,
                    loss_weighting=S.LOSS_WEIGHTING_COSMAP)))
    base.update(overrides)
    return spec(**base)


def other_klein_lora(store, base_path) -> str:
    """A second klein LoRA model (random adapters) to mix with the trained one."""
    import torch
    from diffusers import Flux2Transformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from atelier.models.export import export_lora_model
    from atelier.models.families.flux2_klein import LORA_TARGETS
    from atelier.models.manifest import LORA_WEIGHTS_NAME, ManifestWeights, ModelManifest

    transformer = Flux2Transformer2DModel.from_pretrained(base_path, subfolder="transformer")
    torch.manual_seed(3)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                       target_modules=LORA_TARGETS))
    export_lora_model(store, ModelManifest(
        model_id="klein-other", kind="lora", family="flux2-klein",
        base_model="models/tiny-klein-base", fits_bases=["models/tiny-klein"],
        base_model_source="tiny://flux2-klein-base", identifier_token="zwx",
        class_prompt="a photo of a robot", lora_rank=4, lora_alpha=4,
        weights=ManifestWeights(lora=LORA_WEIGHTS_NAME)),
        get_peft_model_state_dict(transformer))
    return "models/klein-other"


def test_klein_lora_job_to_a_model_served_on_the_distilled_model(local_settings, tmp_path,
                                                                model_cache, tiny_klein_base,
                                                                tiny_klein):
    server = start_training(local_settings, model_cache)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:  # a distilled model as the base
                stub.CreateTrainingJob(S.CreateTrainingJobRequest(
                    training_job_id="distilled",
                    spec=klein_spec(base_model="models/tiny-klein")), timeout=60)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "models/tiny-klein-base" in caught.value.details()  # names the base
            job = stub.CreateTrainingJob(S.CreateTrainingJobRequest(
                training_job_id="klein", spec=klein_spec(
                    validation_prompts=["a photo of sks toy on the moon"],
                    evaluation=S.SubjectEvaluation(enabled=True, num_inference_steps=2),
                    checkpointing=S.CheckpointPolicy(every_n_steps=2))),
                timeout=60).training_job
            events = watch_to_end(stub, job.name)
            final = stub.GetTrainingJob(S.GetTrainingJobRequest(name=job.name)).training_job
            assert events[-1].state_changed.state == S.TRAINING_JOB_STATE_SUCCEEDED, final
        store = open_store(local_settings)
        manifest = store.get_json("models/klein/manifest.json")
        assert manifest["family"] == "flux2-klein" and manifest["kind"] == "lora"
        assert manifest["base_model"] == "models/tiny-klein-base"
        assert manifest["fits_bases"] == ["models/tiny-klein"]
        assert JobStore(store).read_mark("klein", "class-priors")["count"] == 4
        losses = store.get_json(f"{checkpoints.checkpoint_prefix('klein', 4)}/state.json")[
            "losses"]
        assert len(losses) == 4 and all(row[2] > 0 for row in losses)  # a prior term each step
        scores = read_scores(store, "klein")
        assert [s.step for s in scores] == [2, 4]
        print("klein subject scores:", [s.as_dict() for s in scores])
        assert all(-1 <= s.scores.dino <= 1 and s.scores.images > 0 for s in scores)
        assert [s.step for s in final.scores] == [2, 4]  # reported on the job too
        assert len(list(store.list(job_key("klein", "cache", "text-")))) == 1  # encoded once
        other = other_klein_lora(store, tiny_klein_base)
    finally:
        server.stop()

    from tests.generation.conftest import assert_close, start_generation

    def pixels(png: bytes):
        import io

        import numpy as np
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

    gen = start_generation(tmp_path, model_cache, storage=local_settings)
    try:
        with grpc.insecure_channel(gen.target) as channel:
            gstub = generation_pb2_grpc.GenerationServiceStub(channel)
            model = gstub.GetModel(generation_pb2.GetModelRequest(name="models/klein"),
                                   timeout=30).model
            assert model.family == model_pb2.MODEL_FAMILY_FLUX2_KLEIN

            def on_distilled(adapter: str, seed: int) -> generation_pb2.GenerateRequest:
                return generation_pb2.GenerateRequest(
                    model="models/tiny-klein", prompt="a photo of sks toy", seed=seed,
                    width=64, height=64, num_inference_steps=2,
                    adapters=[generation_pb2.AdapterRef(model=adapter, scale=1.0)])

            alone = [gstub.Generate(on_distilled(a, s), timeout=120).images[0].data
                     for a, s in (("models/klein", 1), (other, 2))]
            with ThreadPoolExecutor(2) as pool:  # concurrent: one forward for both
                pair = list(pool.map(lambda r: gstub.Generate(r, timeout=120).images[0].data,
                                     [on_distilled("models/klein", 1), on_distilled(other, 2)]))
            for batched, single in zip(pair, alone, strict=True):  # batching changes nothing
                assert_close(pixels(batched), pixels(single))
            assert alone[0] != gstub.Generate(generation_pb2.GenerateRequest(
                model="models/tiny-klein", prompt="a photo of sks toy", seed=1, width=64,
                height=64, num_inference_steps=2), timeout=120).images[0].data
            by_name = gstub.Generate(generation_pb2.GenerateRequest(
                model="models/klein", prompt="a photo of sks toy", seed=1, width=64,
                height=64, num_inference_steps=2), timeout=120)
            assert by_name.model == "models/klein" and len(by_name.images) == 1
    finally:
        gen.stop()


@pytest.mark.parametrize(("overrides", "field"), [
    (dict(base_model="models/tiny-sd", options=S.TrainingOptions(flow_matching=S.FlowMatching(
        sigma_sampling=S.SIGMA_SAMPLING_LOGIT_NORMAL))), "spec.options.flow_matching"),
    (dict(options=S.TrainingOptions(flow_matching=S.FlowMatching(min_sigma=0.6,
                                                                 max_sigma=0.4))),
     "spec.options.flow_matching.max_sigma"),
    (dict(resolution=72), "spec.resolution"),
    (dict(instance_prompt="a photo of sks toy " + "very " * 600), "spec.instance_prompt"),
    (dict(method=S.FINE_TUNE_METHOD_FULL), "spec.method"),
    (dict(options=S.TrainingOptions(snr_gamma=5.0)), "spec.options.snr_gamma"),
])
def test_bad_klein_specs_name_the_field(local_settings, model_cache, overrides, field):
    from atelier.kit.errors import InvalidArgument
    from atelier.training.bases import BaseModels
    from atelier.training.config import TrainingEngineSettings
    from atelier.training.spec import validate

    settings = TrainingEngineSettings()
    store = open_store(local_settings)
    full = klein_spec(**overrides)
    tokenizer, info = BaseModels(settings, model_cache).of_spec(full, store)
    with pytest.raises(InvalidArgument) as caught:
        validate(full, settings, tokenizer, info.family)
    fields = [v.field for v in caught.value.violations]
    assert field in fields, fields


def _exported_lora(store, model_id: str) -> dict:
    from safetensors.torch import load

    from atelier.models.manifest import LORA_WEIGHTS_NAME

    return load(store.get_bytes(f"models/{model_id}/{LORA_WEIGHTS_NAME}"))


def test_exact_resume_of_a_klein_job_after_a_worker_dies(local_settings, model_cache):
    """2 workers, the base-model prior and the latent cache: a worker dies at step 3,
    the group restarts from step 2's checkpoint (and the job's text cache), and the
    exported LoRA is bit-identical to an uninterrupted run's."""
    import torch

    resume = dict(max_train_steps=4, checkpointing=S.CheckpointPolicy(every_n_steps=2),
                  prior_preservation=S.PriorPreservation(
                      enabled=True, source=S.PRIOR_SOURCE_BASE_MODEL),
                  options=S.TrainingOptions(cache_latents=True, random_flip=True,
                                            flow_matching=S.FlowMatching(
                                                sigma_sampling=S.SIGMA_SAMPLING_MODE,
                                                loss_weighting=S.LOSS_WEIGHTING_SIGMA_SQRT,
                                                min_sigma=0.05, resolution_shift=True)))
    store = open_store(local_settings)
    runs = {}
    for name, faults in (("klein-straight", None), ("klein-resumed", {"fail_once_at_step": 3})):
        server = start_training(local_settings, model_cache, faults=faults)
        try:
            with grpc.insecure_channel(server.target) as channel:
                stub = training_pb2_grpc.TrainingServiceStub(channel)
                stub.CreateTrainingJob(S.CreateTrainingJobRequest(
                    training_job_id=name, spec=klein_spec(**resume)), timeout=60)
                events = watch_to_end(stub, f"trainingJobs/{name}")
            assert events[-1].state_changed.state == S.TRAINING_JOB_STATE_SUCCEEDED, events[-1]
        finally:
            server.stop()
        runs[name] = _exported_lora(store, name)
    assert JobStore(store).read_mark("klein-resumed", "injected-failure") == {"step": 3}
    straight, resumed = runs["klein-straight"], runs["klein-resumed"]
    assert straight.keys() == resumed.keys() and straight
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert len(list(store.list(job_key("klein-resumed", "cache", "text-")))) == 1


@pytest.mark.parametrize(("family", "targets", "mlp"), [
    ("flux2-klein", S.LORA_TARGETS_UNSPECIFIED, "ff.linear_in"),
    ("flux2-klein", S.LORA_TARGETS_ATTENTION, None),
    ("stable-diffusion", S.LORA_TARGETS_UNSPECIFIED, None),
    ("stable-diffusion", S.LORA_TARGETS_ATTENTION_MLP, "ff.net.0.proj"),
])
def test_lora_presets_pick_the_denoiser_layers(request, family, targets, mlp):
    """Attention on SD by default and attention + MLP on klein; either by preset."""
    from atelier.training.models import load_models
    from atelier.training.train_config import TrainConfig

    klein = family == "flux2-klein"
    path = request.getfixturevalue("tiny_klein_base" if klein else "tiny_sd")
    make = klein_spec if klein else spec
    train = TrainConfig.from_spec(make(lora=S.LoraConfig(rank=4, targets=targets)), family)
    names = [n for n, p in load_models(str(path), train, 0).unet.named_parameters()
             if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert any(".to_q.lora_A" in n for n in names)
    assert any(".ff." in n for n in names) == (mlp is not None)
    if mlp:
        assert any(f".{mlp}.lora_A" in n for n in names)
