"""Small runtime helpers shared by the engines."""

from __future__ import annotations

import logging


def pick_device(preference: str) -> str:
    """``cpu`` or ``cuda`` for a ``auto``/``cpu``/``cuda`` setting."""
    import torch

    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' configured but no CUDA device is available")
    return preference


def pick_dtype(setting: str, device: str):
    """The torch dtype for an ``auto``/``float32``/``float16``/``bfloat16`` setting:
    ``auto`` is float32 on CPU (exact parity with the reference libraries) and
    bfloat16 on CUDA."""
    import torch

    if setting == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, setting)


def quiet_model_loading() -> None:
    """Turn off the libraries' tqdm bars; services report loading through their logs."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    # atelier never loads the SD safety checker (it is not part of the served API);
    # the pipeline warns about that on every load.
    logging.getLogger("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion") \
        .setLevel(logging.ERROR)
