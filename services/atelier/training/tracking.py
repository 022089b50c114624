"""Experiment tracking: TensorBoard always, MLflow and Weights & Biases when configured.

Rank 0 logs every step (loss and its instance and prior terms, learning rate,
grad norm, steps/s, samples/s) as ``train/*``, each checkpoint's subject scores
as ``eval/*``, and the validation images. The hyperparameters are the job's
``TrainConfig`` flattened (``concepts.0.identifier_token``, ``lora.rank``, ...;
instance image keys left out).

* TensorBoard event files are written locally and copied to
  ``jobs/<id>/tensorboard/`` in the store at each checkpoint and at the end.
* MLflow (``training.mlflow_tracking_uri``): one run per job in the
  ``training.mlflow_experiment`` experiment; validation images are artifacts
  under ``validation/``, and after the export the service adds the model's
  manifest under ``model/`` (:func:`log_export`).
* W&B (``training.wandb.project``): one run per job, id ``atelier-<job id>``;
  validation images are logged as ``validation`` media. Offline runs are copied
  to ``jobs/<id>/wandb/`` at the end.

A resumed job keeps logging to the same MLflow and W&B runs: their ids are kept
in the job's ``tracking`` marker.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from atelier.storage import ObjectStore
from atelier.training.jobs import TRACKING, JobStore, job_key

if TYPE_CHECKING:
    from atelier.training.config import WandbSettings
    from atelier.training.worker_config import TrackingTargets

_SCALARS = ("loss", "instance_loss", "prior_loss", "learning_rate", "grad_norm",
            "steps_per_second", "samples_per_second")


def hyperparameters(train) -> dict[str, str | int | float | bool]:
    """The job's TrainConfig as flat ``name: value`` pairs (no instance image keys)."""
    values = dataclasses.asdict(train)
    for concept in values["concepts"]:
        concept.pop("images")
    return _flatten(values)


class Tracking:
    """Rank 0's trackers of one job run."""

    def __init__(self, store: ObjectStore, job_id: str, train,
                 targets: TrackingTargets) -> None:
        from tensorboardX import SummaryWriter

        self.store = store
        self.jobs = JobStore(store)
        self.job_id = job_id
        self.dir = Path(tempfile.mkdtemp(prefix=f"atelier-tb-{job_id}-"))
        self.writer = SummaryWriter(str(self.dir))
        self.writer.add_text("spec", f"```\n{train}\n```")
        params = hyperparameters(train)
        ids = self.jobs.read_mark(job_id, TRACKING) or {}
        self.mlflow = self.mlflow_run = None
        if targets.mlflow_tracking_uri:
            self.mlflow, self.mlflow_run = _mlflow_run(
                targets.mlflow_tracking_uri, targets.mlflow_experiment or "atelier",
                job_id, params, ids.get("mlflow_run_id"))
            ids["mlflow_run_id"] = self.mlflow_run
        self.wandb = None
        if targets.wandb.project:
            self.wandb = _wandb_run(targets.wandb, job_id, params)
            ids["wandb_run_id"] = self.wandb.id
        if ids:
            self.jobs.mark(job_id, TRACKING, ids)

    def log(self, step: int, progress: dict) -> None:
        values = {f"train/{n}": float(progress[n]) for n in _SCALARS if n in progress}
        self._scalars(step, values)

    def log_scores(self, step: int, scores: dict) -> None:
        """A checkpoint's subject scores, as ``eval/dino``, ``eval/clip_i``, ..."""
        self._scalars(step, {f"eval/{name}": float(v) for name, v in scores.items()
                             if name != "images"})

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        if self.mlflow is not None:
            from mlflow.entities import Metric

            stamp = int(time.time() * 1000)
            self.mlflow.log_batch(self.mlflow_run, metrics=[
                Metric(n, v, stamp, step) for n, v in values.items()])
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def log_validation_image(self, step: int, index: int, prompt: str, image) -> None:
        """One validation image (a PIL image) of checkpoint ``step``."""
        self.writer.add_image(f"validation/{index}", _chw(image), step)
        if self.mlflow is not None:
            self.mlflow.log_image(self.mlflow_run, image,
                                  artifact_file=f"validation/step-{step:08d}-{index}.png")
        if self.wandb is not None:
            import wandb

            self.wandb.log({f"validation/{index}": wandb.Image(image, caption=prompt)},
                           step=step)

    def flush(self) -> None:
        self.writer.flush()
        self.store.upload_dir(self.dir, job_key(self.job_id, "tensorboard"))

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if self.mlflow is not None:
            self.mlflow.set_terminated(self.mlflow_run)
        if self.wandb is not None:
            run_dir = Path(self.wandb.dir).parent  # .../offline-run-<time>-<id>
            offline = self.wandb.settings.mode == "offline"
            self.wandb.finish()
            if offline:
                self.store.upload_dir(run_dir, job_key(self.job_id, "wandb", run_dir.name))


def log_export(store: ObjectStore, job_id: str, mlflow_uri: str | None,
               manifest_key: str) -> None:
    """Add the exported model's manifest to the job's MLflow run (``model/``)."""
    ids = JobStore(store).read_mark(job_id, TRACKING) or {}
    if not mlflow_uri or not ids.get("mlflow_run_id"):
        return
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri)
    client.log_text(ids["mlflow_run_id"], store.get_bytes(manifest_key).decode(),
                    f"model/{manifest_key.rsplit('/', 1)[-1]}")


def _mlflow_run(uri: str, experiment: str, job_id: str, params: dict, run_id: str | None):
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient(uri)
    if run_id:
        client.update_run(run_id, status="RUNNING")
        return client, run_id
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=job_id, tags={"atelier.job": job_id})
    items = [Param(k, str(v)) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow's batch limit
        client.log_batch(run.info.run_id, params=items[start:start + 100])
    return client, run.info.run_id


def _wandb_run(config: WandbSettings, job_id: str, params: dict):
    import wandb

    directory = config.dir or tempfile.mkdtemp(prefix=f"atelier-wandb-{job_id}-")
    Path(directory).mkdir(parents=True, exist_ok=True)
    return wandb.init(project=config.project, entity=config.entity,
                      mode=config.mode, dir=directory,
                      id=f"atelier-{job_id}", name=job_id, resume="allow", config=params,
                      settings=wandb.Settings(console="off", x_disable_stats=True))


def _chw(image):
    import numpy as np

    return np.asarray(image.convert("RGB")).transpose(2, 0, 1)


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    if isinstance(value, list | tuple):
        out = {}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}{i}."))
        return out if value else {prefix.rstrip("."): ""}
    if isinstance(value, Enum):
        value = value.value
    return {prefix.rstrip("."): value}
