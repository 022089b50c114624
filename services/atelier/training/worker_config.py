"""What every Ray Train worker of a job is handed: one frozen, typed config.

The runner builds it once per run; Ray pickles it to each worker. It holds only
plain data (no store client, no settings object with behaviour), so a remote
cluster needs nothing but the object store it names.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from atelier.kit.settings import StorageSettings
from atelier.training.config import TrainingEngineSettings, WandbSettings
from atelier.training.faults import Faults
from atelier.training.train_config import TrainConfig


@dataclass(frozen=True)
class TrackingTargets:
    """Where rank 0 logs the run besides TensorBoard (both off by default)."""

    mlflow_tracking_uri: str | None = None
    """MLflow tracking server or folder; None: no MLflow run."""
    mlflow_experiment: str = "atelier"
    wandb: WandbSettings = field(default_factory=WandbSettings)
    """Weights & Biases; off unless ``wandb.project`` is set."""

    @classmethod
    def of(cls, settings: TrainingEngineSettings) -> TrackingTargets:
        return cls(settings.mlflow_tracking_uri, settings.mlflow_experiment or "atelier",
                   settings.wandb)


@dataclass(frozen=True)
class LoopbackGroup:
    """An embedded Ray's workers form their process group on loopback (``process_group``)."""

    backend: str
    """``gloo`` (CPU) or ``nccl`` (GPU)."""
    port: int
    """The loopback port rank 0 listens on for the rendezvous."""


@dataclass(frozen=True)
class WorkerConfig:
    """One job run, as every worker sees it."""

    job_id: str
    train: TrainConfig
    storage: dict
    """The object store's settings (``StorageSettings`` fields, secrets as plain text,
    an absolute local root): see :func:`worker_storage`."""
    cache_dir: str
    """Where workers cache base models fetched from the store or the hub (absolute)."""
    base_ref: str
    """The base model's reference (a hub id, a path, an object-store prefix, tiny://)."""
    class_keys: dict[int, list[str]] = field(default_factory=dict)
    """Per concept index: the store keys of its class images (prior preservation)."""
    tracking: TrackingTargets = field(default_factory=TrackingTargets)
    clip_model: str = ""
    """The CLIP model of the subject scores (a reference); needed when the job scores."""
    dino_model: str = ""
    """The DINO model of the subject scores (a reference); needed when the job scores."""
    faults: Faults | None = None
    """Tests only: faults to inject (``faults.Faults``)."""
    loopback_group: LoopbackGroup | None = None
    """Set by ``ray_cluster.fit`` when the workers form their group on loopback."""

    def with_group(self, group: LoopbackGroup) -> WorkerConfig:
        return replace(self, loopback_group=group)


def worker_storage(storage: StorageSettings) -> dict:
    """The store's settings as a worker rebuilds them: secrets in plain text, and the
    local root absolute (Ray workers do not share the driver's working directory)."""
    out = storage.model_dump(mode="python")
    for secret in ("access_key", "secret_key"):
        out[secret] = getattr(storage, secret).get_secret_value()
    out["local_root"] = str(Path(storage.local_root).resolve())
    return out
