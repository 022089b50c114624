"""The batched scheduler updates against diffusers' own schedulers, row by row, and
the promise that a step's host work does not grow with the batch.

No model here: the updates are checked on random latents and predictions against
each row's own diffusers scheduler (rows with different step counts, start
points and histories side by side), and the operation count of a runner step is
taken with a real tiny UNet in a TorchDispatchMode counter.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from atelier.generation.job import Job
from atelier.generation.registry import LoadedModel, ModelEntry
from atelier.generation.runner import DenoiseRunner
from atelier.generation.scheduler_updates import kind_for
from atelier.generation.schedulers import SCHEDULERS, scheduler_factory, step_kwargs_for
from atelier.generation.worker_clock import WorkerClock
from atelier.models.pipelines import load_pipeline

SD_CONFIG = {  # Stable Diffusion's scheduler config (PNDM, scaled-linear betas)
    "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "prediction_type": "epsilon",
}
SDXL_CONFIG = {  # SDXL's (Euler, leading spacing)
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
    "timestep_spacing": "leading", "interpolation_type": "linear",
    "prediction_type": "epsilon", "use_karras_sigmas": False,
}
V_CONFIG = {  # SD 2.x style: DDIM, v-prediction
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "clip_sample": False,
    "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "v_prediction",
}
NAMES = ["", *sorted(SCHEDULERS)]
#: (steps, first step) of each row; image to image starts later in its timetable.
ROWS = [(12, 0), (7, 0), (20, 0), (10, 4), (9, 3)]


def _reference(make, steps: int, first: int, seed: int):
    """A diffusers scheduler set up as the runner sets it up for a row."""
    scheduler = make()
    scheduler.set_timesteps(steps)
    order = getattr(scheduler, "order", 1)
    if first and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(first * order)
    return scheduler, first * order


@pytest.mark.parametrize("config", [SD_CONFIG, SDXL_CONFIG, V_CONFIG],
                         ids=["sd", "sdxl", "v-prediction"])
@pytest.mark.parametrize("name", NAMES, ids=lambda n: n or "own")
def test_batched_update_equals_each_rows_own_scheduler(config, name):
    make = scheduler_factory(name, config)
    probe = make()
    cls = kind_for(probe)
    if cls is None:  # the one served configuration that steps per row (documented)
        assert type(probe).__name__ == "PNDMScheduler" and not probe.config.skip_prk_steps
        return
    kind = cls(probe)
    shape = (1, 4, 8, 8)
    rows = []
    for r, (steps, first) in enumerate(ROWS):
        scheduler, index = _reference(make, steps, first, r)
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(100 + r))
        rows.append({
            "scheduler": scheduler, "timesteps": list(scheduler.timesteps)[index:],
            "ref": latents.clone(), "ours": latents.clone(), "i": 0,
            "state": kind.begin(scheduler, index),
            "ref_gen": torch.Generator().manual_seed(7 + r),
            "our_gen": torch.Generator().manual_seed(7 + r)})
    outputs = torch.Generator().manual_seed(0)
    while any(row["i"] < len(row["timesteps"]) for row in rows):
        live = [row for row in rows if row["i"] < len(row["timesteps"])]
        preds = [torch.randn(shape, generator=outputs) for _ in live]
        for row, pred in zip(live, preds, strict=True):
            t, s = row["timesteps"][row["i"]], row["scheduler"]
            kwargs = {"eta": 0.0} if "eta" in step_kwargs_for(type(s)) else {}
            if "generator" in step_kwargs_for(type(s)):
                kwargs["generator"] = row["ref_gen"]
            divisor = kind.input_divisor(row["state"])
            scaled = s.scale_model_input(row["ours"], t)
            torch.testing.assert_close(row["ours"] / divisor, scaled, rtol=1e-6, atol=1e-6)
            row["ref"] = s.step(pred, t, row["ref"], **kwargs, return_dict=False)[0]
        x = torch.cat([row["ours"] for row in live])
        new = kind.update([row["state"] for row in live], x, torch.cat(preds),
                          [row["our_gen"] for row in live], torch.float32)
        for row, latents in zip(live, new.split(1), strict=True):
            row["ours"] = latents
            if row["i"] < len(row["timesteps"]) - 1:  # add_noise at the next timestep
                a, b = kind.noise_coefficients(row["state"])
                x0, noise = torch.randn(shape), torch.randn(shape)
                nxt = row["timesteps"][row["i"] + 1]
                reference = row["scheduler"].add_noise(x0, noise, torch.tensor([nxt]))
                torch.testing.assert_close(a * x0 + b * noise, reference, rtol=1e-5, atol=1e-5)
            row["i"] += 1
    for row in rows:
        torch.testing.assert_close(row["ours"], row["ref"], rtol=1e-4, atol=1e-4)


class _OpCounter(TorchDispatchMode):
    """Counts every tensor operation dispatched while ``counting`` is on."""

    def __init__(self) -> None:
        super().__init__()
        self.counting = True
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _ClockOutsideTheForward(WorkerClock):
    """The runner's clock, pausing the counter while the denoiser runs."""

    def __init__(self, counter: _OpCounter) -> None:
        super().__init__("cpu")
        self.counter = counter

    @contextmanager
    def phase(self, name):
        paused = name == "denoise"
        if paused:
            self.counter.counting = False
        try:
            yield
        finally:
            self.counter.counting = True


