"""Every default of a training job, in one table.

``spec.apply_defaults`` writes these into the stored spec at submission, and
``TrainConfig.from_spec`` falls back to the same values for a field a spec left
unset, so a spec trains alike whichever path built its config (the service,
``atelier-train run``, a sweep, or a record stored before a field existed).
"""

from __future__ import annotations

from atelier.v1 import training_pb2 as S

METHOD = S.FINE_TUNE_METHOD_LORA
"""What trains when the spec does not say: LoRA adapters."""
LEARNING_RATE = {S.FINE_TUNE_METHOD_LORA: 1e-4, S.FINE_TUNE_METHOD_FULL: 5e-6}
"""Per method: LoRA's adapters take a much higher rate than a full fine-tune."""
LORA_RANK = 4
MAX_TRAIN_STEPS = 400
TRAIN_BATCH_SIZE = 1
"""Instance examples per rank per micro-step."""
GRADIENT_ACCUMULATION_STEPS = 1
LR_SCHEDULE = S.LEARNING_RATE_SCHEDULE_CONSTANT
SEED = 0
"""Only for a spec that skipped submission: submission draws a random seed and stores it."""
RESOLUTION = 128
"""Pixels; only for a spec that skipped submission: submission stores the base
model's native resolution."""
NUM_WORKERS = 1
CPUS_PER_WORKER = 1
CHECKPOINT_EVERY = 500
"""Steps between checkpoints when the spec has no ``checkpointing`` section (an
explicit section with 0 checkpoints only at the end)."""
CHECKPOINT_KEEP_LAST = 2
MAX_GRAD_NORM = 1.0
"""Gradient clipping norm; an explicit 0 turns clipping off."""
EMA_DECAY = 0.999

# Prior preservation, per concept.
PRIOR_LOSS_WEIGHT = 1.0
NUM_CLASS_IMAGES = 100
CLASS_IMAGE_STEPS = 25
CLASS_IMAGE_GUIDANCE_SCALE = 7.5
"""SD and SDXL, for class images and scored renders alike; other families render at
their own defaults (``sampling``)."""
PRIOR_SOURCE = S.PRIOR_SOURCE_CLASS_IMAGES

# Subject scoring (``evaluation``); whether it runs is ``training.evaluate_subjects``.
EVAL_IMAGES_PER_PROMPT = 1

#: Steps and guidance scale of the renders a job makes (class images, scored images),
#: per family: a flow-matching base samples with its own defaults (klein base: 50
#: steps at 4.0), not SD's 25 at 7.5.
SAMPLING = {"flux2-klein": (50, 4.0)}


def sampling(family: str) -> tuple[int, float]:
    """(steps, guidance scale) of class images and scored renders on ``family``."""
    return SAMPLING.get(family, (CLASS_IMAGE_STEPS, CLASS_IMAGE_GUIDANCE_SCALE))


# The flow-matching objective (flow-matching bases: FLUX.2 [klein]).
SIGMA_SAMPLING = S.SIGMA_SAMPLING_LOGIT_NORMAL
"""Logit-normal sigmas (Esser et al. 2024), centred: the mid-noise levels, where
the velocity is hardest to predict, are drawn most."""
LOGIT_MEAN = 0.0
LOGIT_STD = 1.0
MODE_SCALE = 1.29
LOSS_WEIGHTING = S.LOSS_WEIGHTING_NONE
MIN_SIGMA = 0.0
MAX_SIGMA = 1.0


def mixed_precision(gpus_per_worker: int) -> int:
    """bf16 autocast on GPUs; float32 on CPU."""
    return S.MIXED_PRECISION_BF16 if gpus_per_worker else S.MIXED_PRECISION_NO


def export_weights(ema_enabled: bool) -> int:
    """The EMA weights when the job keeps an EMA; the raw weights otherwise."""
    return S.EXPORT_WEIGHTS_EMA if ema_enabled else S.EXPORT_WEIGHTS_RAW
