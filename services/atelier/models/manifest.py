"""The manifest of a fine-tuned model in the object store.

TrainingService writes it on export; GenerationService discovers and loads it.
Layout, under ``models/<model_id>/`` in the bucket::

    manifest.json                        this document
    pytorch_lora_weights.safetensors     kind "lora": UNet adapters, diffusers LoRA format
    unet/config.json, unet/*.safetensors kind "full": a diffusers UNet folder
    text_encoder/...                     if the text encoder trained (for "lora",
                                         with its adapters merged in)
    text_encoder_2/...                   SDXL: the same for the second text encoder
    subject/<concept>-<n>.png            the subject's photos (at most 512 px a side)

Weights are safetensors only; nothing is ever unpickled from the store. See
docs/model-manifest.md for the field reference and how to load an export with
plain diffusers.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MANIFEST_FORMAT = "atelier.model.v1"
MANIFEST_NAME = "manifest.json"
MODELS_PREFIX = "models/"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
MODEL_ID_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


def model_key(model_id: str, *parts: str) -> str:
    """Object key of a file of a stored model."""
    return "/".join([MODELS_PREFIX + model_id, *parts])


class ManifestWeights(BaseModel):
    """Paths of the weights, relative to the model's folder."""

    model_config = ConfigDict(extra="forbid")

    lora: str | None = None
    """kind "lora": the LoRA safetensors file."""
    unet: str | None = None
    """kind "full": the UNet folder (config.json + safetensors)."""
    text_encoder: str | None = None
    """The text-encoder folder (config.json + safetensors), if it was trained. For
    kind "lora" it holds the trained text encoder with its adapters merged."""
    text_encoder_2: str | None = None
    """SDXL: the second text encoder's folder (a CLIPTextModelWithProjection), if
    it was trained; as ``text_encoder`` otherwise."""

    @field_validator("lora")
    @classmethod
    def _safetensors(cls, value: str | None) -> str | None:
        if value is not None and not value.endswith(".safetensors"):
            raise ValueError("LoRA weights must be a .safetensors file")
        return value


class ManifestConcept(BaseModel):
    """One subject a model was trained on."""

    model_config = ConfigDict(extra="forbid")

    identifier_token: str
    instance_prompt: str = ""
    class_prompt: str = ""


class ManifestScores(BaseModel):
    """The exported checkpoint's subject scores (``atelier.models.subject_scores``)."""

    model_config = ConfigDict(extra="forbid")

    step: int = Field(ge=0)
    dino: float
    clip_i: float
    clip_t: float
    drift: float
    images: int = Field(0, ge=0)


class ModelManifest(BaseModel):
    """Everything needed to load a fine-tuned model over its base."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["atelier.model.v1"] = MANIFEST_FORMAT
    model_id: str
    """The model's id; its resource name is ``models/{model_id}``."""
    display_name: str = ""
    kind: Literal["lora", "full"]
    family: Literal["stable-diffusion", "stable-diffusion-xl", "flux2-klein"] = \
        "stable-diffusion"
    """The base's architecture family: Stable Diffusion 1.x/2.x, SDXL or FLUX.2
    [klein]. Manifests written before families were recorded are Stable Diffusion 1.x."""
    base_model: str
    """Resource name of the base model in GenerationService, e.g. ``models/tiny-sd``."""
    fits_bases: list[str] = Field(default_factory=list)
    """Other base models (resource names) a LoRA model also serves on, as an adapter
    over them: a klein LoRA trained on ``base`` fits the distilled model of the same
    size, which is how such LoRAs are commonly served."""
    base_model_source: str
    """The base's reference (Hugging Face id, store prefix, path, ``tiny://``),
    so the export can be loaded outside atelier."""
    identifier_token: str
    """The (first) subject's identifier token."""
    class_prompt: str = ""
    instance_prompt: str = ""
    concepts: list[ManifestConcept] = Field(default_factory=list)
    """Every subject of a multi-concept job (the first is the one above); empty for
    models written before concepts were recorded."""
    training_job: str = ""
    owner: str = ""
    """The principal that owns the model (its training job's owner); only it and
    admins see it. Empty: visible to every principal (models exported before
    owners were recorded)."""
    lora_rank: int | None = Field(None, ge=1)
    lora_alpha: float | None = Field(None, gt=0)
    scores: ManifestScores | None = None
    """The exported checkpoint's scores, when its job scored it."""
    subject_images: list[str] = Field(default_factory=list)
    """The subject's photos stored with the model (PNG paths relative to its folder):
    best-of-N generation ranks candidates by their likeness to them."""
    weights: ManifestWeights
    create_time: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @field_validator("subject_images")
    @classmethod
    def _relative(cls, value: list[str]) -> list[str]:
        for path in value:
            if path.startswith("/") or ".." in path.split("/"):
                raise ValueError("subject_images are paths inside the model's folder")
        return value

    @field_validator("model_id")
    @classmethod
    def _model_id(cls, value: str) -> str:
        if not MODEL_ID_RE.match(value):
            raise ValueError("model_id must be 1-63 chars of [a-z0-9-], starting with a letter")
        return value

    @model_validator(mode="after")
    def _weights_match_kind(self) -> ModelManifest:
        if self.kind == "lora" and not self.weights.lora:
            raise ValueError("a lora manifest needs weights.lora")
        if self.kind == "full" and not self.weights.unet:
            raise ValueError("a full manifest needs weights.unet")
        if self.weights.text_encoder_2 and self.family != "stable-diffusion-xl":
            raise ValueError("weights.text_encoder_2 is for stable-diffusion-xl models")
        if self.fits_bases and self.kind != "lora":
            raise ValueError("fits_bases is for lora models (a full fine-tune is its own base)")
        if self.family == "flux2-klein" and (self.kind != "lora" or self.weights.text_encoder):
            raise ValueError("flux2-klein models are LoRA adapters of the transformer")
        return self
