"""Validating a TrainingJobSpec and filling in its documented defaults.

Every check reports a field violation with the field's path (``spec.resolution``),
and all violations of a request are reported together. Nothing is stored for
a request that fails here.
"""

from __future__ import annotations

import re

from PIL import Image

from atelier.kit.errors import FieldViolation, InvalidArgument
from atelier.kit.images import decode_image
from atelier.kit.validation import echo
from atelier.models.pipelines import FLUX2_KLEIN, SD, SDXL
from atelier.training import defaults as D
from atelier.training.config import TrainingEngineSettings
from atelier.training.webhooks import target_refusal
from atelier.v1 import training_pb2

MODEL_ID_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
MIN_IMAGE_SIDE = 64
#: Image sides of a flow family are multiples of its latent patch grid, pixels.
PATCH_GRID = {FLUX2_KLEIN: 16}
#: With aspect-ratio bucketing, bucket sides (and the resolution) are multiples of this.
BUCKET_STEP = 64


def job_id_of(name: str) -> str:
    """The id in a job's resource name ``trainingJobs/{id}``; INVALID_ARGUMENT otherwise."""
    job_id = name.removeprefix("trainingJobs/")
    if not name.startswith("trainingJobs/") or not MODEL_ID_RE.match(job_id):
        raise InvalidArgument([FieldViolation("name", "must look like trainingJobs/{id}")])
    return job_id


def concepts_of(spec: training_pb2.TrainingJobSpec) -> list[training_pb2.Concept]:
    """The job's concepts: ``spec.concepts``, or the one concept of the top-level fields."""
    if spec.concepts:
        return list(spec.concepts)
    concept = training_pb2.Concept(identifier_token=spec.identifier_token,
                                   instance_prompt=spec.instance_prompt,
                                   class_prompt=spec.class_prompt)
    concept.prior_preservation.CopyFrom(spec.prior_preservation)
    for image in spec.instance_images:
        concept.images.add(image=image)
    return [concept]


def concept_fields(spec: training_pb2.TrainingJobSpec, index: int) -> dict[str, str]:
    """Field paths (under ``spec.``) of concept ``index``'s parts, for violations."""
    if spec.concepts:
        at = f"concepts[{index}]."
        return {"token": at + "identifier_token", "prompt": at + "instance_prompt",
                "class": at + "class_prompt", "prior": at + "prior_preservation",
                "images": at + "images", "image": at + "images[{j}].image",
                "caption": at + "images[{j}].caption", "mask": at + "images[{j}].mask"}
    return {"token": "identifier_token", "prompt": "instance_prompt", "class": "class_prompt",
            "prior": "prior_preservation", "images": "instance_images",
            "image": "instance_images[{j}]", "caption": "instance_images[{j}]",
            "mask": "instance_images[{j}]"}


def _prior_defaults(pp: training_pb2.PriorPreservation, family: str) -> None:
    steps, guidance = D.sampling(family)
    if not pp.HasField("loss_weight"):
        pp.loss_weight = D.PRIOR_LOSS_WEIGHT
    pp.num_class_images = pp.num_class_images or D.NUM_CLASS_IMAGES
    pp.class_image_steps = pp.class_image_steps or steps
    if not pp.HasField("class_image_guidance_scale"):
        pp.class_image_guidance_scale = guidance
    if pp.source == training_pb2.PRIOR_SOURCE_UNSPECIFIED:
        pp.source = D.PRIOR_SOURCE


