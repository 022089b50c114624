"""Running one training job through its phases, against the object store.

PREPARING (class priors) -> TRAINING (Ray Train) -> EXPORTING -> SUCCEEDED, or
FAILED with a reason, or CANCELLED. The service and the standalone entrypoint
both call :func:`run_job`; every state change is written to the job record and
as a Watch event, so whoever watches the store sees the same job.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from atelier.kit.errors import AtelierError, NotFound
from atelier.kit.settings import StorageSettings
from atelier.kit.validation import echo
from atelier.model_export import export_full_model, export_lora_model
from atelier.model_manifest import MANIFEST_NAME, ManifestWeights, ModelManifest, model_key
from atelier.model_sources import resolve_model_ref
from atelier.pipelines import family_of_pipeline_class
from atelier.storage import ObjectStore
from atelier.training import checkpoints, evaluation, priors
from atelier.training.config import TrainingEngineSettings
from atelier.training.faults import Faults
from atelier.training.jobs import JobStore, now
from atelier.training.loop import Outcome
from atelier.training.tracking import log_export
from atelier.training.train_config import TrainConfig
from atelier.v1 import training_pb2

log = logging.getLogger("atelier.training.runner")
S = training_pb2


class RunResult(StrEnum):
    """How :func:`run_job` left a job: a terminal state, or interrupted (resumable)."""

    SUCCEEDED = "TRAINING_JOB_STATE_SUCCEEDED"
    FAILED = "TRAINING_JOB_STATE_FAILED"
    CANCELLED = "TRAINING_JOB_STATE_CANCELLED"
    INTERRUPTED = "INTERRUPTED"


_TERMINAL_RESULTS = {S.TRAINING_JOB_STATE_SUCCEEDED: RunResult.SUCCEEDED,
                     S.TRAINING_JOB_STATE_FAILED: RunResult.FAILED,
                     S.TRAINING_JOB_STATE_CANCELLED: RunResult.CANCELLED}


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
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.load_config(path, subfolder="unet")
    vae = AutoencoderKL.load_config(path, subfolder="vae")
    return BaseModelInfo(base_family(path),
                         unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1))


def describe_base_of_spec(spec: S.TrainingJobSpec, settings: TrainingEngineSettings,
                          store: ObjectStore, cache_dir: Path | None = None) -> BaseModelInfo:
    _, ref = resolve_base(spec.base_model or f"models/{settings.default_base_model}", settings)
    return describe_base(resolve_model_ref(ref, cache_dir=cache_dir, store=store))


def resolve_base(base_model: str, settings: TrainingEngineSettings) -> tuple[str, str]:
    """(base model id, reference) for a spec's base_model; NOT_FOUND when unknown."""
    name = base_model.removeprefix("models/")
    if name in settings.base_models:
        return name, settings.base_models[name]
    for model_id, ref in settings.base_models.items():
        if ref == base_model:
            return model_id, ref
    raise NotFound("model", base_model,
                   f"base model {echo(base_model)} is not one of the configured base models "
                   f"({', '.join('models/' + k for k in settings.base_models)})")


#: Whether ensure_ray() connected this process to Ray (so shutdown_ray() may disconnect it).
_ray_started_here = False


#: Makes Ray take the loopback address as this node's IP (its own switch, named for
#: the desktop platforms where it is the default), so that every daemon of an
#: embedded Ray (GCS, raylet, workers, agents) listens on loopback only.
_LOOPBACK_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def ensure_ray(settings: TrainingEngineSettings) -> None:
    """Connect to the configured Ray cluster, or start an embedded one.

    Ray has no authentication of its own worth relying on, and anyone who can
    reach its ports can run code as this service. So an embedded Ray binds
    loopback only and starts no dashboard; a cluster (``ray_address``) is the
    deployment's to secure (KubeRay with NetworkPolicies)."""
    global _ray_started_here
    address = settings.ray_address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        # Read when ray is imported (below, for the first time in this process),
        # and inherited by the daemons Ray starts.
        os.environ[_LOOPBACK_ONLY_ENV] = "0"
    import ray

    if ray.is_initialized():
        return
    kwargs = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
    if address is None:
        kwargs["num_cpus"] = settings.local_ray_cpus or os.cpu_count()
        kwargs["_node_ip_address"] = "127.0.0.1"
    ray.init(address=address, **kwargs)
    _ray_started_here = True


