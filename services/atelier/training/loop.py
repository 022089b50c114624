"""The DreamBooth training loop that every Ray Train worker runs.

Each worker loads the base model itself (so a remote cluster needs only the
object store), builds the same trainable modules, wraps them in one DDP module
(gloo on CPU, NCCL on GPU), and resumes from the newest complete checkpoint in
the store if there is one. Every random draw is derived from (seed, step,
micro-step, rank), which makes a resumed run bit-for-bit the continuation of
the interrupted one.

Rank 0 writes progress, events and checkpoints to the store; every rank writes
its RNG state into each checkpoint. A cancel or interrupt marker in the store
stops all ranks at the next step (agreed through an all-reduce).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from atelier.kit.settings import StorageSettings
from atelier.model_sources import resolve_model_ref
from atelier.storage import open_store
from atelier.training import checkpoints
from atelier.training.data import ExampleSet, load_images, micro_batch, seeded
from atelier.training.jobs import JobStore, job_key
from atelier.training.method import batch_loss
from atelier.training.models import Models, Trainables, load_models, trainable_state
from atelier.training.train_config import Precision, TrainConfig
from atelier.v1 import training_pb2

log = logging.getLogger("atelier.training.loop")

PRECISION = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point for Ray Train's TorchTrainer (and for single-process runs)."""
    group = config.get("loopback_group")
    if group is None:  # Ray Train set the group up (a cluster), or a single process
        Worker(config).run()
        return
    import ray.train

    from atelier.training.process_group import join_loopback_group

    context = ray.train.get_context()
    join_loopback_group(group["backend"], group["port"], context.get_world_rank(),
                        context.get_world_size())
    try:
        Worker(config).run()
    finally:
        dist.destroy_process_group()


@dataclass
class Run:
    """What a run holds from setup to the end: models, modules, optimizer, data."""

    m: Models
    path: str
    module: Trainables
    model: torch.nn.Module  # the module, or its DDP wrapper
    names: list[str]  # the trainable parameters' names
    optimizer: Any
    lr_scheduler: Any
    scaler: Any
    precision: torch.dtype | None
    instance: ExampleSet | None = None
    prior: ExampleSet | None = None
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    input_ids: dict[tuple, torch.Tensor] = field(default_factory=dict)


@dataclass
class TrainState:
    """Where the run is: the step, the losses so far (checkpointed), and the numbers
    not yet read back from the device."""

    step: int = 0
    losses: list = field(default_factory=list)
    recent: list[float] = field(default_factory=list)  # the last steps' seconds
    pending: list = field(default_factory=list)  # (step, totals, grad norm, lr)
    last_event: float = 0.0


