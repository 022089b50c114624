"""The typed configuration of one training run, built once from the stored job spec.

The proto (``TrainingJobSpec``) stays the API and the stored record; it stops
here, at the engine boundary. What the Ray workers, the model builder and the
export read is :class:`TrainConfig`: plain frozen dataclasses with enums and the
API's defaults applied (an unset optional field becomes its documented value),
so nothing downstream casts strings or looks for missing keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from google.protobuf.internal.type_checkers import ToShortestFloat

from atelier.models.pipelines import SD
from atelier.models.subject_scores import Score
from atelier.training import defaults as D
from atelier.v1 import training_pb2 as S


class Method(StrEnum):
    """What trains: the whole UNet (and text encoder), or LoRA adapters on them."""

    FULL = "full"
    LORA = "lora"


class Precision(StrEnum):
    """Autocast dtype of the forward pass; ``no`` trains in float32."""

    NO = "no"
    FP16 = "fp16"
    BF16 = "bf16"


class LrSchedule(StrEnum):
    """diffusers' ``get_scheduler`` names."""

    CONSTANT = "constant_with_warmup"
    LINEAR = "linear"
    COSINE = "cosine"
    POLYNOMIAL = "polynomial"


class SigmaSampling(StrEnum):
    """diffusers' ``compute_density_for_timestep_sampling`` scheme names."""

    LOGIT_NORMAL = "logit_normal"
    MODE = "mode"
    UNIFORM = "uniform"


class LossWeighting(StrEnum):
    """diffusers' ``compute_loss_weighting_for_sd3`` scheme names."""

    NONE = "none"
    SIGMA_SQRT = "sigma_sqrt"
    COSMAP = "cosmap"


class PriorSource(StrEnum):
    """Where the prior term's targets come from."""

    CLASS_IMAGES = "class_images"
    BASE_MODEL = "base_model"


def _f(value: float) -> float:
    """A proto float as the API gave it: 1e-4 stays 0.0001, not float32's widening
    (the value the workers always trained with)."""
    return ToShortestFloat(value)


_SAMPLINGS = {S.SIGMA_SAMPLING_LOGIT_NORMAL: SigmaSampling.LOGIT_NORMAL,
              S.SIGMA_SAMPLING_MODE: SigmaSampling.MODE,
              S.SIGMA_SAMPLING_UNIFORM: SigmaSampling.UNIFORM}
_WEIGHTINGS = {S.LOSS_WEIGHTING_NONE: LossWeighting.NONE,
               S.LOSS_WEIGHTING_SIGMA_SQRT: LossWeighting.SIGMA_SQRT,
               S.LOSS_WEIGHTING_COSMAP: LossWeighting.COSMAP}
_METHODS = {S.FINE_TUNE_METHOD_LORA: Method.LORA, S.FINE_TUNE_METHOD_FULL: Method.FULL}
_PRECISIONS = {S.MIXED_PRECISION_FP16: Precision.FP16, S.MIXED_PRECISION_BF16: Precision.BF16}
_SCHEDULES = {S.LEARNING_RATE_SCHEDULE_LINEAR: LrSchedule.LINEAR,
              S.LEARNING_RATE_SCHEDULE_COSINE: LrSchedule.COSINE,
              S.LEARNING_RATE_SCHEDULE_POLYNOMIAL: LrSchedule.POLYNOMIAL}


@dataclass(frozen=True)
class PriorConfig:
    """Class-prior preservation of one concept."""

    enabled: bool = False
    loss_weight: float = 1.0
    """Weight of the prior loss against the instance loss."""
    source: PriorSource = PriorSource.CLASS_IMAGES
    num_class_images: int = 100
    class_image_steps: int = 25
    class_image_guidance_scale: float = 7.5

    @property
    def uses_class_images(self) -> bool:
        return self.enabled and self.source is PriorSource.CLASS_IMAGES

    @classmethod
    def from_proto(cls, pp: S.PriorPreservation, family: str = SD) -> PriorConfig:
        steps, guidance = D.sampling(family)
        return cls(enabled=pp.enabled,
                   loss_weight=_f(pp.loss_weight) if pp.HasField("loss_weight")
                   else D.PRIOR_LOSS_WEIGHT,
                   source=PriorSource.BASE_MODEL if pp.source == S.PRIOR_SOURCE_BASE_MODEL
                   else PriorSource.CLASS_IMAGES,
                   num_class_images=pp.num_class_images or D.NUM_CLASS_IMAGES,
                   class_image_steps=pp.class_image_steps or steps,
                   class_image_guidance_scale=_f(pp.class_image_guidance_scale)
                   if pp.HasField("class_image_guidance_scale") else guidance)