def shutdown_ray() -> None:
    """Disconnect from Ray if ensure_ray() connected; a local Ray stops with all its
    processes, so none outlives the service."""
    global _ray_started_here
    if _ray_started_here:
        import ray

        ray.shutdown()
        _ray_started_here = False


def set_state(jobs: JobStore, job: S.TrainingJob, state: int, reason: str = "") -> None:
    job.state = state
    if state in (S.TRAINING_JOB_STATE_FAILED,):
        job.failure_reason = reason
    if state != S.TRAINING_JOB_STATE_QUEUED and not job.HasField("start_time"):
        job.start_time.CopyFrom(now())
    if state in (S.TRAINING_JOB_STATE_SUCCEEDED, S.TRAINING_JOB_STATE_FAILED,
                 S.TRAINING_JOB_STATE_CANCELLED):
        job.end_time.CopyFrom(now())
    jobs.save(job)
    jobs.event(JobStore.id_of(job),
               state_changed=S.TrainingStateChanged(state=state, reason=reason))


def run_job(store: ObjectStore, storage: StorageSettings, settings: TrainingEngineSettings,
            cache_dir: Path, job_id: str, *, faults: Faults | None = None) -> RunResult:
    """Run (or resume) a job to its end, or to an interrupt (it stays resumable).

    ``faults`` is for tests only (see ``faults.Faults``)."""
    jobs = JobStore(store)
    job = jobs.load(job_id)
    if job.state in _TERMINAL_RESULTS:
        return _TERMINAL_RESULTS[job.state]
    jobs.clear(job_id, "interrupt")
    jobs.clear(job_id, "outcome")
    try:
        if jobs.marked(job_id, "cancel"):
            set_state(jobs, job, S.TRAINING_JOB_STATE_CANCELLED)
            return RunResult.CANCELLED
        spec = job.spec
        base_id, base_ref = resolve_base(spec.base_model, settings)
        storage_dict = storage.model_dump(mode="python")
        for secret in ("access_key", "secret_key"):
            storage_dict[secret] = getattr(storage, secret).get_secret_value()
        # Absolute paths: Ray workers do not share the driver's working directory.
        storage_dict["local_root"] = str(Path(storage.local_root).resolve())
        cache_dir = Path(cache_dir).resolve()
        resources = spec.resources
        path = resolve_model_ref(base_ref, cache_dir=cache_dir, store=store)
        train = TrainConfig.from_spec(spec, base_family(path))
        ensure_ray(settings)

        set_state(jobs, job, S.TRAINING_JOB_STATE_PREPARING)
        class_keys = _class_priors(jobs, job_id, train, base_ref, path, storage_dict, resources)

        set_state(jobs, job, S.TRAINING_JOB_STATE_TRAINING)
        config = {
            "job_id": job_id, "train": train, "storage": storage_dict,
            "cache_dir": str(cache_dir), "base_ref": base_ref, "class_keys": class_keys,
            "tracking": {"mlflow_tracking_uri": settings.mlflow_tracking_uri,
                         "mlflow_experiment": settings.mlflow_experiment,
                         "wandb": settings.wandb.model_dump()},
            "faults": faults,
            "scoring_models": {"clip": settings.clip_model, "dino": settings.dino_model},
        }
        _fit(config, resources, settings, cache_dir, job_id)
        outcome = (jobs.read_mark(job_id, "outcome") or {}).get("status")
        job = jobs.load(job_id)
        progress = jobs.read_progress(job_id) or {}
        _copy_progress(job, progress)
        copy_scores(job, evaluation.read_scores(store, job_id))  # kept when cancelled too
        if outcome == Outcome.CANCELLED or jobs.marked(job_id, "cancel"):
            set_state(jobs, job, S.TRAINING_JOB_STATE_CANCELLED)
            return RunResult.CANCELLED
        if outcome == Outcome.INTERRUPTED:
            jobs.save(job)
            return RunResult.INTERRUPTED
        if outcome != Outcome.COMPLETED:
            raise RuntimeError("training ended without reporting an outcome")

        step, scores = _checkpoint_to_export(store, job_id, train)
        failure = evaluation.gate_failure(scores.scores, train.evaluation.gate) \
            if scores is not None else None
        if failure:
            set_state(jobs, job, S.TRAINING_JOB_STATE_FAILED,
                      f"checkpoint step {step} failed the quality gate: {failure}")
            return RunResult.FAILED
        set_state(jobs, job, S.TRAINING_JOB_STATE_EXPORTING)
        model_id = spec.model_id or job_id
        _export(store, job, train, base_id, base_ref, path, model_id, step, scores)
        try:  # the model is exported: a tracker outage must not fail the job now
            log_export(store, job_id, settings.mlflow_tracking_uri,
                       model_key(model_id, MANIFEST_NAME))
        except Exception:
            log.warning("could not add the manifest to the MLflow run",
                        extra={"job": job_id}, exc_info=True)
        job.model = f"models/{model_id}"
        job.exported_step = step
        set_state(jobs, job, S.TRAINING_JOB_STATE_SUCCEEDED)
        return RunResult.SUCCEEDED
    except Exception as exc:
        reason = exc.message if isinstance(exc, AtelierError) else _reason(exc)
        log.exception("training job failed", extra={"job": job_id})
        job = jobs.load(job_id)
        set_state(jobs, job, S.TRAINING_JOB_STATE_FAILED, reason)
        return RunResult.FAILED


