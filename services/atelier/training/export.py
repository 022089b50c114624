"""Exporting a finished job: which checkpoint, and writing it as a model (manifest,
weights, scores and the subject's photos) in the object store."""

from __future__ import annotations

from dataclasses import dataclass

from atelier.kit.images import encode_png
from atelier.models.manifest import LORA_WEIGHTS_NAME, ManifestWeights, ModelManifest, model_key
from atelier.storage import ObjectStore
from atelier.training import checkpoints, evaluation
from atelier.training.train_config import TrainConfig
from atelier.v1 import training_pb2

S = training_pb2
#: Longest side of the subject photos stored with an exported model, pixels.
SUBJECT_IMAGE_SIDE = 512


@dataclass(frozen=True)
class ExportTarget:
    """Where a job's model goes and what it is made from."""

    model_id: str
    base_id: str
    """The base model's id (the manifest names ``models/{base_id}``)."""
    base_ref: str
    """The base model's reference (the manifest's source)."""
    path: str
    """The base model's local folder."""
    also_fits: tuple[str, ...] = ()
    """Ids of the other models a LoRA trained on the base serves on (the models
    distilled from it: ``bases.serving_bases``)."""


def checkpoint_to_export(store: ObjectStore, job_id: str, train: TrainConfig
                         ) -> tuple[int, evaluation.StepScores | None]:
    """The checkpoint the export writes (the last, or the best by the chosen score)
    and its scores (None when the job did not score it)."""
    steps = checkpoints.complete_steps(store, job_id)
    if not steps:
        raise RuntimeError("no checkpoint to export")
    scored = evaluation.read_scores(store, job_id) if train.evaluation.enabled else []
    by = train.evaluation.export_best_by
    best = evaluation.best_step(scored, by, steps) if by is not None else None
    step = best.step if best is not None else steps[-1]
    return step, next((s for s in scored if s.step == step), None)


def export_model(store: ObjectStore, job: S.TrainingJob, train: TrainConfig,
                 target: ExportTarget, step: int,
                 scores: evaluation.StepScores | None) -> None:
    """Checkpoint ``step``'s weights (or their EMA) as a model in the manifest format,
    with its scores and the subject's photos (best-of-N generation compares with them)."""
    from peft.utils import get_peft_model_state_dict

    from atelier.models.export import export_full_model, export_lora_model
    from atelier.training.jobs import JobStore
    from atelier.training.models import load_models, merged_text_encoder

    job_id = JobStore.id_of(job)
    m = load_models(target.path, train, train.seed)
    weights = checkpoints.load_trainable(store, job_id, step)
    if train.ema.enabled and train.ema.export_ema:
        weights = {**weights, **checkpoints.load_ema_weights(store, job_id, step)}
    m.trainables.load_state_dict(weights, strict=False)
    manifest = _manifest(job, train, target, step, scores, lora=bool(m.lora),
                         subject_images=export_subject_images(store, target.model_id, train))
    encoders = {}
    for name, trained in m.trained_text_encoders().items():
        encoders[name] = merged_text_encoder(trained, target.path, name) if m.lora else trained
    if m.lora:
        export_lora_model(store, manifest, get_peft_model_state_dict(m.unet), **encoders)
    else:
        export_full_model(store, manifest, m.unet, **encoders)


def _manifest(job: S.TrainingJob, train: TrainConfig, target: ExportTarget, step: int,
              scores: evaluation.StepScores | None, *, lora: bool,
              subject_images: list[str]) -> ModelManifest:
    from atelier.models.manifest import ManifestConcept, ManifestScores

    first = train.concepts[0]
    return ModelManifest(
        model_id=target.model_id, kind="lora" if lora else "full", family=train.family,
        base_model=f"models/{target.base_id}", base_model_source=target.base_ref,
        identifier_token=first.identifier_token, class_prompt=first.class_prompt,
        instance_prompt=first.instance_prompt,
        concepts=[ManifestConcept(identifier_token=c.identifier_token,
                                  instance_prompt=c.instance_prompt,
                                  class_prompt=c.class_prompt) for c in train.concepts],
        fits_bases=[f"models/{b}" for b in target.also_fits] if lora else [],
        training_job=job.name, owner=job.owner, lora_rank=train.lora.rank if lora else None,
        lora_alpha=train.lora.alpha if lora else None,
        scores=ManifestScores(step=step, **scores.scores.as_dict()) if scores else None,
        subject_images=subject_images,
        weights=ManifestWeights(lora=LORA_WEIGHTS_NAME) if lora
        else ManifestWeights(unet="unet"))


def export_subject_images(store: ObjectStore, model_id: str, train: TrainConfig) -> list[str]:
    """Store the job's photos with the model (at most SUBJECT_IMAGE_SIDE a side, PNG),
    so they outlive the job; returns their paths relative to the model's folder."""
    import io

    from PIL import Image

    paths = []
    for ci, concept in enumerate(train.concepts):
        for j, example in enumerate(concept.images):
            image = Image.open(io.BytesIO(store.get_bytes(example.key))).convert("RGB")
            image.thumbnail((SUBJECT_IMAGE_SIDE, SUBJECT_IMAGE_SIDE))
            path = f"subject/{ci}-{j}.png"
            store.put_bytes(model_key(model_id, path), encode_png(image), "image/png")
            paths.append(path)
    return paths
