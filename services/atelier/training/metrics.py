"""Prometheus metrics of the training service (``atelier_training_*``, base units)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
