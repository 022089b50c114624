"""What rank 0 reports of a run: progress, checkpoint events, tracking, validation
images, subject scores and pruning. Other ranks get a :class:`NullReporter`, so the
training loop calls every report unconditionally.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING

import torch

from atelier.models.sources import resolve_model_ref
from atelier.storage import ObjectStore
from atelier.training import checkpoints
from atelier.training.jobs import OUTCOME, JobStore, job_key
from atelier.training.worker_config import WorkerConfig
from atelier.v1 import training_pb2

if TYPE_CHECKING:
    from atelier.training.loop import Run, TrainState

log = logging.getLogger("atelier.training.loop")
S = training_pb2
#: Least seconds between two progress events in the job's event log.
PROGRESS_EVENT_EVERY_S = 1.0


class NullReporter:
    """Every rank but 0: reports nothing."""

    def resumed(self, step: int) -> None: ...

    def checkpoint_skipped(self, step: int, why: str) -> None: ...

    def started(self, run: Run, state: TrainState) -> None: ...

    def progress(self, run: Run, state: TrainState, step: int, totals, lr: float,
                 grad_norm: float) -> None: ...

    def checkpoint_saved(self, run: Run, step: int, seconds: float) -> None: ...

    def finished(self, outcome: str, step: int, seconds: float) -> None: ...


class Reporter(NullReporter):
    """Rank 0: writes progress and events to the store, logs to the trackers, renders
    validation images, scores checkpoints and prunes old ones."""

    def __init__(self, config: WorkerConfig, store: ObjectStore, device: torch.device,
                 world: int) -> None:
        self.config = config
        self.spec = config.train
        self.job_id = config.job_id
        self.store = store
        self.jobs = JobStore(store)
        self.device = device
        self.world = world
        self.tracking = None
        self.evaluator = None  # when the job scores its subject
        self.latest_scores: dict | None = None
        self.last_event = 0.0

    def resumed(self, step: int) -> None:
        log.info("resumed", extra={"job": self.job_id, "step": step})

    def checkpoint_skipped(self, step: int, why: str) -> None:
        """A checkpoint failed verification before a resume."""
        location = checkpoints.checkpoint_prefix(self.job_id, step)
        log.warning("skipped a corrupt checkpoint", extra={
            "job": self.job_id, "step": step, "location": location, "reason": why})
        self.jobs.event(self.job_id, checkpoint_skipped=S.CheckpointSkipped(
            step=step, location=location, reason=why))

    def started(self, run: Run, state: TrainState) -> None:
        from atelier.training.tracking import Tracking

        self.tracking = Tracking(self.store, self.job_id, self.spec, self.config.tracking)
        self._start_evaluation(run, state)

    def progress(self, run: Run, state: TrainState, step: int, totals, lr: float,
                 grad_norm: float) -> None:
        spec = self.spec
        max_steps, recent = spec.max_train_steps, state.recent
        steps_per_s = len(recent) / sum(recent)
        samples = spec.train_batch_size * spec.gradient_accumulation_steps * self.world * (
            2 if spec.prior_enabled else 1)
        progress = {"step": step, "max_steps": max_steps, "loss": float(totals[0]),
                    "instance_loss": float(totals[1]), "prior_loss": float(totals[2]),
                    "learning_rate": lr, "grad_norm": grad_norm,
                    "steps_per_second": steps_per_s,
                    "samples_per_second": steps_per_s * samples,
                    "step_seconds": recent[-1],
                    **({"scores": self.latest_scores} if self.latest_scores else {})}
        self.jobs.write_progress(self.job_id, progress)
        self.tracking.log(step, progress)
        if time.monotonic() - self.last_event > PROGRESS_EVENT_EVERY_S or step == max_steps:
            self.last_event = time.monotonic()
            self.jobs.event(self.job_id, progress=S.TrainingProgress(
                step=step, max_steps=max_steps, loss=progress["loss"],
                instance_loss=progress["instance_loss"], prior_loss=progress["prior_loss"],
                learning_rate=lr, steps_per_second=steps_per_s,
                samples_per_second=progress["samples_per_second"]))

    def checkpoint_saved(self, run: Run, step: int, seconds: float) -> None:
        """The event and progress of a sealed checkpoint; then its validation images,
        its scores, and pruning (never the best when the export picks the best)."""
        location = checkpoints.checkpoint_prefix(self.job_id, step)
        self.jobs.event(self.job_id, checkpoint_saved=S.CheckpointSaved(
            step=step, location=location, save_seconds=seconds))
        self._update_progress(checkpoint_seconds=seconds, latest_checkpoint=location)
        self._validation_images(step, run)
        best = self._evaluate(step, run)
        checkpoints.prune(self.store, self.job_id, self.spec.checkpoint_keep_last,
                          protect=[best] if best is not None else [])
        self.tracking.flush()

    def finished(self, outcome: str, step: int, seconds: float) -> None:
        self.tracking.close()
        self.jobs.mark(self.job_id, OUTCOME, {"status": outcome, "step": step,
                                              "seconds": round(seconds, 3)})

    def _update_progress(self, **fields) -> None:
        self.jobs.write_progress(self.job_id, {**(self.jobs.read_progress(self.job_id) or {}),
                                               **fields})

    def _validation_images(self, step: int, run: Run) -> None:
        """The validation prompts with the trained weights as they are."""
        prompts = list(self.spec.validation_prompts)
        if not prompts:
            return
        from atelier.kit.images import encode_png
        from atelier.v1 import common_pb2

        resolution, seed = self.spec.resolution, self.spec.seed
        with rendering(run, self.spec, exported_weights=False) as pipe, torch.no_grad():
            for i, prompt in enumerate(prompts):
                image = pipe(prompt, num_inference_steps=20, height=resolution,
                             width=resolution,
                             generator=torch.Generator().manual_seed(seed + i)).images[0]
                key = job_key(self.job_id, "validation", f"step-{step:08d}-{i}.png")
                self.store.put_bytes(key, encode_png(image), "image/png")
                self.tracking.log_validation_image(step, i, prompt, image)
                self.jobs.event(self.job_id, validation_image=S.ValidationImageReady(
                    step=step, prompt=prompt, image=common_pb2.ObjectRef(key=key)))

    def _start_evaluation(self, run: Run, state: TrainState) -> None:
        """The scoring models; on a fresh run (whose weights are still the base's) the
        base model's class images that drift compares with; on a resumed one, the
        resumed checkpoint's scores if it has none yet."""
        spec = self.spec
        if not spec.evaluation.enabled:
            return
        from atelier.models.subject_scores import ScoringModels
        from atelier.training.evaluation import Evaluator

        refs = {"clip": self.config.clip_model, "dino": self.config.dino_model}
        paths = {name: resolve_model_ref(ref, cache_dir=self.config.cache_dir,
                                         store=self.store, field=f"training.{name}_model")
                 for name, ref in refs.items()}
        self.evaluator = Evaluator(
            self.store, self.job_id, spec.concepts, spec.evaluation,
            validation_prompts=spec.validation_prompts, resolution=spec.resolution,
            seed=spec.seed, scoring=ScoringModels(paths["clip"], paths["dino"], self.device))
        if self.evaluator.history:
            self.latest_scores = self.evaluator.history[-1].as_dict()
        if state.step == 0:
            with rendering(run, spec) as pipe:
                self.evaluator.store_base_images(pipe)
        elif state.step not in {s.step for s in self.evaluator.history}:
            # Resumed from a checkpoint that was sealed but not scored (the run stopped
            # in between): score it now, so the gate and the best pick never miss one.
            self._evaluate(state.step, run)

    def _evaluate(self, step: int, run: Run) -> int | None:
        """Score the checkpoint; report the scores. Returns the best checkpoint's step
        when the export picks the best (keep-last-K must not delete it)."""
        if self.evaluator is None:
            return None
        with rendering(run, self.spec) as pipe:
            result = self.evaluator.evaluate(step, pipe)
        self.latest_scores = result.as_dict()
        self.jobs.event(self.job_id, scores=result.to_proto())
        self._update_progress(scores=self.latest_scores)
        self.tracking.log_scores(step, result.scores.as_dict())
        best = self.evaluator.best(checkpoints.complete_steps(self.store, self.job_id))
        return best.step if best is not None else None


@contextlib.contextmanager
def rendering(run: Run, spec, exported_weights: bool = True):
    """A pipeline over the run's modules in eval mode; with ``exported_weights``, the
    weights the export would write (the EMA when the job exports it)."""
    from atelier.training.evaluation import pipeline_of

    m = run.m
    was_training = m.unet.training
    m.unet.eval()
    swap = exported_weights and run.ema is not None and spec.ema.export_ema
    if swap:
        run.ema.average.store(run.params)
        run.ema.average.copy_to(run.params)
    try:
        yield pipeline_of(m, m.noise_scheduler.config, run.embeddings)
    finally:
        if swap:
            run.ema.average.restore(run.params)
        m.unet.train(was_training)
