"""Diffusers pipelines, built one way for every service: family, class, dtype, device.

Generation serves them, training generates class priors and validation images
with them. A family is named by its pipeline class in ``model_index.json``:

- ``stable-diffusion``: SD 1.x and 2.x (StableDiffusionPipeline; a folder saved as
  an inpainting pipeline loads the same way, with its 9-channel UNet);
- ``stable-diffusion-xl``: SDXL (StableDiffusionXLPipeline);
- ``flux2-klein``: FLUX.2 [klein], base or distilled (Flux2KleinPipeline).

What each family does with its parts is in ``atelier.models.families``.

Neither the SD safety checker nor the SDXL watermarker is part of what atelier
serves, so neither is loaded. The dtype is the caller's (``runtime.pick_dtype``:
float32 on CPU, bfloat16 on CUDA); a VAE that overflows in float16 (SDXL's,
``force_upcast``) runs in float32, as the pipelines do.
"""

from __future__ import annotations

from typing import Any

from atelier.models.runtime import one_load_at_a_time

SD = "stable-diffusion"
SDXL = "stable-diffusion-xl"
FLUX2_KLEIN = "flux2-klein"
FAMILIES = (SD, SDXL, FLUX2_KLEIN)


def family_of_pipeline_class(class_name: str) -> str:
    """The family of a diffusers pipeline class name (``families.family_of_pipeline_class``;
    imported when called, so the family names above stay light to import)."""
    from atelier.models.families import family_of_pipeline_class as of_class

    return of_class(class_name)


def pipeline_class(family: str) -> type:
    """The diffusers text-to-image pipeline class of a family."""
    import diffusers

    from atelier.models.families import family_named

    return getattr(diffusers, family_named(family).pipeline_class_name)


def _extra(family: str) -> dict[str, Any]:
    if family == SDXL:
        return {"add_watermarker": False}
    if family == SD:
        return {"safety_checker": None, "requires_safety_checker": False}
    return {}


@one_load_at_a_time
def load_pipeline(path: str, *, dtype, device: str):
    """The text-to-image pipeline at ``path`` (a folder or hub id), on ``device``,
    without a progress bar. Raises ValueError for a family atelier does not serve."""
    from diffusers import DiffusionPipeline

    family = family_of_pipeline_class(DiffusionPipeline.load_config(path)["_class_name"])
    pipe = pipeline_class(family).from_pretrained(path, use_safetensors=True, dtype=dtype,
                                                  **_extra(family))
    return prepare(pipe, device)


def pipeline_from_components(family: str, **components):
    """A pipeline of ``family`` over modules already loaded (a training run's)."""
    pipe = pipeline_class(family)(**components, **_extra(family))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prepare(pipe, device: str):
    import torch

    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if pipe.vae.dtype == torch.float16 and pipe.vae.config.get("force_upcast"):
        pipe.vae.to(torch.float32)
    return pipe