def apply_defaults(spec: training_pb2.TrainingJobSpec, settings: TrainingEngineSettings,
                   default_resolution: int, seed: int,
                   family: str = SD) -> training_pb2.TrainingJobSpec:
    """A copy with every unset field at its documented default (``defaults.py``) for a
    base of ``family``."""
    s = training_pb2.TrainingJobSpec()
    s.CopyFrom(spec)
    s.base_model = s.base_model or f"models/{settings.default_base_model}"
    for section in (s.prior_preservation, s.text_encoder, s.lora, s.resources, s.checkpointing,
                    s.options, s.text_encoder_2, s.ema):
        section.SetInParent()  # present in the stored record even when all defaults
    if not s.concepts:
        _prior_defaults(s.prior_preservation, family)
    for concept in s.concepts:
        concept.prior_preservation.SetInParent()
        _prior_defaults(concept.prior_preservation, family)
    if not s.ema.HasField("decay"):
        s.ema.decay = D.EMA_DECAY
    if s.ema.export_weights == training_pb2.EXPORT_WEIGHTS_UNSPECIFIED:
        s.ema.export_weights = D.export_weights(s.ema.enabled)
    s.method = s.method or D.METHOD
    s.lora.rank = s.lora.rank or D.LORA_RANK
    s.resolution = s.resolution or default_resolution
    s.max_train_steps = s.max_train_steps or D.MAX_TRAIN_STEPS
    if not s.HasField("learning_rate"):
        s.learning_rate = D.LEARNING_RATE[s.method]
    s.lr_schedule = s.lr_schedule or D.LR_SCHEDULE
    s.train_batch_size = s.train_batch_size or D.TRAIN_BATCH_SIZE
    s.gradient_accumulation_steps = s.gradient_accumulation_steps or \
        D.GRADIENT_ACCUMULATION_STEPS
    s.mixed_precision = s.mixed_precision or D.mixed_precision(s.resources.gpus_per_worker)
    if not s.HasField("seed"):
        s.seed = seed
    s.resources.num_workers = s.resources.num_workers or D.NUM_WORKERS
    s.resources.cpus_per_worker = s.resources.cpus_per_worker or D.CPUS_PER_WORKER
    if s.checkpointing.every_n_steps == 0 and not spec.HasField("checkpointing"):
        s.checkpointing.every_n_steps = D.CHECKPOINT_EVERY
    s.checkpointing.keep_last = s.checkpointing.keep_last or D.CHECKPOINT_KEEP_LAST
    if not s.options.HasField("max_grad_norm"):
        s.options.max_grad_norm = D.MAX_GRAD_NORM
    _evaluation_defaults(s.evaluation, settings, family)
    return s


def _evaluation_defaults(e: training_pb2.SubjectEvaluation,
                         settings: TrainingEngineSettings, family: str) -> None:
    steps, guidance = D.sampling(family)
    e.SetInParent()
    if not e.HasField("enabled"):
        e.enabled = settings.evaluate_subjects
    e.images_per_prompt = e.images_per_prompt or D.EVAL_IMAGES_PER_PROMPT
    e.num_inference_steps = e.num_inference_steps or steps
    if not e.HasField("guidance_scale"):
        e.guidance_scale = guidance


#: Ranges of the quality gate's thresholds (cosines; drift is 1 - cosine).
_GATE_RANGES = {"min_dino": (-1, 1), "min_clip_i": (-1, 1), "min_clip_t": (-1, 1),
                "max_drift": (0, 2)}


def _check_evaluation(spec: training_pb2.TrainingJobSpec, check) -> None:
    e = spec.evaluation
    tokens = [c.identifier_token for c in concepts_of(spec)]
    check(len(e.prompts) <= 16, "evaluation.prompts", "at most 16 prompts")
    for i, prompt in enumerate(e.prompts):
        check(any(t and t in prompt.split() for t in tokens), f"evaluation.prompts[{i}]",
              "must contain a concept's identifier token as a word")
    check(1 <= e.images_per_prompt <= 8, "evaluation.images_per_prompt", "must be in 1..8")
    check(1 <= e.num_inference_steps <= 150, "evaluation.num_inference_steps",
          "must be in 1..150")
    check(0 <= e.guidance_scale <= 30, "evaluation.guidance_scale", "must be in 0..30")
    check(len(e.class_noun) <= 64, "evaluation.class_noun", "at most 64 characters")
    check(e.export_best_by in training_pb2.SubjectScore.values(), "evaluation.export_best_by",
          "is not a SubjectScore")
    gate = e.quality_gate
    for name, (low, high) in _GATE_RANGES.items():
        if gate.HasField(name):
            check(low <= getattr(gate, name) <= high, f"evaluation.quality_gate.{name}",
                  f"must be in {low}..{high}")
    if not e.enabled:
        check(not gate.ListFields(), "evaluation.quality_gate",
              "needs evaluation.enabled (the gate checks the scores)")
        check(not e.export_best_by, "evaluation.export_best_by",
              "needs evaluation.enabled (the best checkpoint is picked by its scores)")


def _check_webhook(hook: training_pb2.Webhook, settings: TrainingEngineSettings,
                   check) -> None:
    if not hook.url:
        check(not hook.events, "webhook.events", "needs webhook.url")
        return
    refusal = target_refusal(hook.url, settings.webhook_allowed_hosts)
    check(refusal is None, "webhook.url", refusal or "")
    for i, event in enumerate(hook.events):
        check(event in training_pb2.WebhookEvent.values() and event != 0,
              f"webhook.events[{i}]", "is not a WebhookEvent")


