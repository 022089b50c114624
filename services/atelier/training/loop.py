"""The DreamBooth training loop that every Ray Train worker runs.

Each worker loads the base model itself (so a remote cluster needs only the
object store), builds the same trainable modules, wraps them in one DDP module
(gloo on CPU, NCCL on GPU), and resumes from the newest complete checkpoint in
the store if there is one. Every random draw is derived from (seed, step,
micro-step, rank), which makes a resumed run bit-for-bit the continuation of
the interrupted one.

Rank 0 writes the checkpoints' shared part and reports (progress, events,
tracking, validation, scores: ``reporting.Reporter``); every rank writes its RNG
state into each checkpoint. A cancel or interrupt marker in the store
stops all ranks at the next step (agreed through an all-reduce).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
import torch.distributed as dist

from atelier.kit.settings import StorageSettings
from atelier.models.families import family_named
from atelier.models.pipelines import SDXL
from atelier.models.sources import resolve_model_ref
from atelier.storage import open_store
from atelier.training import checkpoints, latent_cache, text_cache
from atelier.training import prompts as prompts_of_run
from atelier.training.data import Examples, seeded
from atelier.training.ema import Ema
from atelier.training.jobs import CANCEL, INTERRUPT, JobStore
from atelier.training.method import batch_loss
from atelier.training.models import (
    Models,
    base_model,
    load_models,
    to_device,
    trainable_state,
)
from atelier.training.reporting import NullReporter, Reporter
from atelier.training.train_config import Precision, TrainConfig
from atelier.training.worker_config import WorkerConfig

log = logging.getLogger("atelier.training.loop")

PRECISION = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


class Outcome(StrEnum):
    """How the loop ended (rank 0 records it in the ``outcome`` marker)."""

    COMPLETED = "completed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


def train_loop_per_worker(loop_config: dict[str, WorkerConfig]) -> None:
    """Entry point for Ray Train's TorchTrainer: ``{"worker": WorkerConfig}``."""
    config = loop_config["worker"]
    group = config.loopback_group
    if group is None:  # Ray Train set the group up (a cluster), or a single process
        Worker(config).train()
        return
    import ray.train

    from atelier.training.process_group import join_loopback_group

    context = ray.train.get_context()
    join_loopback_group(group.backend, group.port, context.get_world_rank(),
                        context.get_world_size())
    try:
        Worker(config).train()
    finally:
        dist.destroy_process_group()


@dataclass
class Run:
    """What a run holds from setup to the end: models, modules, optimizer, data."""

    m: Models
    path: str
    model: torch.nn.Module  # m.trainables, or its DDP wrapper
    names: list[str]  # the trainable parameters' names
    params: list[torch.nn.Parameter]  # ...and the parameters, in that order
    optimizer: Any
    lr_scheduler: Any
    scaler: Any
    precision: torch.dtype | None
    ema: Ema | None = None  # rank 0 only
    examples: Examples | None = None
    token_ids: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    """Per prompt: its token ids for each text encoder."""
    embeddings: dict | None = None
    """Per prompt: its (hidden, pooled) conditioning, when no text encoder trains."""
    latents: latent_cache.LatentCache | None = None

    @property
    def module(self):
        return self.m.trainables


@dataclass
class TrainState:
    """Where the run is: the step, the losses so far (checkpointed), and the numbers
    not yet read back from the device."""

    step: int = 0
    losses: list = field(default_factory=list)
    recent: list[float] = field(default_factory=list)  # the last steps' seconds
    pending: list = field(default_factory=list)  # (step, totals, grad norm, lr)


