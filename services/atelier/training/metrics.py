"""Prometheus metrics of the training service (``atelier_training_*``, base units)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from atelier.models.subject_scores import Score
from atelier.v1 import training_pb2


class TrainingMetrics:
    """``atelier_training_*``: jobs by state, steps, step and checkpoint seconds, loss,
    subject scores. Per-job series exist only while the job runs."""

    def __init__(self, registry: CollectorRegistry) -> None:
        p = "atelier_training_"
        self.jobs = Gauge(p + "jobs", "Training jobs known to this service, by state.",
                          ["state"], registry=registry)
        self.steps = Counter(p + "steps_total", "Optimizer steps completed.",
                             registry=registry)
        self.step_seconds = Histogram(
            p + "step_seconds", "Duration of one optimizer step, seconds.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=registry)
        self.checkpoint_seconds = Histogram(
            p + "checkpoint_save_seconds", "Time to save a full-state checkpoint, seconds.",
            buckets=(0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300), registry=registry)
        self.loss = Gauge(p + "loss", "Current loss of running jobs.", ["job"],
                          registry=registry)
        self.subject_score = Gauge(
            p + "subject_score", "Latest subject score of running jobs (DINO, CLIP-I and "
            "CLIP-T similarities, cosine; drift, 1 - cosine).", ["job", "score"],
            registry=registry)
        self.failures = Counter(p + "job_failures_total", "Jobs that ended FAILED.",
                                registry=registry)
        for state in training_pb2.TrainingJobState.keys()[1:]:
            self.jobs.labels(state.removeprefix("TRAINING_JOB_STATE_"))

        self._seen: dict[str, tuple[int, float]] = {}  # per running job: (step, ckpt s)

    def observe_progress(self, job_id: str, progress: dict) -> None:
        """Count the steps a running job made since the last look, and set its loss and
        scores, from its ``progress.json``."""
        step = int(progress.get("step", 0))
        last_step, last_checkpoint = self._seen.get(job_id, (0, 0.0))
        if step > last_step:
            self.steps.inc(step - last_step)
            self.step_seconds.observe(float(progress.get("step_seconds", 0.0)))
        checkpoint = float(progress.get("checkpoint_seconds", 0.0))
        if checkpoint and checkpoint != last_checkpoint:
            self.checkpoint_seconds.observe(checkpoint)
        self._seen[job_id] = (max(step, last_step), checkpoint)
        self.loss.labels(job_id).set(float(progress.get("loss", 0.0)))
        for score in Score:
            if score.value in progress.get("scores", {}):
                self.subject_score.labels(job_id, score.value).set(
                    float(progress["scores"][score.value]))

    def job_stopped(self, job_id: str) -> None:
        """Drop a job's per-job series: only running jobs keep them."""
        if self._seen.pop(job_id, None) is not None:
            self.loss.remove(job_id)
        for score in Score:
            with contextlib.suppress(KeyError):
                self.subject_score.remove(job_id, score.value)

    def count_states(self, counts: dict[int, int]) -> None:
        """Set the jobs-by-state gauge (every state, zero when none)."""
        for state in training_pb2.TrainingJobState.keys()[1:]:
            value = counts.get(training_pb2.TrainingJobState.Value(state), 0)
            self.jobs.labels(state.removeprefix("TRAINING_JOB_STATE_")).set(value)