@dataclass(frozen=True)
class ExampleConfig:
    """One instance image in the store, with its prompt and optional mask."""

    key: str
    prompt: str
    """The image's caption, or its concept's instance prompt."""
    mask_key: str = ""
    mask_from_alpha: bool = False


@dataclass(frozen=True)
class ConceptConfig:
    """One subject: its identifier, images, class and prior."""

    identifier_token: str
    instance_prompt: str
    class_prompt: str
    prior: PriorConfig
    images: tuple[ExampleConfig, ...]


@dataclass(frozen=True)
class EmaSettings:
    enabled: bool = False
    decay: float = 0.999
    """Per optimizer step, in (0, 1)."""
    start_step: int = 0
    """The average starts after this optimizer step."""
    export_ema: bool = True
    """Export the EMA weights (else the raw ones)."""


@dataclass(frozen=True)
class TextEncoderConfig:
    """Whether (and how long, how fast) the text encoder trains."""

    enabled: bool = False
    learning_rate: float | None = None
    """None: the UNet's learning rate."""
    stop_at_step: int = 0
    """Freeze it from this step on; 0: it trains to the end."""


_LORA_TARGETS = {S.LORA_TARGETS_ATTENTION: "attention",
                 S.LORA_TARGETS_ATTENTION_MLP: "attention_mlp"}


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 4
    alpha: float = 4.0
    """Scale numerator (alpha / rank); the rank when unset."""
    targets: str = "attention"
    """The denoiser layers with adapters: a preset of the family's ``lora_presets``."""


@dataclass(frozen=True)
class FlowMatchingConfig:
    """The flow-matching objective (``training.flow_matching``); flow bases only."""

    sigma_sampling: SigmaSampling = _SAMPLINGS[D.SIGMA_SAMPLING]
    logit_mean: float = D.LOGIT_MEAN
    logit_std: float = D.LOGIT_STD
    mode_scale: float = D.MODE_SCALE
    loss_weighting: LossWeighting = _WEIGHTINGS[D.LOSS_WEIGHTING]
    min_sigma: float = D.MIN_SIGMA
    max_sigma: float = D.MAX_SIGMA
    resolution_shift: bool = False
    """Shift sigmas by the image's token count, as the model's sampler does."""

    @classmethod
    def from_proto(cls, f: S.FlowMatching) -> FlowMatchingConfig:
        def given(name: str, default: float) -> float:
            return _f(getattr(f, name)) if f.HasField(name) else default

        return cls(sigma_sampling=_SAMPLINGS[f.sigma_sampling or D.SIGMA_SAMPLING],
                   logit_mean=given("logit_mean", D.LOGIT_MEAN),
                   logit_std=given("logit_std", D.LOGIT_STD),
                   mode_scale=given("mode_scale", D.MODE_SCALE),
                   loss_weighting=_WEIGHTINGS[f.loss_weighting or D.LOSS_WEIGHTING],
                   min_sigma=given("min_sigma", D.MIN_SIGMA),
                   max_sigma=given("max_sigma", D.MAX_SIGMA),
                   resolution_shift=f.resolution_shift)


