"""Schedulers offered by name, and a fresh instance per sequence.

diffusers schedulers keep per-instance state (step index, multistep history)
and are not thread-safe, so every sequence gets its own instance, made from the
model's scheduler config (betas, offsets, prediction type).
"""

from __future__ import annotations

import copy
import inspect
from functools import cache, lru_cache
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from atelier.kit.errors import FieldViolation, InvalidArgument, NotFound
from atelier.kit.validation import echo

#: Public scheduler names -> (class, config overrides).
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++",
                                               "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {}),
}


def scheduler_factory(name: str, base_config: Any, steps: int | None = None):
    """A zero-argument callable making fresh schedulers of ``name`` ('' = the model's own).

    Each call returns an independent copy of a prototype built once per (name,
    config): ``from_config`` inspects signatures and is too slow to run for every
    image, while a copy carries no shared state.
    """
    if name and name not in SCHEDULERS:
        raise NotFound("scheduler", name,
                       f"scheduler {echo(name)} not found; offered: {', '.join(SCHEDULERS)}")
    frozen = freeze(dict(base_config))
    prototype = _prototype(name, frozen)
    if steps is not None and not _runs_for(name, frozen, steps):
        raise InvalidArgument(FieldViolation(
            "num_inference_steps",
            f"scheduler {type(prototype).__name__} of this model cannot run {steps} steps "
            "(past the trained timesteps, or onto equal sigmas); use fewer"))
    return lambda: copy.deepcopy(prototype)


@lru_cache(maxsize=256)
def _runs_for(name: str, frozen_config: tuple, steps: int) -> bool:
    """Whether the scheduler completes ``steps`` steps: a dry run on a one-element
    latent (milliseconds). Some timetables index past ``num_train_timesteps`` near
    the top of the step range (DDIM and PNDM with ``steps_offset``, multistep
    solvers at exactly the trained count), which would fail mid-denoise."""
    scheduler = copy.deepcopy(_prototype(name, frozen_config))
    generator = torch.Generator().manual_seed(0)
    extra = {"generator": generator} if "generator" in step_kwargs_for(type(scheduler)) else {}
    try:
        scheduler.set_timesteps(steps)
        latent = torch.zeros(1, 1, 1, 1)
        for t in scheduler.timesteps:
            latent = scheduler.scale_model_input(latent, t)
            latent = scheduler.step(torch.zeros_like(latent), t, latent, **extra).prev_sample
    except (IndexError, AssertionError, ValueError, RuntimeError):
        return False
    return bool(torch.isfinite(latent).all())


@lru_cache(maxsize=64)
def _prototype(name: str, frozen_config: tuple):
    config = dict(frozen_config)
    if not name:
        return _class_by_name(config["_class_name"]).from_config(config)
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(config, **overrides)


def freeze(value: Any) -> Any:
    """A hashable copy of a (nested) config."""
    if isinstance(value, dict):
        return tuple(sorted((k, freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    return value


def _class_by_name(class_name: str) -> type:
    import diffusers

    return getattr(diffusers, class_name)


@cache
def step_kwargs_for(cls: type) -> frozenset[str]:
    """Which of ``generator`` / ``eta`` the class's ``step`` accepts (as the pipeline does)."""
    params = set(inspect.signature(cls.step).parameters)
    return frozenset(params & {"generator", "eta"})
