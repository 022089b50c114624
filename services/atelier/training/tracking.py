"""Experiment tracking: TensorBoard event files in the job's folder, and MLflow.

Rank 0 logs every step (loss and its instance and prior terms, learning rate,
grad norm, steps/s, samples/s), and each checkpoint's subject scores
(``eval/*``). TensorBoard files are written locally and
copied to ``jobs/<id>/tensorboard/`` in the store at each checkpoint and at the
end. MLflow gets the same metrics and the hyperparameters when a tracking URI
is configured (the ``mlflow`` package must then be installed).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from atelier.storage import ObjectStore
from atelier.training.jobs import job_key

_SCALARS = ("loss", "instance_loss", "prior_loss", "learning_rate", "grad_norm",
            "steps_per_second", "samples_per_second")


class Tracking:
    def __init__(self, store: ObjectStore, job_id: str, spec: dict,
                 mlflow_uri: str | None) -> None:
        from tensorboardX import SummaryWriter

        self.store = store
        self.job_id = job_id
        self.dir = Path(tempfile.mkdtemp(prefix=f"atelier-tb-{job_id}-"))
        self.writer = SummaryWriter(str(self.dir))
        self.writer.add_text("spec", f"```\n{spec}\n```")
        self.mlflow = None
        if mlflow_uri:
            import mlflow

            mlflow.set_tracking_uri(mlflow_uri)
            mlflow.start_run(run_name=job_id)
            mlflow.log_params({k: v for k, v in _flatten(spec).items()
                               if k != "instance_images"})
            self.mlflow = mlflow

    def log(self, step: int, progress: dict) -> None:
        for name in _SCALARS:
            if name in progress:
                self.writer.add_scalar(f"train/{name}", progress[name], step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({n: progress[n] for n in _SCALARS if n in progress},
                                    step=step)

    def log_scores(self, step: int, scores: dict) -> None:
        """A checkpoint's subject scores, as ``eval/dino``, ``eval/clip_i``, ..."""
        values = {name: float(v) for name, v in scores.items() if name != "images"}
        for name, value in values.items():
            self.writer.add_scalar(f"eval/{name}", value, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({f"eval_{n}": v for n, v in values.items()}, step=step)

    def flush(self) -> None:
        self.writer.flush()
        self.store.upload_dir(self.dir, job_key(self.job_id, "tensorboard"))

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}
