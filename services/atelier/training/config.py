"""Settings of the training service."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from atelier.kit.settings import Section, ServiceSettings
from atelier.ports import GRPC_PORTS, METRICS_PORTS


class WandbSettings(Section):
    """Weights & Biases run per job (rank 0), beside TensorBoard. The API key is
    ``WANDB_API_KEY`` in the environment (from a Secret in deploy/k8s)."""

    project: str | None = None
    """W&B project of the runs; None turns W&B off."""
    entity: str | None = None
    """W&B team or user that owns the project; None: the API key's default."""
    mode: Literal["online", "offline"] = "online"
    """``offline`` writes the run only to disk (``wandb sync`` uploads it later); the
    run folder is also copied to the job's ``wandb/`` folder in the store."""
    dir: str | None = None
    """Local folder for W&B's files; None: a temporary folder per job."""


class TrainingEngineSettings(Section):
    """The training engine: jobs, Ray, limits."""

    base_models: dict[str, str] = Field(
        default_factory=lambda: {"tiny-sd": "tiny://stable-diffusion",
                                 "tiny-sdxl": "tiny://stable-diffusion-xl",
                                 "tiny-klein-base": "tiny://flux2-klein-base"})
    """Base models jobs may train from, by id: the same ids and references as the
    generation service's ``base_models``, so an exported model names its base
    (``models/{id}``) and GenerationService can load it over that base."""
    default_base_model: str = "tiny-sd"
    """Id of the base model for jobs that name none."""
    distilled_models: dict[str, str] = Field(
        default_factory=lambda: {"tiny-klein": "tiny-klein-base"})
    """Distilled models by id, each with the id of the base (in ``base_models``) it was
    distilled from (FLUX.2 [klein]: ``klein-4b`` from ``klein-4b-base``). A job is
    trained on the base, never on a distilled model (FAILED_PRECONDITION names the
    base), and its LoRA's manifest says it fits the base and every model distilled
    from it, so generation serves it by name on either. Ids as generation's; an entry
    whose base is not in ``base_models`` is unused."""
    ray_address: str | None = None
    """Ray cluster to submit to (e.g. ``ray://raycluster-head:10001``). None
    starts a local Ray in the service process (the embedded default). The
    standard ``RAY_ADDRESS`` variable is honoured too."""
    local_ray_cpus: int | None = Field(None, ge=1)
    """CPUs of the local Ray started when no cluster is given; None: all."""
    max_concurrent_jobs: int = Field(1, ge=1, le=64)
    """Jobs that run at once; the rest wait in QUEUED. 1 because one job
    usually fills the cluster's GPUs."""
    max_instance_images: int = Field(20, ge=1, le=200)
    """Instance images per job."""
    max_instance_image_pixels: int = Field(16_000_000, ge=64 * 64)
    """Decoded width x height per instance image, checked from the header at
    submission. 16 MP covers any phone photo; every Ray worker decodes each
    image, at 4 bytes a pixel."""
    max_active_jobs_per_principal: int = Field(8, ge=1, le=10_000)
    """Unfinished (queued or running) jobs one principal may have; more is
    RESOURCE_EXHAUSTED. Admins are not limited."""
    max_workers: int = Field(8, ge=1, le=1024)
    """Upper limit of resources.num_workers."""
    max_worker_failures: int = Field(2, ge=0, le=100)
    """Times Ray Train restarts a failed worker group (from the last checkpoint)
    before the job fails."""
    mlflow_tracking_uri: str | None = None
    """Log each job's hyperparameters, metrics, validation images and exported
    manifest to this MLflow tracking server too (``http://mlflow:5000``; the
    ``tracking`` extra installs mlflow). TensorBoard event files are always
    written to the job's folder."""
    mlflow_experiment: str = "atelier"
    """MLflow experiment of the job runs (created when missing)."""
    wandb: WandbSettings = WandbSettings()
    """Weights & Biases, off unless ``wandb.project`` is set."""
    webhook_allowed_hosts: list[str] = Field(default_factory=list, max_length=256)
    """Webhook targets allowed although they resolve to loopback, private,
    link-local or reserved addresses (refused otherwise, against SSRF): host
    names (exact) or networks (``10.20.0.0/16``, ``127.0.0.1/32``). Public
    addresses are always allowed."""
    webhook_max_attempts: int = Field(6, ge=1, le=20)
    """HTTP attempts per webhook event before it is recorded as not delivered."""
    webhook_retry_first_s: float = Field(2.0, gt=0, le=600)
    """Wait after a webhook event's first failed attempt, seconds; each further wait
    doubles, up to ``webhook_retry_max_s``. 2, 4, 8, 16, 32 s covers a receiver
    restart."""
    webhook_retry_max_s: float = Field(300.0, gt=0, le=3600)
    """Longest wait between two attempts of one webhook event, seconds."""
    webhook_timeout_s: float = Field(10.0, gt=0, le=120)
    """Time one webhook POST may take (connect and answer), seconds."""
    discover_jobs_interval_s: float = Field(30.0, gt=0, le=3600)
    """How often the service lists the store for jobs it did not submit (those of
    ``atelier-train run``, a Kubernetes Job): it then reports their state in the
    metrics and delivers their webhooks. A list of all job objects, so not every
    poll."""
    poll_interval_s: float = Field(0.5, gt=0, le=30)
    """How often job progress is read from the store for metrics and Watch."""
    evaluate_subjects: bool = True
    """Whether jobs that do not say (``spec.evaluation.enabled`` unset) score their
    subject at every checkpoint: a few extra images per checkpoint on rank 0."""
    clip_model: str = "tiny://clip"
    """CLIP model of the CLIP-I and CLIP-T scores: a reference like the base models'.
    Deployments use ``openai/clip-vit-large-patch14`` (torchmetrics' CLIPScore
    default) or a store copy of it; the tiny default only proves the plumbing."""
    dino_model: str = "tiny://dino"
    """DINO ViT of the DINO and drift scores. Deployments use the paper's
    ``facebook/dino-vits16``."""
    instance_image_retention_s: float | None = Field(None, gt=0)
    """Delete a job's instance images (often faces: personal data) this many
    seconds after the job ends; checked about once a minute. None keeps them
    until the job is deleted. The job record, checkpoints and exported model
    stay (the model keeps copies of the photos, at most 512 px a side, for
    best-of-N generation, until DeleteModel); an audit log line records each
    purge."""


    @model_validator(mode="after")
    def _default_known(self) -> TrainingEngineSettings:
        if self.default_base_model not in self.base_models:
            raise ValueError(f"default_base_model {self.default_base_model!r} is not in "
                             "base_models")
        return self


class Settings(ServiceSettings):
    """Everything the training service reads at start (env prefix ``ATELIER_``)."""

    default_grpc_port: ClassVar[int] = GRPC_PORTS["training"]
    default_metrics_port: ClassVar[int] = METRICS_PORTS["training"]

    training: TrainingEngineSettings = TrainingEngineSettings()