def _class_priors(jobs: JobStore, job_id: str, train: TrainConfig, base_ref: str, path: str,
                  storage_dict: dict, resources) -> dict[int, list[str]]:
    """Each class-image concept's class images (by concept index), generated or cached."""
    out: dict[int, list[str]] = {}
    keys, generated = [], 0
    fingerprint = None
    for index, concept in enumerate(train.concepts):
        pp = concept.prior
        if not pp.uses_class_images:
            continue
        fingerprint = fingerprint or priors.model_fingerprint(path)
        key = priors.cache_key(base_ref, fingerprint, concept.class_prompt, train.resolution,
                               pp.class_image_steps, pp.class_image_guidance_scale, train.seed)
        out[index], made = priors.ensure_class_priors(
            jobs.store, key=key, count=pp.num_class_images, model_path=path,
            prompt=concept.class_prompt, resolution=train.resolution,
            steps=pp.class_image_steps, guidance=pp.class_image_guidance_scale,
            seed=train.seed, storage=storage_dict, workers=resources.num_workers,
            cpus=resources.cpus_per_worker, gpus=resources.gpus_per_worker)
        keys.append(key)
        generated += made
    if keys:
        jobs.mark(job_id, "class-priors", {"keys": keys, "generated": generated,
                                           "count": sum(len(v) for v in out.values())})
    return out