@dataclass(frozen=True)
class Options:
    snr_gamma: float = 0.0
    """Min-SNR weighting gamma; 0: off."""
    noise_offset: float = 0.0
    random_flip: bool = False
    center_crop: bool = False
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0: no clipping."""
    aspect_ratio_bucketing: bool = False
    cache_latents: bool = False
    masked_loss_outside_weight: float = 0.0
    """Loss weight where a mask is 0, in 0..1."""
    flow_matching: FlowMatchingConfig = FlowMatchingConfig()


_SCORES = {S.SUBJECT_SCORE_DINO: Score.DINO, S.SUBJECT_SCORE_CLIP_I: Score.CLIP_I,
           S.SUBJECT_SCORE_CLIP_T: Score.CLIP_T, S.SUBJECT_SCORE_DRIFT: Score.DRIFT}


@dataclass(frozen=True)
class QualityGate:
    """Thresholds of the exported checkpoint's scores; None: not checked."""

    min_dino: float | None = None
    min_clip_i: float | None = None
    min_clip_t: float | None = None
    max_drift: float | None = None


@dataclass(frozen=True)
class EvaluationConfig:
    """Subject scoring at every checkpoint (``training.evaluation``)."""

    enabled: bool = False
    prompts: tuple[str, ...] = ()
    """Prompts to render; empty: the validation prompts, else the default set."""
    images_per_prompt: int = 1
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    class_noun: str = ""
    """Empty: the word after the identifier in each concept's instance prompt."""
    gate: QualityGate = QualityGate()
    export_best_by: Score | None = None
    """Export the best checkpoint by this score; None: the last."""

    @classmethod
    def from_proto(cls, e: S.SubjectEvaluation, family: str = SD) -> EvaluationConfig:
        steps, guidance = D.sampling(family)
        g = e.quality_gate
        return cls(
            enabled=e.enabled, prompts=tuple(e.prompts),
            images_per_prompt=e.images_per_prompt or D.EVAL_IMAGES_PER_PROMPT,
            num_inference_steps=e.num_inference_steps or steps,
            guidance_scale=_f(e.guidance_scale) if e.HasField("guidance_scale")
            else guidance,
            class_noun=e.class_noun.strip(),
            gate=QualityGate(**{name: _f(getattr(g, name)) for name in
                                ("min_dino", "min_clip_i", "min_clip_t", "max_drift")
                                if g.HasField(name)}),
            export_best_by=_SCORES.get(e.export_best_by))


