"""Validating a TrainingJobSpec and filling in its documented defaults.

Every check reports a field violation with the field's path (``spec.resolution``),
and all violations of a request are reported together. Nothing is stored for
a request that fails here.
"""

from __future__ import annotations

import io
import re

from PIL import Image

from atelier.kit.errors import FieldViolation, InvalidArgument
from atelier.kit.validation import echo
from atelier.training.config import TrainingEngineSettings
from atelier.v1 import training_pb2

MODEL_ID_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
MIN_IMAGE_SIDE = 64


def apply_defaults(spec: training_pb2.TrainingJobSpec, settings: TrainingEngineSettings,
                   default_resolution: int, seed: int) -> training_pb2.TrainingJobSpec:
    """A copy with every unset field at its documented default."""
    s = training_pb2.TrainingJobSpec()
    s.CopyFrom(spec)
    s.base_model = s.base_model or f"models/{settings.default_base_model}"
    for section in (s.prior_preservation, s.text_encoder, s.lora, s.resources, s.checkpointing,
                    s.options):
        section.SetInParent()  # present in the stored record even when all defaults
    pp = s.prior_preservation
    if not pp.HasField("loss_weight"):
        pp.loss_weight = 1.0
    pp.num_class_images = pp.num_class_images or 100
    pp.class_image_steps = pp.class_image_steps or 25
    if not pp.HasField("class_image_guidance_scale"):
        pp.class_image_guidance_scale = 7.5
    if s.method == training_pb2.FINE_TUNE_METHOD_UNSPECIFIED:
        s.method = training_pb2.FINE_TUNE_METHOD_LORA
    s.lora.rank = s.lora.rank or 4
    s.resolution = s.resolution or default_resolution
    s.max_train_steps = s.max_train_steps or 400
    if not s.HasField("learning_rate"):
        s.learning_rate = 1e-4 if s.method == training_pb2.FINE_TUNE_METHOD_LORA else 5e-6
    if s.lr_schedule == training_pb2.LEARNING_RATE_SCHEDULE_UNSPECIFIED:
        s.lr_schedule = training_pb2.LEARNING_RATE_SCHEDULE_CONSTANT
    s.train_batch_size = s.train_batch_size or 1
    s.gradient_accumulation_steps = s.gradient_accumulation_steps or 1
    if s.mixed_precision == training_pb2.MIXED_PRECISION_UNSPECIFIED:
        s.mixed_precision = (training_pb2.MIXED_PRECISION_BF16 if s.resources.gpus_per_worker
                             else training_pb2.MIXED_PRECISION_NO)
    if not s.HasField("seed"):
        s.seed = seed
    s.resources.num_workers = s.resources.num_workers or 1
    s.resources.cpus_per_worker = s.resources.cpus_per_worker or 1
    if s.checkpointing.every_n_steps == 0 and not spec.HasField("checkpointing"):
        s.checkpointing.every_n_steps = 500
    s.checkpointing.keep_last = s.checkpointing.keep_last or 2
    if not s.options.HasField("max_grad_norm"):
        s.options.max_grad_norm = 1.0
    return s