def validate(spec: training_pb2.TrainingJobSpec, settings: TrainingEngineSettings,
             tokenizer=None, family: str = SD) -> None:
    """Raise one InvalidArgument listing every bad field (images are checked separately).
    ``family`` is the base model's."""
    bad: list[FieldViolation] = []

    def check(ok: bool, field: str, description: str) -> None:
        if not ok:
            bad.append(FieldViolation(f"spec.{field}", description))

    _check_concepts(spec, settings, bad)
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
    if spec.options.aspect_ratio_bucketing:
        check(spec.resolution % BUCKET_STEP == 0, "resolution",
              f"must be a multiple of {BUCKET_STEP} with aspect_ratio_bucketing (the bucket "
              "budget is resolution x resolution pixels)")
    check(0 <= spec.options.masked_loss_outside_weight <= 1,
          "options.masked_loss_outside_weight", "must be in 0..1")
    check(0 < spec.ema.decay < 1, "ema.decay", "must be in (0, 1)")
    check(0 <= spec.ema.start_step <= spec.max_train_steps, "ema.start_step",
          "must be in 0..max_train_steps")
    te2 = spec.text_encoder_2
    if family != SDXL:
        check(not te2.enabled, "text_encoder_2.enabled",
              "is only for stable-diffusion-xl base models; this base is " + family)
    if te2.HasField("learning_rate"):
        check(0 < te2.learning_rate <= 1e-2, "text_encoder_2.learning_rate",
              "must be in (0, 1e-2]")
    check(0 <= te2.stop_at_step <= spec.max_train_steps, "text_encoder_2.stop_at_step",
          "must be in 0..max_train_steps")
    _check_evaluation(spec, check)
    _check_webhook(spec.webhook, settings, check)
    check(spec.options.snr_gamma >= 0, "options.snr_gamma", "must not be negative")
    check(0 <= spec.options.noise_offset <= 1, "options.noise_offset", "must be in 0..1")
    _check_for_family(spec, family, check)
    if tokenizer is not None:
        _check_prompt_lengths(spec, tokenizer, check, family)
    if bad:
        raise InvalidArgument(bad)


def _check_for_family(spec: training_pb2.TrainingJobSpec, family: str, check) -> None:
    """What only some families take: the flow-matching settings on a flow base; a
    full fine-tune, text-encoder training, min-SNR and offset noise on SD and SDXL."""
    from atelier.models.families import family_named

    o = spec.options
    if family_named(family).prediction != "flow":
        check(not o.HasField("flow_matching"), "options.flow_matching",
              f"is for flow-matching base models (flux2-klein); this base is {family}")
        return
    step = PATCH_GRID[family]
    check(spec.resolution % step == 0, "resolution",
          f"must be a multiple of {step} on a {family} base (its latent patch grid)")
    sd_only = f"is for stable-diffusion bases; this base is {family}"
    check(spec.method != training_pb2.FINE_TUNE_METHOD_FULL, "method",
          f"FULL {sd_only} (a {family} job trains LoRA adapters)")
    check(not spec.text_encoder.enabled, "text_encoder.enabled",
          f"{sd_only} (its text encoder stays frozen)")
    check(o.snr_gamma == 0, "options.snr_gamma",
          f"{sd_only}; use options.flow_matching.loss_weighting")
    check(o.noise_offset == 0, "options.noise_offset", sd_only)
    f = o.flow_matching
    if f.HasField("logit_std"):
        check(f.logit_std > 0, "options.flow_matching.logit_std", "must be positive")
    low = f.min_sigma if f.HasField("min_sigma") else D.MIN_SIGMA
    high = f.max_sigma if f.HasField("max_sigma") else D.MAX_SIGMA
    check(0 <= low < 1, "options.flow_matching.min_sigma", "must be in [0, 1)")
    check(0 < high <= 1, "options.flow_matching.max_sigma", "must be in (0, 1]")
    check(low < high, "options.flow_matching.max_sigma",
          f"must be above min_sigma ({low:g})")


def _check_prompt_lengths(spec: training_pb2.TrainingJobSpec, tokenizer, check,
                          family: str = SD) -> None:
    """Every prompt within the encoder's length: longer ones would be truncated in
    training, dropping whatever comes late in them, the identifier included."""
    from atelier.models.families import family_named

    prompts = [(f"validation_prompts[{i}]", p) for i, p in enumerate(spec.validation_prompts)]
    prompts += [(f"evaluation.prompts[{i}]", p) for i, p in enumerate(spec.evaluation.prompts)]
    for ci, concept in enumerate(concepts_of(spec)):
        names = concept_fields(spec, ci)
        prompts += [(names["prompt"], concept.instance_prompt),
                    (names["class"], concept.class_prompt),
                    *((names["caption"].format(j=j), image.caption)
                      for j, image in enumerate(concept.images) if image.caption)]
    for field, prompt in prompts:
        count, limit = family_named(family).prompt_token_count(tokenizer, prompt)
        check(count <= limit, field, f"is {count} tokens; the limit is {limit}")


