"""Base models: which configured base a spec names, and what training needs to know of it.

Submission, the engine and the standalone entry point import this without the
runner (and so without Ray or the training loop).
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from pathlib import Path

from atelier.kit.errors import FailedPrecondition, NotFound
from atelier.kit.validation import echo
from atelier.models.pipelines import FLUX2_KLEIN, family_of_pipeline_class
from atelier.models.sources import resolve_model_ref
from atelier.storage import ObjectStore
from atelier.training.config import TrainingEngineSettings
from atelier.v1 import training_pb2

S = training_pb2


@dataclass(frozen=True)
class BaseModelInfo:
    """What submission needs to know of a base model."""

    family: str
    default_resolution: int
    """Its native resolution, pixels: the UNet's sample size times the VAE's factor."""


def base_family(path: str) -> str:
    """The family of the base model at ``path`` (its ``model_index.json``)."""
    from diffusers import DiffusionPipeline

    return family_of_pipeline_class(DiffusionPipeline.load_config(path)["_class_name"])


def describe_base(path: str) -> BaseModelInfo:
    """The family and native resolution of the base model at ``path`` (configs only).
    FAILED_PRECONDITION for a distilled model (klein): LoRAs train on its base."""
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel

    family = base_family(path)
    if family == FLUX2_KLEIN:
        if DiffusionPipeline.load_config(path).get("is_distilled", False):
            raise FailedPrecondition("base_model is a distilled FLUX.2 [klein] model; train "
                                     "on its base model (is_distilled false) and serve the "
                                     "LoRA on either")
        from diffusers import AutoencoderKLFlux2

        vae = AutoencoderKLFlux2.load_config(path, subfolder="vae")
        default = inspect.signature(AutoencoderKLFlux2.__init__).parameters["sample_size"]
        return BaseModelInfo(family, int(vae.get("sample_size", default.default)))
    unet = UNet2DConditionModel.load_config(path, subfolder="unet")
    vae = AutoencoderKL.load_config(path, subfolder="vae")
    return BaseModelInfo(family, unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1))


def resolve_base(base_model: str, settings: TrainingEngineSettings) -> tuple[str, str]:
    """(base model id, reference) for a spec's base_model; NOT_FOUND when unknown,
    FAILED_PRECONDITION (naming the base) for a distilled model."""
    name = base_model.removeprefix("models/")
    if name in settings.distilled_models:
        base = settings.distilled_models[name]
        raise FailedPrecondition(
            f"base_model models/{name} is a distilled model, which LoRAs are not trained "
            f"on; use base_model models/{base}: its LoRAs serve on models/{name} too")
    if name in settings.base_models:
        return name, settings.base_models[name]
    for model_id, ref in settings.base_models.items():
        if ref == base_model:
            return model_id, ref
    raise NotFound("model", base_model,
                   f"base model {echo(base_model)} is not one of the configured base models "
                   f"({', '.join('models/' + k for k in settings.base_models)})")


def base_of_spec(spec: S.TrainingJobSpec, settings: TrainingEngineSettings) -> tuple[str, str]:
    """(base model id, reference) of a spec, the configured default when it names none."""
    return resolve_base(spec.base_model or f"models/{settings.default_base_model}", settings)


def describe_base_of_spec(spec: S.TrainingJobSpec, settings: TrainingEngineSettings,
                          store: ObjectStore, cache_dir: Path | None = None) -> BaseModelInfo:
    _, ref = base_of_spec(spec, settings)
    return describe_base(resolve_model_ref(ref, cache_dir=cache_dir, store=store))


def serving_bases(base_id: str, settings: TrainingEngineSettings) -> list[str]:
    """Ids of the models a LoRA trained on ``base_id`` fits: the base, then every model
    distilled from it (``distilled_models``)."""
    return [base_id, *sorted(d for d, b in settings.distilled_models.items() if b == base_id)]


class BaseModels:
    """Each base model's tokenizer (for prompt-length checks) and ``BaseModelInfo``,
    loaded once per base and shared across submissions."""

    def __init__(self, settings: TrainingEngineSettings, cache_dir: Path | None) -> None:
        self.settings = settings
        self.cache_dir = cache_dir
        self._loaded: dict[str, tuple] = {}
        self._lock = threading.Lock()

    def of_spec(self, spec: S.TrainingJobSpec, store: ObjectStore) -> tuple:
        """(tokenizer, BaseModelInfo) of the spec's base; NOT_FOUND when unknown."""
        _, ref = base_of_spec(spec, self.settings)
        with self._lock:
            if ref in self._loaded:
                return self._loaded[ref]
        from transformers import AutoTokenizer

        path = resolve_model_ref(ref, cache_dir=self.cache_dir, store=store)
        info = describe_base(path)
        loaded = (AutoTokenizer.from_pretrained(path, subfolder="tokenizer"), info)
        with self._lock:
            return self._loaded.setdefault(ref, loaded)