def validate(spec: training_pb2.TrainingJobSpec, settings: TrainingEngineSettings,
             tokenizer=None) -> None:
    """Raise one InvalidArgument listing every bad field (images are checked separately)."""
    bad: list[FieldViolation] = []

    def check(ok: bool, field: str, description: str) -> None:
        if not ok:
            bad.append(FieldViolation(f"spec.{field}", description))

    n = len(spec.instance_images)
    check(1 <= n <= settings.max_instance_images, "instance_images",
          f"must hold 1..{settings.max_instance_images} images (3-5 recommended)")
    token = spec.identifier_token
    check(bool(token) and len(token) <= 32 and not any(c.isspace() for c in token),
          "identifier_token", "must be 1-32 characters without whitespace")
    check(bool(spec.instance_prompt.strip()), "instance_prompt", "must not be empty")
    if token and spec.instance_prompt and token not in spec.instance_prompt.split():
        bad.append(FieldViolation("spec.instance_prompt",
                                  f"must contain the identifier token {echo(token)} as a word"))
    if spec.prior_preservation.enabled:
        check(bool(spec.class_prompt.strip()), "class_prompt",
              "is required when prior preservation is on")
        pp = spec.prior_preservation
        check(0 <= pp.loss_weight <= 10, "prior_preservation.loss_weight", "must be in 0..10")
        check(1 <= pp.num_class_images <= 10000, "prior_preservation.num_class_images",
              "must be in 1..10000")
        check(1 <= pp.class_image_steps <= 150, "prior_preservation.class_image_steps",
              "must be in 1..150")
        check(0 <= pp.class_image_guidance_scale <= 30,
              "prior_preservation.class_image_guidance_scale", "must be in 0..30")
    check(spec.resolution % 8 == 0 and 64 <= spec.resolution <= 1024, "resolution",
          "must be a multiple of 8 in 64..1024")
    check(1 <= spec.max_train_steps <= 100_000, "max_train_steps", "must be in 1..100000")
    check(0 < spec.learning_rate <= 1e-2, "learning_rate", "must be in (0, 1e-2]")
    if spec.text_encoder.HasField("learning_rate"):
        check(0 < spec.text_encoder.learning_rate <= 1e-2, "text_encoder.learning_rate",
              "must be in (0, 1e-2]")
    check(0 <= spec.text_encoder.stop_at_step <= spec.max_train_steps,
          "text_encoder.stop_at_step", "must be in 0..max_train_steps")
    check(1 <= spec.lora.rank <= 256, "lora.rank", "must be in 1..256")
    check(0 <= spec.lr_warmup_steps <= spec.max_train_steps, "lr_warmup_steps",
          "must be in 0..max_train_steps")
    check(1 <= spec.train_batch_size <= 64, "train_batch_size", "must be in 1..64")
    check(1 <= spec.gradient_accumulation_steps <= 128, "gradient_accumulation_steps",
          "must be in 1..128")
    check(1 <= spec.resources.num_workers <= settings.max_workers, "resources.num_workers",
          f"must be in 1..{settings.max_workers}")
    check(spec.resources.gpus_per_worker in (0, 1), "resources.gpus_per_worker",
          "must be 0 or 1")
    check(1 <= spec.resources.cpus_per_worker <= 64, "resources.cpus_per_worker",
          "must be in 1..64")
    check(0 <= spec.checkpointing.every_n_steps, "checkpointing.every_n_steps",
          "must not be negative")
    check(1 <= spec.checkpointing.keep_last <= 100, "checkpointing.keep_last",
          "must be in 1..100")
    check(len(spec.validation_prompts) <= 8, "validation_prompts", "at most 8 prompts")
    check(spec.options.max_grad_norm >= 0, "options.max_grad_norm", "must not be negative")
    if spec.lora.HasField("alpha"):
        check(0 < spec.lora.alpha <= 1024, "lora.alpha", "must be in (0, 1024]")
    check(not spec.model_id or bool(MODEL_ID_RE.match(spec.model_id)), "model_id",
          "must be 1-63 chars of [a-z0-9-], starting with a letter")
    check(spec.seed >= 0, "seed", "must be in 0..2^63-1")
    check(spec.options.snr_gamma >= 0, "options.snr_gamma", "must not be negative")
    check(0 <= spec.options.noise_offset <= 1, "options.noise_offset", "must be in 0..1")
    if tokenizer is not None:
        # Longer prompts would be truncated in training, dropping whatever comes
        # late in them, the identifier included.
        limit = tokenizer.model_max_length
        prompts = [("instance_prompt", spec.instance_prompt), ("class_prompt", spec.class_prompt),
                   *((f"validation_prompts[{i}]", p)
                     for i, p in enumerate(spec.validation_prompts))]
        for field, prompt in prompts:
            count = len(tokenizer(prompt).input_ids)
            check(count <= limit, field, f"is {count} tokens; the limit is {limit}")
    if bad:
        raise InvalidArgument(bad)


def check_images(blobs: list[bytes], max_pixels: int) -> None:
    """Every instance image must decode, be at least 64x64 px and at most ``max_pixels``.
    The size is read from the header and checked before anything is decoded, so a
    small file that would decode to gigabytes costs nothing here (nor later, on
    every Ray worker)."""
    bad = []
    for i, data in enumerate(blobs):
        field = f"spec.instance_images[{i}]"
        try:
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                bad.append(FieldViolation(
                    field, f"is {width}x{height} px; the limit is {max_pixels} pixels"))
                continue
            image.load()
        except Exception:
            bad.append(FieldViolation(field, "is not a decodable image"))
            continue
        if min(image.size) < MIN_IMAGE_SIDE:
            bad.append(FieldViolation(
                field, f"is {image.size[0]}x{image.size[1]} px; at least "
                       f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} is needed"))
    if bad:
        raise InvalidArgument(bad)
