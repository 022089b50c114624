"""The typed training config: enums and the API's defaults, from the stored spec."""

from __future__ import annotations

import pickle

from atelier.models.subject_scores import Score
from atelier.training.train_config import (
    LrSchedule,
    Method,
    Precision,
    PriorSource,
    QualityGate,
    TrainConfig,
)
from atelier.v1 import common_pb2
from atelier.v1 import training_pb2 as S


def spec(**fields) -> S.TrainingJobSpec:
    base = dict(instance_prompt="a photo of sks dog", class_prompt="a photo of a dog",
                identifier_token="sks",
                resolution=128, max_train_steps=10, learning_rate=1e-4, train_batch_size=1,
                gradient_accumulation_steps=2, seed=7)
    return S.TrainingJobSpec(**{**base, **fields})


def test_enums_and_unset_optional_fields_take_their_documented_values():
    c = TrainConfig.from_spec(spec())
    assert (c.method, c.precision, c.lr_schedule) == (Method.LORA, Precision.NO,
                                                      LrSchedule.CONSTANT)
    assert c.learning_rate == 0.0001  # as given, not float32's 9.9999997e-05
    assert c.concepts[0].prior.loss_weight == 1.0 and c.text_encoder.learning_rate is None
    assert not c.ema.enabled and not c.options.cache_latents
    assert c.options.max_grad_norm == 1.0 and c.lora.alpha == c.lora.rank
    # No checkpointing section: every 500 steps, as submission stores it.
    assert c.checkpoint_every == 500 and c.validation_prompts == ()
    e = c.evaluation
    assert not e.enabled and (e.images_per_prompt, e.num_inference_steps) == (1, 25)
    assert e.guidance_scale == 7.5 and e.export_best_by is None
    assert e.gate == QualityGate()  # nothing checked


def test_set_fields_come_through_typed():
    c = TrainConfig.from_spec(spec(
        method=S.FINE_TUNE_METHOD_LORA, lora=S.LoraConfig(rank=8, alpha=16.0),
        mixed_precision=S.MIXED_PRECISION_BF16, lr_schedule=S.LEARNING_RATE_SCHEDULE_COSINE,
        prior_preservation=S.PriorPreservation(enabled=True, loss_weight=0.5),
        text_encoder=S.TextEncoderTraining(enabled=True, learning_rate=5e-6, stop_at_step=4),
        options=S.TrainingOptions(snr_gamma=5.0, max_grad_norm=0.0, random_flip=True),
        checkpointing=S.CheckpointPolicy(every_n_steps=5, keep_last=2),
        resources=S.TrainingResources(gpus_per_worker=1), validation_prompts=["x"],
        evaluation=S.SubjectEvaluation(enabled=True, images_per_prompt=2, guidance_scale=3.0,
                                       quality_gate=S.QualityGate(min_dino=0.6, max_drift=0.3),
                                       export_best_by=S.SUBJECT_SCORE_DRIFT)))
    assert c.lora_enabled and (c.lora.rank, c.lora.alpha) == (8, 16.0)
    assert c.precision is Precision.BF16 and c.lr_schedule.value == "cosine"
    assert c.prior_enabled and c.concepts[0].prior.loss_weight == 0.5
    assert (c.text_encoder.learning_rate, c.text_encoder.stop_at_step) == (5e-6, 4)
    assert c.options.snr_gamma == 5.0 and c.options.max_grad_norm == 0.0  # 0: no clipping
    assert (c.checkpoint_every, c.checkpoint_keep_last, c.gpus_per_worker) == (5, 2, 1)
    e = c.evaluation
    assert e.enabled and (e.images_per_prompt, e.guidance_scale) == (2, 3.0)
    assert e.gate == QualityGate(min_dino=0.6, max_drift=0.3)  # as given, not float32's
    assert e.export_best_by is Score.DRIFT and not e.export_best_by.higher_is_better
    assert pickle.loads(pickle.dumps(c)) == c  # it travels to Ray workers


def test_concepts_carry_their_captions_masks_and_priors():
    image = lambda key: S.InstanceImage(  # noqa: E731
        image=common_pb2.ImageInput(object=common_pb2.ObjectRef(key=key)))
    captioned = image("b")
    captioned.caption = "sks dog on a beach"
    captioned.mask.object.key = "b-mask"
    c = TrainConfig.from_spec(S.TrainingJobSpec(
        concepts=[S.Concept(identifier_token="sks", instance_prompt="a photo of sks dog",
                            images=[image("a"), captioned]),
                  S.Concept(identifier_token="zwx", instance_prompt="zwx cat",
                            class_prompt="a cat", images=[image("c")],
                            prior_preservation=S.PriorPreservation(
                                enabled=True, source=S.PRIOR_SOURCE_BASE_MODEL))],
        ema=S.EmaConfig(enabled=True, decay=0.99, export_weights=S.EXPORT_WEIGHTS_RAW),
        resolution=128, max_train_steps=2, train_batch_size=1, gradient_accumulation_steps=1),
        family="stable-diffusion-xl")
    dog, cat = c.concepts
    assert [(e.key, e.prompt, e.mask_key) for e in dog.images] == [
        ("a", "a photo of sks dog", ""), ("b", "sks dog on a beach", "b-mask")]
    assert not dog.prior.enabled and cat.prior.source is PriorSource.BASE_MODEL
    assert c.family == "stable-diffusion-xl"
    assert c.ema.enabled and c.ema.decay == 0.99 and not c.ema.export_ema
