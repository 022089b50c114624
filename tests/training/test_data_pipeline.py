"""The data pipeline on real tiny models: buckets, cached latents, masked loss, the
base-model prior, and SDXL's loss against a plain reimplementation of the formula of
diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from atelier.models.pipelines import SD, SDXL
from atelier.training import latent_cache
from atelier.training.buckets import buckets, nearest_bucket
from atelier.training.data import BASE_PRIOR, CLASS_IMAGE, INSTANCE, Examples
from atelier.training.method import Batch, batch_loss, dreambooth_loss
from atelier.training.models import base_model, load_models
from atelier.training.spec import apply_defaults
from atelier.training.train_config import TrainConfig
from atelier.v1 import common_pb2
from atelier.v1 import training_pb2 as S
from tests.training.conftest import subject_photo


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def photo(size: tuple[int, int], pose: int = 0) -> bytes:
    """A subject photo at any size (the drawn toy, resized)."""
    return png(Image.open(io.BytesIO(subject_photo(pose))).resize(size))


def examples_of(store, photos: list[bytes], *, prior: bool = False, masks=None,
                family: str = SD, base_prior: bool = False, class_count: int = 3,
                **fields) -> Examples:
    """Examples of a one-concept job whose images (and class images) are in ``store``."""
    images = []
    for i, data in enumerate(photos):
        store.put_bytes(f"img/{i}", data)
        item = S.InstanceImage(image=common_pb2.ImageInput(
            object=common_pb2.ObjectRef(key=f"img/{i}")))
        if masks and masks[i] is not None:
            store.put_bytes(f"mask/{i}", masks[i])
            item.mask.object.key = f"mask/{i}"
        images.append(item)
    source = S.PRIOR_SOURCE_BASE_MODEL if base_prior else S.PRIOR_SOURCE_CLASS_IMAGES
    spec = S.TrainingJobSpec(concepts=[S.Concept(
        identifier_token="sks", instance_prompt="a photo of sks toy",
        class_prompt="a photo of a toy", images=images,
        prior_preservation=S.PriorPreservation(enabled=prior, loss_weight=0.7,
                                               source=source))],
        **{"resolution": 64, "max_train_steps": 4, "seed": 3, **fields})
    from atelier.training.config import TrainingEngineSettings

    spec = apply_defaults(spec, TrainingEngineSettings(), 64, 3)
    class_keys = {}
    if prior and not base_prior:
        class_keys[0] = []
        for j in range(class_count):
            store.put_bytes(f"class/{j}", subject_photo(j + 5))
            class_keys[0].append(f"class/{j}")
    return Examples.load(TrainConfig.from_spec(spec, family), store.get_bytes, class_keys)


def test_buckets_at_a_pixel_budget_and_the_nearest_for_an_image():
    assert buckets(128, False) == [(128, 128)]
    got = buckets(128, True)
    assert (128, 128) in got and (192, 64) in got and (64, 192) in got
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 128 * 128 for w, h in got)
    assert nearest_bucket((300, 100), got) == (192, 64)
    assert nearest_bucket((100, 110), got) == (128, 128)


def test_a_micro_batch_holds_one_bucket_and_records_sizes_and_crops(local_store):
    photos = [photo((300, 100)), photo((100, 300), 1), photo((200, 200), 2),
              photo((310, 100), 3)]
    examples = examples_of(local_store, photos, prior=True, train_batch_size=2,
                           resolution=128, family=SDXL,
                           options=S.TrainingOptions(aspect_ratio_bucketing=True))
    assert [i.bucket for i in examples.instances] == [(192, 64), (64, 192), (128, 128),
                                                      (192, 64)]
    ids = {p: [torch.zeros(77, dtype=torch.long)] * 2 for p in
           ("a photo of sks toy", "a photo of a toy")}
    for step in range(4):
        plan = examples.plan(step=step, micro=0, rank=0, world=1)
        buckets_ = {examples.instances[r.index].bucket for r in plan.rows if r.kind == INSTANCE}
        assert buckets_ == {plan.bucket}
        batch = examples.batch(plan, ids)
        width, height = plan.bucket
        assert batch.pixels.shape[-2:] == (height, width)
        assert batch.pixels.shape[0] == 4  # 2 instance + 2 class rows, one size
        first = examples.instances[plan.rows[0].index].image.size
        time_ids = batch.time_ids[0].tolist()
        assert time_ids[:2] == [first[1], first[0]] and time_ids[4:] == [height, width]


@pytest.fixture(scope="module")
def sd(tiny_sd):
    spec = TrainConfig.from_spec(S.TrainingJobSpec(
        identifier_token="sks", instance_prompt="a photo of sks toy", resolution=64,
        max_train_steps=2, train_batch_size=1, gradient_accumulation_steps=1,
        method=S.FINE_TUNE_METHOD_LORA, lora=S.LoraConfig(rank=4)))
    return load_models(str(tiny_sd), spec, 0)


def tokens(m, prompts):
    return {p: [t(p, padding="max_length", max_length=t.model_max_length, truncation=True,
                  return_tensors="pt").input_ids[0] for t in m.tokenizers] for p in prompts}


def loss_of(m, batch, seed=4, **kwargs):
    with torch.no_grad():
        return batch_loss(unet=m.unet, text_encoders=m.text_encoders, vae=m.vae,
                          noise_scheduler=m.noise_scheduler, family=m.family, batch=batch,
                          generator=torch.Generator().manual_seed(seed),
                          base_model=lambda: base_model(m), **kwargs)


def test_cached_latents_give_the_uncached_loss(local_store, sd):
    """The cache holds each image's latent distribution; a step samples it with its own
    generator, as the uncached path samples the VAE's output."""
    photos = [photo((96, 80), i) for i in range(3)]
    fields = dict(prior=True, train_batch_size=2,
                  options=S.TrainingOptions(random_flip=True, cache_latents=True))
    examples = examples_of(local_store, photos, **fields)
    cache = latent_cache.build_or_load(
        local_store, "job", examples, "fp", vae=sd.vae, device="cpu", rank=0, world=1,
        barrier=lambda: None)
    assert len(cache) == len(latent_cache.entries(examples)) == 3 * 2 + 3 * 2
    again = latent_cache.build_or_load(local_store, "job", examples, "fp", vae=None,
                                       device="cpu", rank=0, world=1, barrier=None)
    assert len(again) == len(cache)  # loaded, not encoded (no VAE given)
    ids = tokens(sd, ["a photo of sks toy", "a photo of a toy"])
    for step in range(3):
        plan = examples.plan(step=step, micro=0, rank=0, world=1)
        cached = loss_of(sd, examples.batch(plan, ids, latents=cache))
        plain = loss_of(sd, examples.batch(plan, ids))
        torch.testing.assert_close(cached.loss, plain.loss, rtol=1e-4, atol=1e-5)


