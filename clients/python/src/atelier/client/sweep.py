"""Hyperparameter sweeps that pick their winner by the subject scores.

    from atelier.client import TrainingClient
    from atelier.client.sweep import Sweep, load_spec

    sweep = Sweep(load_spec("spec.yaml"), {"learning_rate": [1e-6, 2e-6],
                                           "max_train_steps": [400, 800]})
    with TrainingClient("127.0.0.1:50051") as client:
        runs = sweep.submit(client)          # idempotent: a rerun finds the same jobs
        runs = sweep.wait(client, runs)
    best = sweep.best(runs, "dino")
    print(best.job.model, best.scores.dino)

Every grid point is an ordinary job. Its request id is derived from the spec and
the point, so submitting the same sweep again returns the jobs of the first
submission (finished or not) instead of starting new ones. Grid keys are
TrainingJobSpec field paths (``learning_rate``, ``lora.rank``,
``options.snr_gamma``); values are of the field's type, or strings parsed as it.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor

from atelier.client.training import FINAL_STATES, TrainingClient
from atelier.v1 import model_pb2
from atelier.v1 import training_pb2 as T

#: Scores by name; every one but drift is better when higher.
SCORES = ("dino", "clip_i", "clip_t", "drift")


def load_spec(path: str | Path) -> T.TrainingJobSpec:
    """A TrainingJobSpec from YAML or JSON (photos as ``{file: path}`` entries)."""
    from atelier.kubernetes_jobs import load_spec as read

    return read(path)


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["learning_rate=1e-6,2e-6", ...]`` as {field path: [values]}."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ValueError(f"--grid {item!r}: use FIELD=VALUE1,VALUE2")
        if key in grid:
            raise ValueError(f"--grid {key} is given twice")
        grid[key] = [v.strip() for v in values.split(",") if v.strip()]
    return grid


def _set_field(spec: T.TrainingJobSpec, path: str, value) -> None:
    message = spec
    parts = path.split(".")
    for part in parts[:-1]:
        field = message.DESCRIPTOR.fields_by_name.get(part)
        if field is None or field.message_type is None or \
                field.is_repeated:
            raise ValueError(f"{path}: {part} is not a message field of the spec")
        message = getattr(message, part)
    field = message.DESCRIPTOR.fields_by_name.get(parts[-1])
    if field is None or field.message_type is not None or \
            field.is_repeated:
        raise ValueError(f"{path} is not a scalar field of TrainingJobSpec")
    setattr(message, parts[-1], _typed(field, value, path))


def _typed(field, value, path: str):
    F = descriptor.FieldDescriptor
    if field.enum_type is not None:
        if isinstance(value, int):
            return value
        names = field.enum_type.values_by_name
        for name in (str(value), f"{_enum_prefix(field.enum_type)}{str(value).upper()}"):
            if name in names:
                return names[name].number
        raise ValueError(f"{path}: {value!r} is not a {field.enum_type.name}")
    try:
        if field.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
            return float(value)
        if field.type == F.TYPE_BOOL:
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true")
        if field.type == F.TYPE_STRING:
            return str(value)
        return int(value)
    except ValueError:
        raise ValueError(f"{path}: {value!r} is not a valid value") from None


def _enum_prefix(enum) -> str:
    names = [v.name for v in enum.values]
    prefix = names[0].removesuffix("UNSPECIFIED")
    return prefix if all(n.startswith(prefix) for n in names) else ""


@dataclass
class SweepRun:
    """One grid point: its values, the job, and the job's exported scores."""

    point: dict
    request_id: str
    job: T.TrainingJob

    @property
    def scores(self) -> model_pb2.SubjectScores | None:
        """The scores of the checkpoint the job exported (None before, or unscored)."""
        for scores in self.job.scores:
            if scores.step == self.job.exported_step and self.job.model:
                return scores
        return None


class Sweep:
    """A base spec and a grid of field values: their product is the sweep's jobs."""

    def __init__(self, spec: T.TrainingJobSpec, grid: Mapping[str, Sequence]) -> None:
        if not grid:
            raise ValueError("a sweep needs at least one grid field")
        self.spec = spec
        self.grid = {k: list(v) for k, v in grid.items()}
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"grid field {key} has no values")
        self.points = [dict(zip(self.grid, combo, strict=True))
                       for combo in itertools.product(*self.grid.values())]
        self.specs = [self._spec_at(i, p) for i, p in enumerate(self.points)]
        # Of the spec and the grid: the same sweep always has the same id.
        digest = hashlib.sha256(spec.SerializeToString(deterministic=True))
        digest.update(repr(sorted((k, [str(v) for v in vs]) for k, vs in self.grid.items()))
                      .encode())
        self.sweep_id = digest.hexdigest()[:16]

    def _spec_at(self, index: int, point: dict) -> T.TrainingJobSpec:
        spec = T.TrainingJobSpec()
        spec.CopyFrom(self.spec)
        for path, value in point.items():
            _set_field(spec, path, value)
        if self.spec.model_id:
            spec.model_id = f"{self.spec.model_id[:58]}-{index + 1}"
        return spec

    def request_id(self, index: int) -> str:
        return f"sweep-{self.sweep_id}-{index + 1}"

    def submit(self, client: TrainingClient) -> list[SweepRun]:
        """Submit every point (a rerun returns the jobs already submitted)."""
        return [SweepRun(point, self.request_id(i),
                         client.create_job(spec, request_id=self.request_id(i)))
                for i, (point, spec) in enumerate(zip(self.points, self.specs, strict=True))]

    def wait(self, client: TrainingClient, runs: list[SweepRun], *,
             on_update: Callable[[list[SweepRun]], None] | None = None,
             poll_interval_s: float = 1.0, timeout_s: float | None = None) -> list[SweepRun]:
        """Poll the jobs until all have ended; ``on_update`` sees every poll."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            for run in runs:
                if run.job.state not in FINAL_STATES:
                    run.job = client.get_job(run.job.name)
            if on_update is not None:
                on_update(runs)
            if all(run.job.state in FINAL_STATES for run in runs):
                return runs
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"sweep {self.sweep_id} did not finish in {timeout_s} s")
            time.sleep(poll_interval_s)

    @staticmethod
    def best(runs: list[SweepRun], by: str = "dino") -> SweepRun | None:
        """The succeeded run whose exported checkpoint is best by ``by`` (drift: the
        lowest); None when no run exported a scored model."""
        if by not in SCORES:
            raise ValueError(f"unknown score {by!r}; one of {', '.join(SCORES)}")
        scored = [r for r in runs if r.job.state == T.TRAINING_JOB_STATE_SUCCEEDED
                  and r.scores is not None]
        if not scored:
            return None
        sign = -1.0 if by == "drift" else 1.0
        return max(scored, key=lambda r: sign * getattr(r.scores, by))