@dataclass(frozen=True)
class TrainConfig:
    """Everything a worker needs of the job's spec."""

    concepts: tuple[ConceptConfig, ...]
    resolution: int
    """Training resolution, pixels: the side of the square crop, or with bucketing
    the square root of each bucket's pixel budget."""
    max_train_steps: int
    learning_rate: float
    train_batch_size: int
    """Instance examples per rank per micro-step."""
    gradient_accumulation_steps: int
    seed: int
    method: Method = Method.LORA
    lora: LoraSettings = LoraSettings()
    precision: Precision = Precision.NO
    lr_schedule: LrSchedule = LrSchedule.CONSTANT
    lr_warmup_steps: int = 0
    family: str = SD
    """The base model's family (``atelier.models.pipelines``): SD 1.x/2.x, SDXL or
    FLUX.2 [klein]."""
    text_encoder: TextEncoderConfig = TextEncoderConfig()
    text_encoder_2: TextEncoderConfig = TextEncoderConfig()
    """SDXL's second text encoder."""
    ema: EmaSettings = EmaSettings()
    options: Options = Options()
    checkpoint_every: int = 0
    """Save a checkpoint every this many steps (and at the end); 0: only at the end."""
    checkpoint_keep_last: int = D.CHECKPOINT_KEEP_LAST
    gpus_per_worker: int = 0
    validation_prompts: tuple[str, ...] = field(default_factory=tuple)
    evaluation: EvaluationConfig = EvaluationConfig()

    @property
    def lora_enabled(self) -> bool:
        return self.method is Method.LORA

    @property
    def prior_enabled(self) -> bool:
        """Whether any concept has prior preservation (a class half in the batch)."""
        return any(c.prior.enabled for c in self.concepts)

    @classmethod
    def from_spec(cls, spec: S.TrainingJobSpec, family: str = SD) -> TrainConfig:
        """From a stored (validated, defaulted) spec, for a base model of ``family``. A
        field the spec left unset takes its default from ``defaults.py``, the table
        submission applies, so both give the same config."""
        from atelier.models.families import family_named
        from atelier.training.spec import concepts_of

        lora, o, ema = spec.lora, spec.options, spec.ema
        method = spec.method or D.METHOD
        checkpointing = spec.checkpointing.every_n_steps if spec.HasField("checkpointing") \
            else D.CHECKPOINT_EVERY
        return cls(
            concepts=tuple(ConceptConfig(
                identifier_token=c.identifier_token, instance_prompt=c.instance_prompt,
                class_prompt=c.class_prompt, prior=PriorConfig.from_proto(c.prior_preservation,
                                                                 family),
                images=tuple(ExampleConfig(
                    key=i.image.object.key, prompt=i.caption or c.instance_prompt,
                    mask_key=i.mask.object.key if i.HasField("mask") else "",
                    mask_from_alpha=i.mask_from_alpha) for i in c.images))
                for c in concepts_of(spec)),
            family=family,
            resolution=spec.resolution or D.RESOLUTION,
            max_train_steps=spec.max_train_steps or D.MAX_TRAIN_STEPS,
            learning_rate=_f(spec.learning_rate) if spec.HasField("learning_rate")
            else D.LEARNING_RATE[method],
            train_batch_size=spec.train_batch_size or D.TRAIN_BATCH_SIZE,
            gradient_accumulation_steps=spec.gradient_accumulation_steps
            or D.GRADIENT_ACCUMULATION_STEPS,
            seed=spec.seed if spec.HasField("seed") else D.SEED,
            method=_METHODS[method],
            lora=LoraSettings(lora.rank or D.LORA_RANK, _f(lora.alpha)
                              if lora.HasField("alpha") and lora.alpha
                              else lora.rank or D.LORA_RANK,
                              _LORA_TARGETS.get(lora.targets,
                                                family_named(family).default_lora_preset)),
            precision=_PRECISIONS.get(
                spec.mixed_precision or D.mixed_precision(spec.resources.gpus_per_worker),
                Precision.NO),
            lr_schedule=_SCHEDULES.get(spec.lr_schedule, LrSchedule.CONSTANT),
            lr_warmup_steps=spec.lr_warmup_steps,
            text_encoder=_text_encoder(spec.text_encoder),
            text_encoder_2=_text_encoder(spec.text_encoder_2),
            ema=EmaSettings(enabled=ema.enabled,
                            decay=_f(ema.decay) if ema.HasField("decay") else D.EMA_DECAY,
                            start_step=ema.start_step,
                            export_ema=(ema.export_weights or D.export_weights(ema.enabled))
                            == S.EXPORT_WEIGHTS_EMA),
            options=Options(
                snr_gamma=_f(o.snr_gamma), noise_offset=_f(o.noise_offset),
                random_flip=o.random_flip, center_crop=o.center_crop,
                gradient_checkpointing=o.gradient_checkpointing, use_8bit_adam=o.use_8bit_adam,
                max_grad_norm=_f(o.max_grad_norm) if o.HasField("max_grad_norm")
                else D.MAX_GRAD_NORM,
                aspect_ratio_bucketing=o.aspect_ratio_bucketing, cache_latents=o.cache_latents,
                masked_loss_outside_weight=_f(o.masked_loss_outside_weight),
                flow_matching=FlowMatchingConfig.from_proto(o.flow_matching)),
            checkpoint_every=checkpointing,
            checkpoint_keep_last=spec.checkpointing.keep_last or D.CHECKPOINT_KEEP_LAST,
            gpus_per_worker=spec.resources.gpus_per_worker,
            validation_prompts=tuple(spec.validation_prompts),
            evaluation=EvaluationConfig.from_proto(spec.evaluation, family),
        )


def _text_encoder(te: S.TextEncoderTraining) -> TextEncoderConfig:
    return TextEncoderConfig(te.enabled, _f(te.learning_rate) if te.HasField("learning_rate")
                             and te.learning_rate else None, te.stop_at_step)