class Worker:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.spec: TrainConfig = config["train"]
        self.job_id = config["job_id"]
        self.seed = self.spec.seed
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.device = torch.device(
            f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available()
            and self.spec.gpus_per_worker > 0 else "cpu")
        self.store = open_store(StorageSettings(**config["storage"]))
        self.jobs = JobStore(self.store)

    # -- setup ------------------------------------------------------------------------------
    def _examples(self) -> tuple[ExampleSet, ExampleSet | None]:
        spec = self.spec
        instance = ExampleSet(load_images([self.store.get_bytes(k)
                                           for k in self.config["instance_keys"]]),
                              spec.instance_prompt)
        prior = None
        if spec.prior.enabled:
            prior = ExampleSet(load_images([self.store.get_bytes(k)
                                            for k in self.config["class_keys"]]),
                               spec.class_prompt)
        return instance, prior

    def run(self) -> None:
        self.train()

    def _setup(self) -> Run:
        """Models, the DDP module, optimizer, schedule and precision; resumed from the
        newest complete checkpoint when there is one."""
        spec = self.spec
        path = resolve_model_ref(self.config["base_ref"], cache_dir=self.config["cache_dir"],
                                 store=self.store, field="spec.base_model")
        m = load_models(path, spec, self.seed)
        m.vae.to(self.device)
        module = Trainables(m.unet, m.text_encoder).to(self.device)
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        te_stop = spec.text_encoder.stop_at_step
        model = module
        if self.distributed:
            model = torch.nn.parallel.DistributedDataParallel(
                module, find_unused_parameters=bool(m.train_text_encoder and te_stop))
        optimizer = self._optimizer(module, m.train_text_encoder)
        from diffusers.optimization import get_scheduler

        lr_scheduler = get_scheduler(
            spec.lr_schedule.value, optimizer,
            num_warmup_steps=spec.lr_warmup_steps, num_training_steps=spec.max_train_steps)
        precision = PRECISION.get(spec.precision)
        if precision is torch.float16 and self.device.type != "cuda":
            precision = None  # fp16 autocast needs a GPU; CPU runs fall back to fp32
        scaler = torch.amp.GradScaler("cuda") if precision is torch.float16 else None
        return Run(m=m, path=path, module=module, model=model, names=names,
                   optimizer=optimizer, lr_scheduler=lr_scheduler, scaler=scaler,
                   precision=precision)

    def _resume(self, run: Run) -> TrainState:
        state = TrainState()
        latest = checkpoints.latest_step(self.store, self.job_id)
        if latest is None:
            return state
        weights = checkpoints.load_trainable(self.store, self.job_id, latest)
        missing = set(run.names) - set(weights)
        if missing:
            raise RuntimeError(f"checkpoint step {latest} lacks {len(missing)} weights")
        run.module.load_state_dict(weights, strict=False)
        saved = checkpoints.load_into(self.store, self.job_id, latest, self.rank,
                                      optimizer=run.optimizer, lr_scheduler=run.lr_scheduler,
                                      scaler=run.scaler)
        state.step, state.losses = saved["global_step"], saved["losses"]
        if self.rank == 0:
            log.info("resumed", extra={"job": self.job_id, "step": state.step})
        return state

    def _tokens(self, run: Run) -> None:
        tokenizer = run.m.tokenizer
        prompts = {run.instance.prompt, *([run.prior.prompt] if run.prior else [])}
        run.tokens = {prompt: tokenizer(prompt, padding="max_length", truncation=True,
                                        max_length=tokenizer.model_max_length,
                                        return_tensors="pt").input_ids[0]
                      for prompt in prompts}

    def train(self) -> None:
        """The run: set up (or resume), then steps until the end, a cancel or an
        interrupt; checkpoints on the policy's steps and at the end."""
        spec = self.spec
        run = self._setup()
        state = self._resume(run)
        run.instance, run.prior = self._examples()
        self._tokens(run)
        fail_at = self.config.get("fail_once_at_step")
        started = time.perf_counter()
        last_report = time.monotonic()
        if self.rank == 0:
            from atelier.training.tracking import Tracking

            self.tracking = Tracking(self.store, self.job_id, spec,
                                     self.config.get("mlflow_tracking_uri"))
        outcome = "completed"
        run.module.train()
        if not run.m.train_text_encoder:
            run.m.text_encoder.eval()
        # How often to look for cancel/interrupt: every step on CPU; on GPUs every 10
        # steps, since the agreement between ranks costs a host sync.
        stop_check = 1 if self.device.type == "cpu" else 10
        max_steps = spec.max_train_steps
        while state.step < max_steps:
            if state.step % stop_check == 0 and self._stop_requested():
                outcome = self._stop_reason()
                break
            if fail_at is not None and state.step == fail_at and self.rank == self.world - 1 \
                    and not self.jobs.marked(self.job_id, "injected-failure"):
                self.jobs.mark(self.job_id, "injected-failure", {"step": state.step})
                os._exit(17)  # a worker process dies (test hook for FailureConfig)
            if state.step == self.config.get("hold_at_step"):
                self._hold()  # test hook: wait here until stopped
                continue
            self.train_step(run, state)
            every = spec.checkpoint_every
            checkpoint_due = (every and state.step % every == 0) or state.step == max_steps
            # Read the device's numbers about once a second (one sync), not every step.
            if checkpoint_due or time.monotonic() - last_report > 1.0:
                last_report = time.monotonic()
                self._settle(run, state)
            if checkpoint_due:
                self._checkpoint(run, state)
        if self.rank == 0:
            self.tracking.close()
            self.jobs.mark(self.job_id, "outcome", {
                "status": outcome, "step": state.step,
                "seconds": round(time.perf_counter() - started, 3)})

    def train_step(self, run: Run, state: TrainState) -> None:
        """One optimizer step: the micro-steps' forward and backward passes, clipping,
        the update and the schedule. Its numbers stay on the device (``state.pending``)."""
        spec = self.spec
        t0 = time.perf_counter()
        te_stop = spec.text_encoder.stop_at_step
        train_te_now = run.m.train_text_encoder and (te_stop == 0 or state.step < te_stop)
        accumulation = spec.gradient_accumulation_steps
        totals = torch.zeros(3, device=self.device)
        for micro in range(accumulation):
            totals = totals + self.forward_backward(run, state.step, micro, train_te_now)
        params = [p for p in run.module.parameters() if p.requires_grad and p.grad is not None]
        if run.scaler is not None:
            run.scaler.unscale_(run.optimizer)
        max_norm = spec.options.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if max_norm > 0 else \
            torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        if run.scaler is not None:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        if self.distributed:
            dist.all_reduce(totals)
            totals /= self.world
        state.step += 1
        state.recent = [*state.recent, time.perf_counter() - t0][-20:]
        state.pending.append((state.step, totals, grad_norm.detach(),
                              run.lr_scheduler.get_last_lr()[0]))

    def forward_backward(self, run: Run, step: int, micro: int,
                         train_text_encoder: bool) -> torch.Tensor:
        """One micro-batch: the DreamBooth loss (``method.batch_loss``) and its backward
        pass. Returns (loss, instance loss, prior loss) / accumulation, on the device."""
        spec = self.spec
        accumulation, per_rank = spec.gradient_accumulation_steps, spec.train_batch_size
        pixels, prompts = micro_batch(
            run.instance, run.prior, step=step, micro=micro, rank=self.rank, world=self.world,
            accumulation=accumulation, per_rank=per_rank, seed=self.seed,
            resolution=spec.resolution, random_flip=spec.options.random_flip,
            center_crop=spec.options.center_crop)
        key = tuple(prompts)
        if key not in run.input_ids:
            run.input_ids[key] = torch.stack([run.tokens[p] for p in prompts]).to(self.device)
        generator = seeded(self.seed, 1000, step, micro, self.rank, device=self.device)
        sync = micro == accumulation - 1 or not self.distributed
        context = contextlib.nullcontext() if sync else run.model.no_sync()
        autocast = torch.autocast(self.device.type, dtype=run.precision) if run.precision \
            else contextlib.nullcontext()
        with context, autocast:
            parts = run.model(
                _loss_with_text_encoder_gate(train_text_encoder),
                vae=run.m.vae, noise_scheduler=run.m.noise_scheduler,
                pixel_values=_to_device(pixels, self.device), input_ids=run.input_ids[key],
                generator=generator, num_instance=per_rank,
                prior_loss_weight=spec.prior.loss_weight if run.prior else 0.0,
                snr_gamma=spec.options.snr_gamma, noise_offset=spec.options.noise_offset)
            loss = parts.loss / accumulation
        if run.scaler is not None:
            run.scaler.scale(loss).backward()
        else:
            loss.backward()
        # Stays on the device: no host sync inside the step.
        return torch.stack([parts.loss.detach().float(), parts.instance.detach().float(),
                            parts.prior.detach().float()]) / accumulation

    # -- helpers ----------------------------------------------------------------------------
    def _optimizer(self, module: Trainables, train_te: bool):
        spec = self.spec
        lr = spec.learning_rate
        te_lr = spec.text_encoder.learning_rate or lr
        groups = [{"params": [p for p in module.unet.parameters() if p.requires_grad],
                   "lr": lr}]
        if train_te:
            groups.append({"params": [p for p in module.text_encoder.parameters()
                                      if p.requires_grad], "lr": te_lr})
        kwargs = {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}
        if spec.options.use_8bit_adam and self.device.type == "cuda":
            try:
                import bitsandbytes as bnb

                return bnb.optim.AdamW8bit(groups, **kwargs)
            except ImportError:
                log.warning("use_8bit_adam: bitsandbytes is not installed; using AdamW")
        return torch.optim.AdamW(groups, **kwargs)

    def _stop_requested(self) -> bool:
        flag = torch.zeros(1, device=self.device)
        if self.rank == 0 and (self.jobs.marked(self.job_id, "cancel")
                               or self.jobs.marked(self.job_id, "interrupt")):
            flag += 1
        if self.distributed:
            dist.all_reduce(flag)
        return bool(flag.item() > 0)

    def _hold(self) -> None:
        while not self._stop_requested():
            time.sleep(0.1)

    def _stop_reason(self) -> str:
        return "cancelled" if self.jobs.marked(self.job_id, "cancel") else "interrupted"

    def _settle(self, run: Run, state: TrainState) -> None:
        """Bring the pending steps' numbers to the host, record them, report the last."""
        pending, state.pending = state.pending, []
        if not pending:
            return
        values = torch.stack([torch.cat([t, g.reshape(1).float()]) for _, t, g, _ in pending])
        values = values.cpu().tolist()
        for row in values:
            state.losses.append(row[:3])
        if self.rank == 0:
            step, _, _, lr = pending[-1]
            self._progress(run, state, step, values[-1][:3], lr, values[-1][3])

    def _progress(self, run: Run, state: TrainState, step: int, totals, lr: float,
                  grad_norm: float) -> None:
        spec = self.spec
        max_steps, recent = spec.max_train_steps, state.recent
        steps_per_s = len(recent) / sum(recent)
        samples = spec.train_batch_size * spec.gradient_accumulation_steps * self.world * (
            2 if run.prior else 1)
        progress = {"step": step, "max_steps": max_steps, "loss": float(totals[0]),
                    "instance_loss": float(totals[1]), "prior_loss": float(totals[2]),
                    "learning_rate": lr, "grad_norm": grad_norm,
                    "steps_per_second": steps_per_s,
                    "samples_per_second": steps_per_s * samples,
                    "step_seconds": recent[-1]}
        self.jobs.write_progress(self.job_id, progress)
        self.tracking.log(step, progress)
        if time.monotonic() - state.last_event > 1.0 or step == max_steps:
            state.last_event = time.monotonic()
            self.jobs.event(self.job_id, progress=training_pb2.TrainingProgress(
                step=step, max_steps=max_steps, loss=progress["loss"],
                instance_loss=progress["instance_loss"], prior_loss=progress["prior_loss"],
                learning_rate=lr, steps_per_second=steps_per_s,
                samples_per_second=progress["samples_per_second"]))

    def _checkpoint(self, run: Run, state: TrainState) -> None:
        step = state.step
        t0 = time.perf_counter()
        if self.distributed:
            dist.barrier()
        checkpoints.save_rank_part(self.store, self.job_id, step, self.rank)
        if self.rank == 0:
            checkpoints.save_main_part(
                self.store, self.job_id, step, trainable=trainable_state(run.module, run.names),
                optimizer=run.optimizer, lr_scheduler=run.lr_scheduler, scaler=run.scaler,
                state={"global_step": step, "data_position": step, "losses": state.losses})
        if self.distributed:
            dist.barrier()
        if self.rank == 0:
            keep = self.spec.checkpoint_keep_last
            checkpoints.mark_complete(self.store, self.job_id, step, keep)
            seconds = time.perf_counter() - t0
            location = checkpoints.checkpoint_prefix(self.job_id, step)
            self.jobs.event(self.job_id, checkpoint_saved=training_pb2.CheckpointSaved(
                step=step, location=location, save_seconds=seconds))
            self.jobs.write_progress(self.job_id, {**(self.jobs.read_progress(self.job_id)
                                                      or {}),
                                                   "checkpoint_seconds": seconds,
                                                   "latest_checkpoint": location})
            self._validation_images(step, run.m)
            self.tracking.flush()

    def _validation_images(self, step: int, m) -> None:
        prompts = list(self.spec.validation_prompts)
        if not prompts:
            return
        import io

        from diffusers import DDIMScheduler

        from atelier.pipelines import SD, pipeline_from_components
        from atelier.v1 import common_pb2

        pipe = pipeline_from_components(
            SD, vae=m.vae, text_encoder=m.text_encoder, tokenizer=m.tokenizer, unet=m.unet,
            scheduler=DDIMScheduler.from_config(m.noise_scheduler.config),
            feature_extractor=None)
        was_training = m.unet.training
        m.unet.eval()
        resolution = self.spec.resolution
        with torch.no_grad():
            for i, prompt in enumerate(prompts):
                image = pipe(prompt, num_inference_steps=20, height=resolution,
                             width=resolution,
                             generator=torch.Generator().manual_seed(self.seed + i)).images[0]
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                key = job_key(self.job_id, "validation", f"step-{step:08d}-{i}.png")
                self.store.put_bytes(key, buffer.getvalue(), "image/png")
                self.jobs.event(self.job_id, validation_image=training_pb2.ValidationImageReady(
                    step=step, prompt=prompt, image=common_pb2.ObjectRef(key=key)))
        m.unet.train(was_training)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to the device without making the host wait for the GPU's queue."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def _loss_with_text_encoder_gate(train_text_encoder: bool):
    """batch_loss, with the text encoder run without gradients once it has stopped."""
    if train_text_encoder:
        return batch_loss

    def frozen_text(*, text_encoder, **kwargs):
        class NoGrad(torch.nn.Module):
            def forward(self, input_ids):
                with torch.no_grad():
                    return text_encoder(input_ids)

        return batch_loss(text_encoder=NoGrad(), **kwargs)

    return frozen_text