def test_masked_loss_is_a_weighted_mean_over_the_mask(local_store, sd):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # the left half
    examples = examples_of(local_store, [photo((64, 64))], masks=[png(mask)],
                           options=S.TrainingOptions(masked_loss_outside_weight=0.25))
    plan = examples.plan(step=0, micro=0, rank=0, world=1)
    batch = examples.batch(plan, tokens(sd, ["a photo of sks toy"]))
    weights = batch.masks[0, 0]
    assert weights[:, :32].min() == 1.0 and weights[:, 32:].max() == 0.25
    pred, target = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    parts = dreambooth_loss(pred, target, torch.zeros(1), 1, 0.0, masks=batch.masks)
    w = torch.ones(8, 8)
    w[:, 4:] = 0.25
    error = (pred - target) ** 2
    torch.testing.assert_close(parts.loss, (error * w).sum() / (w.sum() * 4))


def test_the_base_model_prior_targets_the_untrained_prediction(local_store, sd, tiny_sd):
    """Base-model prior rows reuse the instance rows' noisy latents with the class prompt;
    their target is the base UNet's prediction (LoRA adapters off), not noise."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    examples = examples_of(local_store, [photo((64, 64))], prior=True, base_prior=True)
    plan = examples.plan(step=0, micro=0, rank=0, world=1)
    assert [r.kind for r in plan.rows] == [INSTANCE, BASE_PRIOR]
    ids = tokens(sd, ["a photo of sks toy", "a photo of a toy"])
    batch = examples.batch(plan, ids)
    captured = {}
    plain_unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    encoder = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")

    def spy(base):
        def forward(noisy, t, hidden, **kwargs):
            out = base.__class__.forward(base, noisy, t, hidden, **kwargs)
            captured.setdefault("calls", []).append((noisy, t, hidden, out[0]))
            return out
        return forward

    sd.unet.forward = spy(sd.unet)
    try:
        parts = loss_of(sd, batch)
    finally:
        del sd.unet.forward
    (noisy, _, _, pred), (base_noisy, base_t, _, base_pred) = captured["calls"]
    torch.testing.assert_close(base_noisy, noisy[1:])  # the instance row's latents again
    with torch.no_grad():
        want = plain_unet(base_noisy, base_t, encoder(ids["a photo of a toy"][0][None])[0]
                          ).sample
    torch.testing.assert_close(base_pred, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(pred[1], want[0])  # the adapters do change the prediction
    torch.testing.assert_close(parts.prior, F.mse_loss(pred[1:], want))


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    spec = TrainConfig.from_spec(S.TrainingJobSpec(
        identifier_token="sks", instance_prompt="a photo of sks toy", resolution=64,
        max_train_steps=2, train_batch_size=1, gradient_accumulation_steps=1,
        method=S.FINE_TUNE_METHOD_LORA, lora=S.LoraConfig(rank=4),
        text_encoder=S.TextEncoderTraining(enabled=True),
        text_encoder_2=S.TextEncoderTraining(enabled=True)), SDXL)
    return load_models(str(tiny_sdxl), spec, 0)


def reference_sdxl_loss(m, pixels, prompts, time_ids, seed, prior_weight):
    """train_dreambooth_lora_sdxl.py's loss, written out plainly: both encoders'
    penultimate states side by side, the second's pooled embedding, add_time_ids of
    (original size, crop top-left, target size), instance/class halves."""
    g = torch.Generator().manual_seed(seed)
    latents = m.vae.encode(pixels).latent_dist.sample(generator=g) * m.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=g)
    torch.randn((*latents.shape[:2], 1, 1), generator=g)  # the offset draw (unused at 0)
    scheduler = m.noise_scheduler
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                      generator=g)
    noisy = scheduler.add_noise(latents, noise, t)
    embeds = []
    for tokenizer, encoder in zip(m.tokenizers, m.text_encoders, strict=True):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        out = encoder(ids, output_hidden_states=True, return_dict=False)
        pooled = out[0]
        embeds.append(out[-1][-2])
    pred = m.unet(noisy, t, torch.cat(embeds, dim=-1), added_cond_kwargs={
        "time_ids": time_ids, "text_embeds": pooled}, return_dict=False)[0]
    pred, pred_prior = pred.chunk(2)
    target, target_prior = noise.chunk(2)
    return F.mse_loss(pred.float(), target.float()) + \
        prior_weight * F.mse_loss(pred_prior.float(), target_prior.float())


def test_sdxl_loss_matches_the_reference_formula(sdxl):
    torch.manual_seed(0)
    pixels = torch.rand(4, 3, 64, 64) * 2 - 1
    prompts = ["a photo of sks toy"] * 2 + ["a photo of a toy"] * 2
    time_ids = torch.tensor([[96, 80, 8, 0, 64, 64], [64, 64, 0, 0, 64, 64]] * 2,
                            dtype=torch.float32)
    ids = tokens(sdxl, prompts)
    batch = Batch(num_instance=2, input_ids=[torch.stack([ids[p][e] for p in prompts])
                                             for e in range(2)],
                  pixels=pixels, time_ids=time_ids, prior_weights=torch.full((2,), 0.5))
    with torch.no_grad():
        ours = loss_of(sdxl, batch, seed=6)
        want = reference_sdxl_loss(sdxl, pixels, prompts, time_ids, 6, 0.5)
    torch.testing.assert_close(ours.loss, want, rtol=1e-5, atol=1e-6)
    # Gradients reach both text encoders' adapters (not the first one's last layer,
    # whose output SDXL does not use).
    loss = batch_loss(unet=sdxl.unet, text_encoders=sdxl.text_encoders, vae=sdxl.vae,
                      noise_scheduler=sdxl.noise_scheduler, family=SDXL, batch=batch,
                      generator=torch.Generator().manual_seed(6)).loss
    loss.backward()
    for encoder in sdxl.text_encoders:
        grads = [p.grad for n, p in encoder.named_parameters() if "lora_" in n]
        assert sum(g is not None for g in grads) >= len(grads) // 2


def test_class_rows_take_the_bucket_of_their_batch(local_store):
    examples = examples_of(local_store, [photo((300, 100))], prior=True, resolution=128,
                           options=S.TrainingOptions(aspect_ratio_bucketing=True))
    plan = examples.plan(step=0, micro=0, rank=0, world=1)
    assert [r.kind for r in plan.rows] == [INSTANCE, CLASS_IMAGE]
    ids = {p: [torch.zeros(77, dtype=torch.long)] for p in examples.prompts(plan)}
    assert examples.batch(plan, ids).pixels.shape == (2, 3, 64, 192)


def test_a_full_fine_tune_with_the_base_model_prior_keeps_a_frozen_copy(tiny_sd):
    spec = TrainConfig.from_spec(S.TrainingJobSpec(
        identifier_token="sks", instance_prompt="a photo of sks toy", class_prompt="a toy",
        resolution=64, max_train_steps=2, train_batch_size=1, gradient_accumulation_steps=1,
        method=S.FINE_TUNE_METHOD_FULL, text_encoder=S.TextEncoderTraining(enabled=True),
        prior_preservation=S.PriorPreservation(enabled=True,
                                               source=S.PRIOR_SOURCE_BASE_MODEL)))
    m = load_models(str(tiny_sd), spec, 0)
    with torch.no_grad():
        for p in m.trainables.parameters():
            p.add_(0.01)  # training moves the weights...
    with base_model(m) as (unet, encoders):  # ...not the base's
        assert unet is not m.unet and encoders[0] is not m.text_encoders[0]
        base = dict(unet.named_parameters())
    from diffusers import UNet2DConditionModel

    plain = dict(UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet"
                                                      ).named_parameters())
    assert all(torch.equal(base[n], plain[n]) for n in plain)
    assert not any(p.requires_grad for p in base.values())


def test_an_sdxl_full_fine_tune_trains_both_encoders_and_exports(local_settings, tiny_sdxl,
                                                                model_cache):
    """The loop in-process (one worker, no Ray) on the tiny SDXL, full fine-tune with
    both text encoders and the base-model prior, scoring its subject, then the export
    diffusers loads."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    from atelier.storage import open_store
    from atelier.training.bases import describe_base
    from atelier.training.config import TrainingEngineSettings
    from atelier.training.evaluation import read_scores
    from atelier.training.export import ExportTarget, export_model
    from atelier.training.jobs import JobStore
    from atelier.training.loop import Worker
    from atelier.training.submission import submit_job
    from atelier.training.worker_config import WorkerConfig, worker_storage

    store = open_store(local_settings)
    config = TrainingEngineSettings(base_models={"xl": str(tiny_sdxl)}, default_base_model="xl")
    job, _ = submit_job(JobStore(store), config, "", "xl-full", S.TrainingJobSpec(
        instance_images=[common_pb2.ImageInput(data=photo((160, 96), p)) for p in range(2)],
        identifier_token="sks", instance_prompt="a photo of sks toy",
        class_prompt="a photo of a toy", method=S.FINE_TUNE_METHOD_FULL,
        prior_preservation=S.PriorPreservation(enabled=True, source=S.PRIOR_SOURCE_BASE_MODEL),
        text_encoder=S.TextEncoderTraining(enabled=True),
        text_encoder_2=S.TextEncoderTraining(enabled=True, learning_rate=1e-6),
        max_train_steps=2, learning_rate=1e-5, checkpointing=S.CheckpointPolicy(every_n_steps=2),
        ema=S.EmaConfig(enabled=True, export_weights=S.EXPORT_WEIGHTS_RAW),
        evaluation=S.SubjectEvaluation(enabled=True, num_inference_steps=2,
                                       prompts=["a sks toy on the beach"])),
        base=describe_base(str(tiny_sdxl)))
    train = TrainConfig.from_spec(job.spec, SDXL)
    Worker(WorkerConfig(job_id="xl-full", train=train, storage=worker_storage(local_settings),
                        cache_dir=str(model_cache), base_ref=str(tiny_sdxl),
                        clip_model="tiny://clip", dino_model="tiny://dino")).train()
    (scored,) = read_scores(store, "xl-full")
    assert scored.step == 2 and scored.scores.images == 1 and -1e-6 <= scored.scores.drift <= 2
    export_model(store, job, train, ExportTarget("xl-full", "xl", str(tiny_sdxl), str(tiny_sdxl)),
                 2, scored)
    manifest = store.get_json("models/xl-full/manifest.json")
    assert manifest["scores"] == {"step": 2, **scored.scores.as_dict()}
    assert manifest["kind"] == "full" and manifest["family"] == "stable-diffusion-xl"
    assert manifest["weights"] == {"lora": None, "unet": "unet", "text_encoder": "text_encoder",
                                   "text_encoder_2": "text_encoder_2"}
    local = local_settings.local_root / local_settings.bucket / "models" / "xl-full"
    pipe = StableDiffusionXLPipeline.from_pretrained(
        tiny_sdxl, unet=UNet2DConditionModel.from_pretrained(local / "unet"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(local / "text_encoder_2"),
        add_watermarker=False)
    trained = load_models(str(tiny_sdxl), train, 0)
    base = dict(trained.unet.named_parameters())
    changed = [n for n, p in pipe.unet.named_parameters() if not torch.equal(p, base[n])]
    assert changed  # the exported (raw) UNet is the trained one, not the base