def _checkpoint_to_export(store: ObjectStore, job_id: str, train: TrainConfig
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


def copy_scores(job: S.TrainingJob, scores: list[evaluation.StepScores]) -> None:
    del job.scores[:]
    job.scores.extend(s.to_proto() for s in scores)


def _reason(exc: BaseException) -> str:
    """A one-line failure reason without stack traces or paths. A failure of Ray's
    worker group is told by the first failing rank's own error, which is the cause."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        exc = failures[min(failures)]
        exc = getattr(exc, "cause", None) or exc  # a RayTaskError wraps the user's error
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:500]


def _copy_progress(job: S.TrainingJob, progress: dict) -> None:
    for field in ("step", "max_steps", "loss", "instance_loss", "prior_loss", "learning_rate",
                  "steps_per_second", "samples_per_second"):
        if field in progress:
            setattr(job.progress, field, progress[field])
    if progress.get("latest_checkpoint"):
        job.latest_checkpoint = progress["latest_checkpoint"]


def _fit(config: dict, resources, settings: TrainingEngineSettings, cache_dir: Path,
         job_id: str) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from atelier.training.loop import train_loop_per_worker

    use_gpu = resources.gpus_per_worker > 0
    backend = "nccl" if use_gpu else "gloo"
    per_worker = {"CPU": resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    storage_path = Path(tempfile.gettempdir()) / "atelier-ray-runs"
    torch_config = TorchConfig(backend=backend)
    if _ray_started_here and not (settings.ray_address or os.environ.get("RAY_ADDRESS")):
        # Embedded Ray: the workers form their group on loopback (process_group.py).
        from atelier.training.process_group import LoopbackTorchConfig, free_loopback_port

        torch_config = LoopbackTorchConfig(backend=backend)
        config = {**config, "loopback_group": {"backend": backend,
                                               "port": free_loopback_port()}}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        torch_config=torch_config,
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(
            storage_path=str(storage_path), name=f"{job_id}-{os.getpid()}",
            failure_config=FailureConfig(max_failures=settings.max_worker_failures)),
    )
    trainer.fit()


def _export(store: ObjectStore, job: S.TrainingJob, train: TrainConfig, base_id: str,
            base_ref: str, path: str, model_id: str, step: int,
            scores: evaluation.StepScores | None) -> None:
    """Checkpoint ``step``'s weights (or their EMA) as a model in the manifest format,
    with its scores and the subject's photos (best-of-N generation compares with them)."""
    from peft.utils import get_peft_model_state_dict

    from atelier.model_manifest import ManifestConcept, ManifestScores
    from atelier.training.models import load_models, merged_text_encoder

    job_id = JobStore.id_of(job)
    m = load_models(path, train, train.seed)
    weights = checkpoints.load_trainable(store, job_id, step)
    if train.ema.enabled and train.ema.export_ema:
        weights = {**weights, **checkpoints.load_ema_weights(store, job_id, step)}
    m.trainables.load_state_dict(weights, strict=False)
    first = train.concepts[0]
    manifest = ModelManifest(
        model_id=model_id, kind="lora" if m.lora else "full", family=train.family,
        base_model=f"models/{base_id}", base_model_source=base_ref,
        identifier_token=first.identifier_token, class_prompt=first.class_prompt,
        instance_prompt=first.instance_prompt,
        concepts=[ManifestConcept(identifier_token=c.identifier_token,
                                  instance_prompt=c.instance_prompt,
                                  class_prompt=c.class_prompt) for c in train.concepts],
        training_job=job.name, owner=job.owner, lora_rank=train.lora.rank if m.lora else None,
        lora_alpha=train.lora.alpha if m.lora else None,
        scores=ManifestScores(step=step, **scores.scores.as_dict()) if scores else None,
        subject_images=export_subject_images(store, model_id, train),
        weights=ManifestWeights(lora="x.safetensors") if m.lora
        else ManifestWeights(unet="unet"))
    encoders = {}
    for name, trained in m.trained_text_encoders().items():
        encoders[name] = merged_text_encoder(trained, path, name) if m.lora else trained
    if m.lora:
        export_lora_model(store, manifest, get_peft_model_state_dict(m.unet), **encoders)
    else:
        export_full_model(store, manifest, m.unet, **encoders)


#: Longest side of the subject photos stored with an exported model, pixels.
SUBJECT_IMAGE_SIDE = 512


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
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            path = f"subject/{ci}-{j}.png"
            store.put_bytes(model_key(model_id, path), buffer.getvalue(), "image/png")
            paths.append(path)
    return paths
