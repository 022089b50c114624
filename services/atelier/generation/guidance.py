"""Classifier-free guidance, applied to every sequence of one batched denoiser output at once.

The runner lays a group's forward out as ``[uncond of each guided sequence] +
[cond of every sequence]`` (whether a request is guided is its family's call:
``Family.is_guided``). :func:`apply_guidance` turns that output into one
prediction per sequence (noise, v or flow velocity): a guided sequence gets
``uncond + scale * (cond - uncond)`` with its own scale (and, when it asks, the
guidance rescale of Lin et al. 2023, section 3.4, as diffusers'
``rescale_noise_cfg``); an unguided one takes its conditional output as is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def apply_guidance(output: torch.Tensor, scales: Sequence[float | None],
                   rescales: Sequence[float]) -> torch.Tensor:
    """Per-sequence predictions from a batched output, as one ``(R, C, H, W)`` tensor.

    ``scales[j]`` is sequence j's guidance scale, or None when it is unguided;
    ``output`` holds one unconditional row per guided sequence (in order), then one
    conditional row per sequence. The same operations run for 1 row or 64: every
    guided row's scale and rescale are one tensor each.
    """
    guided = [j for j, s in enumerate(scales) if s is not None]
    uncond, cond = output[: len(guided)], output[len(guided):]
    if not guided:
        return cond
    every = len(guided) == len(scales)
    where = None if every else torch.tensor(guided, device=output.device)
    text = cond if every else cond.index_select(0, where)
    shape = (-1, *([1] * (output.dim() - 1)))
    scale = torch.tensor([scales[j] for j in guided], dtype=output.dtype,
                         device=output.device).view(shape)
    combined = uncond + scale * (text - uncond)
    wanted = [rescales[j] for j in guided]
    if any(r > 0.0 for r in wanted):
        combined = _rescaled(combined, text, wanted)
    return combined if every else cond.index_copy(0, where, combined)


def _rescaled(cfg: torch.Tensor, text: torch.Tensor, rescales: list[float]) -> torch.Tensor:
    """diffusers' ``rescale_noise_cfg`` for every row at once, each with its own factor;
    a row with factor 0 keeps its guided prediction exactly."""
    dims = list(range(1, cfg.dim()))
    rescaled = cfg * (text.std(dim=dims, keepdim=True) / cfg.std(dim=dims, keepdim=True))
    r = torch.tensor(rescales, dtype=cfg.dtype, device=cfg.device).view(-1, *([1] * len(dims)))
    return torch.where(r > 0, r * rescaled + (1 - r) * cfg, cfg)
