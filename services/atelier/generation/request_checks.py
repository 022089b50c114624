"""A request checked against the model it runs on, and its defaults filled from it.

``GenerationEngine.validate`` checks what needs no model; once the request's
model is loaded, :func:`with_model_defaults` fills the fields its family
defaults (steps, guidance) and :func:`check_for_model` refuses what this model
cannot do, each as a field violation:

- a mode the model does not take (an inpainting UNet without a mask; klein with
  an init image);
- reference images on a model without multi-reference conditioning;
- guidance (a scale above 1, a negative prompt) on a guidance-distilled model;
- a size off the model's grid (16 px for klein);
- a named scheduler on a flow-matching model (it runs its own);
- prompts longer than the text encoder's limit (klein counts its chat template).
"""

from __future__ import annotations

import dataclasses

from atelier.kit.errors import FieldViolation, InvalidArgument
from atelier.models.families.base import INPAINT


def with_model_defaults(p, info):
    """``p`` with unset steps and guidance taken from the model's family."""
    return dataclasses.replace(
        p, num_inference_steps=p.num_inference_steps or info.default_steps,
        guidance_scale=info.default_guidance if p.guidance_scale is None else p.guidance_scale)


def check_steps(p) -> None:
    """The checks that need the resolved step count."""
    bad = []
    steps = p.num_inference_steps
    if p.preview_interval < 0 or p.preview_interval > steps:
        bad.append(FieldViolation("preview_interval_steps", "must be in 0..num_inference_steps"))
    if p.strength is not None and p.init_image and 0.0 < p.strength <= 1.0 and \
            int(steps * p.strength) < 1:
        bad.append(FieldViolation("strength", f"leaves no step of {steps}: "
                                              "num_inference_steps * strength must be at least 1"))
    if bad:
        raise InvalidArgument(bad)


def check_for_model(model, p, given_guidance: bool) -> None:
    """Refuse what ``model`` cannot do (``given_guidance``: the request set a scale)."""
    info = model.info
    _check_mode(model, p)
    bad: list[FieldViolation] = []
    if p.reference_images and not info.reference_images:
        bad.append(FieldViolation("reference_images", f"{model.entry.name} ({info.family}) "
                                                      "takes no reference images"))
    if not info.guidance:
        if given_guidance and p.guidance_scale > 1.0:
            bad.append(FieldViolation(
                "guidance_scale", f"{model.entry.name} is guidance-distilled and does not "
                                  "guide: leave guidance_scale unset (or at most 1)"))
        if p.negative_prompt:
            bad.append(FieldViolation(
                "negative_prompt", f"{model.entry.name} is guidance-distilled: a negative "
                                   "prompt has no effect, leave it empty"))
    for name in ("width", "height"):
        value = getattr(p, name)
        if value and value % info.size_multiple:
            bad.append(FieldViolation(name, f"must be a multiple of {info.size_multiple} px for "
                                            f"{info.family}, got {value}"))
    if p.scheduler and model.family.prediction == "flow":
        bad.append(FieldViolation("scheduler", f"{info.family} runs its own flow-matching "
                                               "scheduler; leave scheduler empty"))
    bad.extend(_prompt_lengths(model, p))
    if bad:
        raise InvalidArgument(bad)


def _check_mode(model, p) -> None:
    info = model.info
    if p.mode in info.modes:
        return
    if info.modes == (INPAINT,):
        raise InvalidArgument.field(
            "mask_image", f"{model.entry.name} has an inpainting UNet: it needs "
                          f"init_image and mask_image (this is a {p.mode} request)")
    hint = "; give reference_images instead" if info.reference_images else ""
    raise InvalidArgument.field(
        "init_image" if p.init_image else "model",
        f"{model.entry.name} ({info.family}) takes {', '.join(info.modes)} requests, "
        f"not {p.mode}{hint}")


def _prompt_lengths(model, p) -> list[FieldViolation]:
    tokenizer = model.validation_tokenizer
    bad = []
    for name in ("prompt", "negative_prompt"):
        count, limit = model.family.prompt_token_count(tokenizer, getattr(p, name))
        if count > limit:
            bad.append(FieldViolation(name, f"is {count} tokens; the limit is {limit}"))
    return bad
