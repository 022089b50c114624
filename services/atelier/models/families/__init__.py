"""The family layer: what each model family does differently, one module per family.

- :mod:`.stable_diffusion`: SD 1.x/2.x and SDXL (UNets over spatial latents);
- :mod:`.flux2_klein`: FLUX.2 [klein] (a flow-matching transformer over packed
  tokens, with reference images).

:class:`~.base.Family` is the contract; generation's runner and output processor
call only it, so no other module knows how a family encodes prompts, lays out
latents or calls its denoiser.

Adding a family (a DiT such as Qwen-Image, Z-Image or SD3.5):

1. one module here with a ``Family`` subclass: its diffusers pipeline class name,
   ``encode_prompts``, ``initial_latents``, ``batch_conditioning`` /
   ``pad_conditioning``, ``forward``, ``set_timetable``, ``decode``, ``preview``
   and ``info``; add an instance to ``FAMILIES`` below;
2. one tiny builder in ``atelier.tiny_models`` that writes the real diffusers
   format from random weights, and its name in ``tiny_models.cache``;
3. a fidelity test against the family's diffusers pipeline, alone and in a mixed
   batch (``tests/generation/test_fidelity_*.py``).
"""

from __future__ import annotations

from atelier.models.families.base import Conditioning, Family, FamilyInfo
from atelier.models.families.flux2_klein import Flux2Klein
from atelier.models.families.stable_diffusion import StableDiffusion, StableDiffusionXL

FAMILIES: dict[str, Family] = {f.name: f for f in (StableDiffusion(), StableDiffusionXL(),
                                                    Flux2Klein())}

__all__ = ["FAMILIES", "Conditioning", "Family", "FamilyInfo", "family_named", "family_of",
           "family_of_pipeline_class"]


def family_named(name: str) -> Family:
    return FAMILIES[name]


def family_of_pipeline_class(class_name: str) -> str:
    """The family name of a diffusers pipeline class name (any of the family's
    pipelines: ``StableDiffusionInpaintPipeline`` is ``stable-diffusion``)."""
    for family in sorted(FAMILIES.values(), key=lambda f: -len(f.class_prefix)):
        if class_name.startswith(family.class_prefix):
            return family.name
    raise ValueError(f"pipeline class {class_name} is not a family atelier serves "
                     f"({', '.join(FAMILIES)})")


def family_of(pipe) -> Family:
    """The family of a loaded pipeline, by its class."""
    return FAMILIES[family_of_pipeline_class(type(pipe).__name__)]
