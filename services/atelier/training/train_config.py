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


def _f(value: float) -> float:
    """A proto float as the API gave it: 1e-4 stays 0.0001, not float32's widening
    (the value the workers always trained with)."""
    return ToShortestFloat(value)


_METHODS = {S.FINE_TUNE_METHOD_LORA: Method.LORA}
_PRECISIONS = {S.MIXED_PRECISION_FP16: Precision.FP16, S.MIXED_PRECISION_BF16: Precision.BF16}
_SCHEDULES = {S.LEARNING_RATE_SCHEDULE_LINEAR: LrSchedule.LINEAR,
              S.LEARNING_RATE_SCHEDULE_COSINE: LrSchedule.COSINE,
              S.LEARNING_RATE_SCHEDULE_POLYNOMIAL: LrSchedule.POLYNOMIAL}


@dataclass(frozen=True)
class PriorConfig:
    """Class-prior preservation."""

    enabled: bool = False
    loss_weight: float = 1.0
    """Weight of the prior loss against the instance loss."""


@dataclass(frozen=True)
class TextEncoderConfig:
    """Whether (and how long, how fast) the text encoder trains."""

    enabled: bool = False
    learning_rate: float | None = None
    """None: the UNet's learning rate."""
    stop_at_step: int = 0
    """Freeze it from this step on; 0: it trains to the end."""


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 4
    alpha: float = 4.0
    """Scale numerator (alpha / rank); the rank when unset."""


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


@dataclass(frozen=True)
class TrainConfig:
    """Everything a worker needs of the job's spec."""

    instance_prompt: str
    class_prompt: str
    resolution: int
    """Training resolution, pixels (square)."""
    max_train_steps: int
    learning_rate: float
    train_batch_size: int
    """Instance examples per rank per micro-step."""
    gradient_accumulation_steps: int
    seed: int
    method: Method = Method.FULL
    lora: LoraSettings = LoraSettings()
    precision: Precision = Precision.NO
    lr_schedule: LrSchedule = LrSchedule.CONSTANT
    lr_warmup_steps: int = 0
    prior: PriorConfig = PriorConfig()
    text_encoder: TextEncoderConfig = TextEncoderConfig()
    options: Options = Options()
    checkpoint_every: int = 0
    """Save a checkpoint every this many steps (and at the end); 0: only at the end."""
    checkpoint_keep_last: int = 1
    gpus_per_worker: int = 0
    validation_prompts: tuple[str, ...] = field(default_factory=tuple)

    @property
    def lora_enabled(self) -> bool:
        return self.method is Method.LORA

    @classmethod
    def from_spec(cls, spec: S.TrainingJobSpec) -> TrainConfig:
        """From a stored (validated, defaulted) spec."""
        pp, te, lora, o = spec.prior_preservation, spec.text_encoder, spec.lora, spec.options
        return cls(
            instance_prompt=spec.instance_prompt,
            class_prompt=spec.class_prompt,
            resolution=spec.resolution,
            max_train_steps=spec.max_train_steps,
            learning_rate=_f(spec.learning_rate),
            train_batch_size=spec.train_batch_size,
            gradient_accumulation_steps=spec.gradient_accumulation_steps,
            seed=spec.seed,
            method=_METHODS.get(spec.method, Method.FULL),
            lora=LoraSettings(lora.rank, _f(lora.alpha) if lora.HasField("alpha")
                              and lora.alpha else lora.rank),
            precision=_PRECISIONS.get(spec.mixed_precision, Precision.NO),
            lr_schedule=_SCHEDULES.get(spec.lr_schedule, LrSchedule.CONSTANT),
            lr_warmup_steps=spec.lr_warmup_steps,
            prior=PriorConfig(pp.enabled, _f(pp.loss_weight) if pp.HasField("loss_weight")
                              and pp.loss_weight else 1.0),
            text_encoder=TextEncoderConfig(
                te.enabled, _f(te.learning_rate) if te.HasField("learning_rate")
                and te.learning_rate else None, te.stop_at_step),
            options=Options(
                snr_gamma=_f(o.snr_gamma), noise_offset=_f(o.noise_offset),
                random_flip=o.random_flip, center_crop=o.center_crop,
                gradient_checkpointing=o.gradient_checkpointing, use_8bit_adam=o.use_8bit_adam,
                max_grad_norm=_f(o.max_grad_norm) if o.HasField("max_grad_norm") else 1.0),
            checkpoint_every=spec.checkpointing.every_n_steps,
            checkpoint_keep_last=spec.checkpointing.keep_last,
            gpus_per_worker=spec.resources.gpus_per_worker,
            validation_prompts=tuple(spec.validation_prompts),
        )