@pytest.fixture(scope="module")
def tiny_model(tiny_sd):
    pipeline = load_pipeline(tiny_sd, dtype=torch.float32, device="cpu")
    return LoadedModel(ModelEntry("tiny-sd", "base", str(tiny_sd)), pipeline, 0)


def _ops_in_one_step(model, scheduler: str, rows: int, guided: bool) -> list[str]:
    counter = _OpCounter()
    runner = DenoiseRunner(device="cpu", clock=_ClockOutsideTheForward(counter))
    make = scheduler_factory(scheduler, model.pipeline.scheduler.config)
    jobs = [Job(model=model, prompt=f"a photo of sks dog {i}", negative_prompt="",
                width=64, height=64, num_inference_steps=6 + i % 3,
                guidance_scale=(3.0 + i) if guided else 1.0, guidance_rescale=0.0,
                seeds=[i], make_scheduler=make, emit=lambda event: None)
            for i in range(rows)]
    with torch.inference_mode():
        sequences = runner.start(jobs)
        ids = [s.seq_id for s in sequences]
        for _ in range(3):  # into the multistep histories
            runner.step("group", ids)
        with counter:
            runner.step("group", ids)
    return counter.ops


@pytest.mark.parametrize("scheduler", ["", "ddim", "euler", "dpmpp_2m", "unipc"],
                         ids=lambda n: n or "own")
def test_a_steps_operations_do_not_grow_with_the_batch(tiny_model, scheduler):
    """Outside the denoiser forward, one step dispatches the same tensor operations for
    1, 4 and 16 rows (guided and not), for every deterministic scheduler kind."""
    for guided in (True, False):
        counts = {rows: _ops_in_one_step(tiny_model, scheduler, rows, guided)
                  for rows in (1, 4, 16)}
        assert len(counts[1]) == len(counts[4]) == len(counts[16]), {
            rows: len(ops) for rows, ops in counts.items()}
        assert counts[1] == counts[16]


def test_euler_ancestral_adds_one_noise_draw_per_row(tiny_model):
    """The stochastic Euler ancestral draws each row's noise from the row's own
    generator: its count grows by exactly the per-row draw and nothing else."""
    one = _ops_in_one_step(tiny_model, "euler_ancestral", 1, True)
    four = _ops_in_one_step(tiny_model, "euler_ancestral", 4, True)
    extra = list(four)
    for op in one:
        extra.remove(op)
    assert extra and len(extra) % 3 == 0, extra  # the same draw for each of 3 more rows
    # The draw on the row's CPU generator, and its move to the device.
    assert {op.split(".")[1] for op in extra} <= {"randn", "to"}, extra