class Worker:
    """One rank of a job run: set up, resume, then ``train`` → ``train_step`` →
    ``forward_backward``; rank 0's side effects go through ``self.reporter``."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.spec: TrainConfig = config.train
        self.job_id = config.job_id
        self.seed = self.spec.seed
        self.faults = config.faults  # tests only: faults.Faults
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.device = torch.device(
            f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available()
            and self.spec.gpus_per_worker > 0 else "cpu")
        self.store = open_store(StorageSettings(**config.storage))
        self.jobs = JobStore(self.store)
        self.reporter = Reporter(config, self.store, self.device, self.world) \
            if self.rank == 0 else NullReporter()

    # -- setup ------------------------------------------------------------------------------
    def _setup(self) -> Run:
        """Models, the DDP module, optimizer, schedule, precision and EMA."""
        spec = self.spec
        path = resolve_model_ref(self.config.base_ref, cache_dir=self.config.cache_dir,
                                 store=self.store, field="spec.base_model")
        m = load_models(path, spec, self.seed)
        to_device(m, self.device)
        module = m.trainables
        trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        names, params = [n for n, _ in trainable], [p for _, p in trainable]
        model = module
        if self.distributed:
            model = torch.nn.parallel.DistributedDataParallel(
                module, find_unused_parameters=_has_unused_parameters(m, spec))
        optimizer = build_optimizer(m, spec, self.device)
        from diffusers.optimization import get_scheduler

        lr_scheduler = get_scheduler(
            spec.lr_schedule.value, optimizer,
            num_warmup_steps=spec.lr_warmup_steps, num_training_steps=spec.max_train_steps)
        precision = PRECISION.get(spec.precision)
        if precision is torch.float16 and self.device.type != "cuda":
            precision = None  # fp16 autocast needs a GPU; CPU runs fall back to fp32
        scaler = torch.amp.GradScaler("cuda") if precision is torch.float16 else None
        ema = Ema(names, params, spec.ema) if spec.ema.enabled and self.rank == 0 else None
        return Run(m=m, path=path, model=model, names=names, params=params, optimizer=optimizer,
                   lr_scheduler=lr_scheduler, scaler=scaler, precision=precision, ema=ema)

    def _resume(self, run: Run) -> TrainState:
        """The newest intact checkpoint's weights, optimizer, schedule, RNG and EMA."""
        state = TrainState()
        latest = checkpoints.latest_intact(self.store, self.job_id,
                                           self.reporter.checkpoint_skipped)
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
        if run.ema is not None:
            run.ema.load(checkpoints.load_ema_weights(self.store, self.job_id, latest),
                         saved["ema"])
        self.reporter.resumed(state.step)
        return state

    def _data(self, run: Run) -> None:
        """Decode the examples; tokenize every prompt; cache the text conditioning when
        no text encoder trains, and the latents when the job asks for it."""
        spec = self.spec
        run.examples = Examples.load(spec, self.store.get_bytes, self.config.class_keys)
        prompts = sorted({i.prompt for i in run.examples.instances}
                         | {c.class_prompt for c in spec.concepts if c.prior.enabled})
        barrier = dist.barrier if self.distributed else (lambda: None)
        if family_named(spec.family).text_encoders_train:
            run.token_ids = prompts_of_run.token_ids(run.m.tokenizers, prompts)
            if not run.m.any_text_encoder_trains:
                run.embeddings = prompts_of_run.frozen_conditioning(
                    spec.family, run.m.text_encoders, run.token_ids, self.device)
        else:  # encoded once per job, with what rank 0 renders; the encoder then goes
            run.embeddings = text_cache.build_or_load(
                self.store, self.job_id, spec.family, set(prompts) | prompts_of_run.rendered(spec),
                base_ref=self.config.base_ref, model_path=run.path,
                tokenizer=run.m.tokenizers[0], device=self.device, rank=self.rank,
                barrier=barrier)
        if spec.options.cache_latents:
            run.latents = latent_cache.build_or_load(
                self.store, self.job_id, run.examples,
                latent_cache.fingerprint(self.config.base_ref, run.examples,
                                         self.config.class_keys),
                vae=run.m.vae, device=self.device, rank=self.rank, world=self.world,
                barrier=barrier)

    def train(self) -> None:
        """The run: set up (or resume), then steps until the end, a cancel or an
        interrupt; checkpoints on the policy's steps and at the end."""
        spec = self.spec
        run = self._setup()
        state = self._resume(run)
        self._data(run)
        started = time.perf_counter()
        last_report = time.monotonic()
        self.reporter.started(run, state)
        outcome = Outcome.COMPLETED
        run.module.train()
        for encoder, trains in zip(run.m.text_encoders, run.m.train_text_encoders,
                                   strict=True):
            if not trains:
                encoder.eval()
        # How often to look for cancel/interrupt: every step on CPU; on GPUs every 10
        # steps, since the agreement between ranks costs a host sync.
        stop_check = 1 if self.device.type == "cpu" else 10
        max_steps = spec.max_train_steps
        while state.step < max_steps:
            if state.step % stop_check == 0 and self.stop_requested():
                outcome = Outcome.CANCELLED if self.jobs.marked(self.job_id, CANCEL) \
                    else Outcome.INTERRUPTED
                break
            if self.faults is not None and self.faults.before_step(self, state.step):
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
        self.reporter.finished(outcome.value, state.step, time.perf_counter() - started)

    def train_step(self, run: Run, state: TrainState) -> None:
        """One optimizer step: the micro-steps' forward and backward passes, clipping,
        the update and the schedule. Its numbers stay on the device (``state.pending``)."""
        spec = self.spec
        t0 = time.perf_counter()
        trains_now = [trains and (te.stop_at_step == 0 or state.step < te.stop_at_step)
                      for trains, te in zip(run.m.train_text_encoders,
                                            (spec.text_encoder, spec.text_encoder_2),
                                            strict=False)]
        accumulation = spec.gradient_accumulation_steps
        totals = torch.zeros(3, device=self.device)
        for micro in range(accumulation):
            totals = totals + self.forward_backward(run, state.step, micro, trains_now)
        params = [p for p in run.params if p.grad is not None]
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
        if run.ema is not None:
            run.ema.step(run.params)
        if self.distributed:
            dist.all_reduce(totals)
            totals /= self.world
        state.step += 1
        state.recent = [*state.recent, time.perf_counter() - t0][-20:]
        state.pending.append((state.step, totals, grad_norm.detach(),
                              run.lr_scheduler.get_last_lr()[0]))

    def forward_backward(self, run: Run, step: int, micro: int,
                         text_encoders_train: list[bool]) -> torch.Tensor:
        """One micro-batch: the DreamBooth loss (``method.batch_loss``) and its backward
        pass. Returns (loss, instance loss, prior loss) / accumulation, on the device."""
        spec = self.spec
        accumulation = spec.gradient_accumulation_steps
        plan = run.examples.plan(step=step, micro=micro, rank=self.rank, world=self.world)
        batch = run.examples.batch(plan, run.token_ids, latents=run.latents,
                                   embeddings=run.embeddings)
        batch = batch.to(self.device)
        generator = seeded(self.seed, 1000, step, micro, self.rank, device=self.device)
        sync = micro == accumulation - 1 or not self.distributed
        context = contextlib.nullcontext() if sync else run.model.no_sync()
        autocast = torch.autocast(self.device.type, dtype=run.precision) if run.precision \
            else contextlib.nullcontext()
        with context, autocast:
            parts = run.model(
                _loss_with_text_encoder_gate(text_encoders_train),
                vae=run.m.vae, noise_scheduler=run.m.noise_scheduler, family=spec.family,
                batch=batch, generator=generator, snr_gamma=spec.options.snr_gamma,
                noise_offset=spec.options.noise_offset,
                base_model=functools.partial(base_model, run.m),
                flow=spec.options.flow_matching)
            loss = parts.loss / accumulation
        if run.scaler is not None:
            run.scaler.scale(loss).backward()
        else:
            loss.backward()
        # Stays on the device: no host sync inside the step.
        return torch.stack([parts.loss.detach().float(), parts.instance.detach().float(),
                            parts.prior.detach().float()]) / accumulation

    # -- helpers ----------------------------------------------------------------------------
    def stop_requested(self) -> bool:
        """Whether a cancel or interrupt is asked (rank 0 reads; every rank agrees)."""
        flag = torch.zeros(1, device=self.device)
        if self.rank == 0 and (self.jobs.marked(self.job_id, CANCEL)
                               or self.jobs.marked(self.job_id, INTERRUPT)):
            flag += 1
        if self.distributed:
            dist.all_reduce(flag)
        return bool(flag.item() > 0)

    def _settle(self, run: Run, state: TrainState) -> None:
        """Bring the pending steps' numbers to the host, record them, report the last."""
        pending, state.pending = state.pending, []
        if not pending:
            return
        values = torch.stack([torch.cat([t, g.reshape(1).float()]) for _, t, g, _ in pending])
        values = values.cpu().tolist()
        for row in values:
            state.losses.append(row[:3])
        step, _, _, lr = pending[-1]
        self.reporter.progress(run, state, step, values[-1][:3], lr, values[-1][3])

    def _checkpoint(self, run: Run, state: TrainState) -> None:
        """Every rank's part, then rank 0's (weights, optimizer, schedule, EMA), sealed
        with their hashes once all ranks have written; then rank 0 reports it."""
        step = state.step
        t0 = time.perf_counter()
        if self.distributed:
            dist.barrier()
        checkpoints.save_rank_part(self.store, self.job_id, step, self.rank)
        digests = {}
        if self.rank == 0:
            digests = checkpoints.save_main_part(
                self.store, self.job_id, step, trainable=trainable_state(run.module, run.names),
                optimizer=run.optimizer, lr_scheduler=run.lr_scheduler, scaler=run.scaler,
                state={"global_step": step, "data_position": step, "losses": state.losses,
                       **({"ema": run.ema.state()} if run.ema else {})},
                ema=run.ema.weights() if run.ema else None)
        if self.distributed:
            dist.barrier()
        if self.rank == 0:
            checkpoints.seal(self.store, self.job_id, step, digests)
            self.reporter.checkpoint_saved(run, step, time.perf_counter() - t0)


