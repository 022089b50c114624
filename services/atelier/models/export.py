"""Write fine-tuned models to the object store in the manifest format.

The Training service exports through these functions, and tests use them to
build fine-tuned models without training. Weights go out as safetensors:
UNet LoRA in diffusers' ``pytorch_lora_weights.safetensors`` layout, full
UNets and trained text encoders as diffusers/transformers model folders. The manifest is written
last, so a model is never listed before its weights are complete.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from atelier.models.manifest import (
    LORA_WEIGHTS_NAME,
    MANIFEST_NAME,
    ManifestWeights,
    ModelManifest,
    model_key,
)
from atelier.storage import ObjectStore


def export_lora_model(
    store: ObjectStore,
    manifest: ModelManifest,
    unet_lora: dict[str, torch.Tensor],
    text_encoder: torch.nn.Module | None = None,
    text_encoder_2: torch.nn.Module | None = None,
) -> ModelManifest:
    """Store the denoiser's LoRA weights (peft layout, as ``get_peft_model_state_dict``
    returns; a UNet's, or klein's transformer's) and, if they trained, the text
    encoders as model folders. The file's metadata carries the rank and alpha (the
    manifest's; alpha is the rank when unset), so diffusers' own
    ``load_lora_weights`` scales it as trained."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers

    from atelier.models.families import family_named

    weights = ManifestWeights(lora=LORA_WEIGHTS_NAME, **_encoder_folders(text_encoder,
                                                                        text_encoder_2))
    manifest = manifest.model_copy(update={"kind": "lora", "weights": weights})
    family = family_named(manifest.family)
    denoiser = family.denoiser_attribute
    pipeline_class = getattr(diffusers, family.pipeline_class_name)
    layers = unet_lora if denoiser == "transformer" else \
        convert_state_dict_to_diffusers(unet_lora)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline_class.save_lora_weights(
            tmp, weight_name=LORA_WEIGHTS_NAME, safe_serialization=True,
            **{f"{denoiser}_lora_layers": layers,
               f"{denoiser}_lora_adapter_metadata": _lora_metadata(unet_lora,
                                                                   manifest.lora_alpha)})
        _save_encoders(tmp, text_encoder, text_encoder_2)
        store.upload_dir(tmp, model_key(manifest.model_id))
    return _write_manifest(store, manifest)


def _lora_metadata(unet_lora: dict[str, torch.Tensor], alpha: float | None) -> dict:
    downs = {key.removesuffix(".lora_A.weight"): t for key, t in unet_lora.items()
             if key.endswith(".lora_A.weight")}
    rank = next(iter(downs.values())).shape[0]
    return {"r": rank, "lora_alpha": alpha or rank, "target_modules": sorted(downs)}


def export_full_model(
    store: ObjectStore,
    manifest: ModelManifest,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    text_encoder_2: torch.nn.Module | None = None,
) -> ModelManifest:
    """Store a fully fine-tuned UNet (and text encoders) as model folders."""
    weights = ManifestWeights(unet="unet", **_encoder_folders(text_encoder, text_encoder_2))
    manifest = manifest.model_copy(update={"kind": "full", "weights": weights})
    with tempfile.TemporaryDirectory() as tmp:
        unet.save_pretrained(Path(tmp) / "unet", safe_serialization=True)
        _save_encoders(tmp, text_encoder, text_encoder_2)
        store.upload_dir(tmp, model_key(manifest.model_id))
    return _write_manifest(store, manifest)


ENCODER_FOLDERS = ("text_encoder", "text_encoder_2")


def _encoder_folders(*encoders) -> dict[str, str | None]:
    return {name: name if encoder is not None else None
            for name, encoder in zip(ENCODER_FOLDERS, encoders, strict=True)}


def _save_encoders(folder: str, *encoders) -> None:
    for name, encoder in zip(ENCODER_FOLDERS, encoders, strict=True):
        if encoder is not None:
            encoder.save_pretrained(Path(folder) / name, safe_serialization=True)


def _write_manifest(store: ObjectStore, manifest: ModelManifest) -> ModelManifest:
    ModelManifest.model_validate(manifest.model_dump())  # re-validate after the updates
    store.put_bytes(model_key(manifest.model_id, MANIFEST_NAME),
                    manifest.model_dump_json(indent=1).encode(), "application/json")
    return manifest