def _check_concepts(spec: training_pb2.TrainingJobSpec, settings: TrainingEngineSettings,
                    bad: list[FieldViolation]) -> None:
    """The concepts' identifiers, images, prompts, captions and priors."""
    def check(ok: bool, field: str, description: str) -> None:
        if not ok:
            bad.append(FieldViolation(f"spec.{field}", description))

    if spec.concepts:
        legacy = [name for name in ("instance_images", "identifier_token", "instance_prompt",
                                    "class_prompt") if getattr(spec, name)]
        if spec.prior_preservation.enabled:
            legacy.append("prior_preservation")
        for name in legacy:
            check(False, name, "must be unset when concepts are given (set it per concept)")
    concepts = concepts_of(spec)
    total = sum(len(c.images) for c in concepts)
    check(total <= settings.max_instance_images, "concepts" if spec.concepts
          else "instance_images",
          f"must hold at most {settings.max_instance_images} images in all")
    tokens = [c.identifier_token for c in concepts]
    if len(set(tokens)) != len(tokens):
        check(False, "concepts", "identifier tokens must differ between concepts")
    for ci, concept in enumerate(concepts):
        names = concept_fields(spec, ci)
        check(len(concept.images) >= 1, names["images"],
              "must hold at least one image (3-5 recommended)")
        token = concept.identifier_token
        check(bool(token) and len(token) <= 32 and not any(c.isspace() for c in token),
              names["token"], "must be 1-32 characters without whitespace")
        uncaptioned = [image for image in concept.images if not image.caption] or \
            not concept.images
        if uncaptioned:
            check(bool(concept.instance_prompt.strip()), names["prompt"], "must not be empty")
        for field, prompt in [(names["prompt"], concept.instance_prompt),
                              *((names["caption"].format(j=j), image.caption)
                                for j, image in enumerate(concept.images) if image.caption)]:
            if token and prompt and token not in prompt.split():
                check(False, field, f"must contain the identifier token {echo(token)} as a word")
        for j, image in enumerate(concept.images):
            if image.mask_from_alpha and image.HasField("mask"):
                check(False, names["mask"].format(j=j), "set mask or mask_from_alpha, not both")
        pp = concept.prior_preservation
        if pp.enabled:
            prior = names["prior"]
            check(bool(concept.class_prompt.strip()), names["class"],
                  "is required when prior preservation is on")
            check(0 <= pp.loss_weight <= 10, f"{prior}.loss_weight", "must be in 0..10")
            check(1 <= pp.num_class_images <= 10000, f"{prior}.num_class_images",
                  "must be in 1..10000")
            check(1 <= pp.class_image_steps <= 150, f"{prior}.class_image_steps",
                  "must be in 1..150")
            check(0 <= pp.class_image_guidance_scale <= 30,
                  f"{prior}.class_image_guidance_scale", "must be in 0..30")


def check_images(blobs: list[tuple[str, bytes]], max_pixels: int) -> list[Image.Image | None]:
    """Every instance image (``(field, bytes)``) must decode, be at least 64x64 px and at
    most ``max_pixels``. The size is read from the header and checked before anything
    is decoded, so a small file that would decode to gigabytes costs nothing here (nor
    later, on every Ray worker). Returns the decoded images (None for bad ones)."""
    bad = []
    images: list[Image.Image | None] = []
    for field, data in blobs:
        try:
            images.append(decode_image(data, field, max_bytes=len(data) or 1,
                                       max_pixels=max_pixels, min_side=MIN_IMAGE_SIDE,
                                       mode=None))
        except InvalidArgument as exc:
            images.append(None)
            bad.extend(exc.violations)
    if bad:
        raise InvalidArgument(bad)
    return images


def check_masks(masks: list[tuple[str, bytes | None, bool, Image.Image]],
                max_pixels: int) -> None:
    """Each mask (``(field, bytes or None, from alpha, its image)``) must decode and have
    its image's size; an alpha mask needs an image with an alpha channel."""
    bad = []
    for field, data, from_alpha, image in masks:
        if from_alpha:
            if "A" not in image.getbands() and "transparency" not in image.info:
                bad.append(FieldViolation(field, "mask_from_alpha: the image has no alpha "
                                                 "channel"))
            continue
        try:
            mask = decode_image(data or b"", field, max_bytes=len(data or b"") or 1,
                                max_pixels=max_pixels, mode=None)
        except InvalidArgument as exc:
            bad.extend(exc.violations)
            continue
        if mask.size != image.size:
            bad.append(FieldViolation(
                field, f"is {mask.size[0]}x{mask.size[1]} px; its image is "
                       f"{image.size[0]}x{image.size[1]}"))
    if bad:
        raise InvalidArgument(bad)