def build_optimizer(m: Models, spec: TrainConfig, device: torch.device):
    """AdamW (or 8-bit AdamW) over one group per trained module, each at its rate."""
    lr = spec.learning_rate
    groups = [{"params": [p for p in m.unet.parameters() if p.requires_grad], "lr": lr}]
    for encoder, trains, te in zip(m.text_encoders, m.train_text_encoders,
                                   (spec.text_encoder, spec.text_encoder_2), strict=False):
        if trains:
            groups.append({"params": [p for p in encoder.parameters() if p.requires_grad],
                           "lr": te.learning_rate or lr})
    kwargs = {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}
    if spec.options.use_8bit_adam and device.type == "cuda":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, **kwargs)
        except ImportError:
            log.warning("use_8bit_adam: bitsandbytes is not installed; using AdamW")
    return torch.optim.AdamW(groups, **kwargs)


def _has_unused_parameters(m: Models, spec: TrainConfig) -> bool:
    """Whether some trainable parameters get no gradient in some steps (DDP must know):
    text encoders that stop training, and SDXL's first encoder's last layer (the UNet
    takes its penultimate states)."""
    stops = any(trains and te.stop_at_step for trains, te in
                zip(m.train_text_encoders, (spec.text_encoder, spec.text_encoder_2),
                    strict=False))
    return stops or (spec.family == SDXL and m.train_text_encoders[0])


class _NoGrad(torch.nn.Module):
    """A text encoder that has stopped training: run without gradients."""

    def __init__(self, encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.encoder(*args, **kwargs)


def _loss_with_text_encoder_gate(trains_now: list[bool]):
    """batch_loss, with each text encoder that is not training now run without
    gradients."""
    if all(trains_now):
        return batch_loss

    def gated(*, text_encoders, **kwargs):
        return batch_loss(text_encoders=[e if t else _NoGrad(e) for e, t in
                                         zip(text_encoders, trains_now, strict=True)],
                          **kwargs)

    return gated
