"""Classifier-free guidance, applied per sequence to one batched UNet output.

The runner lays a group's forward out as ``[uncond of each guided sequence] +
[cond of every sequence]``. :func:`apply_guidance` turns that output into one
noise prediction per sequence: a guided sequence gets
``uncond + scale * (cond - uncond)`` with its own scale (and, when it asks, the
guidance rescale of Lin et al. 2023, section 3.4, as diffusers'
``rescale_noise_cfg``); an unguided one takes its conditional output as is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg


def is_guided(guidance_scale: float, unet_config) -> bool:
    """As the pipelines: guidance applies when the scale exceeds 1 and the UNet has no
    guidance embedding (``time_cond_proj_dim``)."""
    return guidance_scale > 1.0 and getattr(unet_config, "time_cond_proj_dim", None) is None


def apply_guidance(output: torch.Tensor, scales: Sequence[float | None],
                   rescales: Sequence[float]) -> list[torch.Tensor]:
    """Per-sequence predictions from a batched output.

    ``scales[j]`` is sequence j's guidance scale, or None when it is unguided;
    ``output`` holds one unconditional row per guided sequence (in order), then one
    conditional row per sequence. Returns one ``(1, C, H, W)`` tensor per sequence.
    """
    guided = [j for j, s in enumerate(scales) if s is not None]
    uncond, cond = output[: len(guided)], output[len(guided):]
    combined = None
    if guided:
        # Every guided sequence's own scale, in one operation.
        where = torch.tensor(guided, device=output.device)
        scale = torch.tensor([scales[j] for j in guided], dtype=output.dtype,
                             device=output.device).view(-1, *([1] * (output.dim() - 1)))
        text = cond.index_select(0, where)
        combined = uncond + scale * (text - uncond)
    predictions = []
    g = 0
    for j, s in enumerate(scales):
        pred = cond[j : j + 1]
        if s is not None:
            text = pred
            pred = combined[g : g + 1]
            if rescales[j] > 0.0:
                pred = rescale_noise_cfg(pred, text, guidance_rescale=rescales[j])
            g += 1
        predictions.append(pred)
    return predictions
