"""Small runtime helpers shared by the engines."""

from __future__ import annotations

import functools
import logging
import threading

#: One model load at a time in a process. diffusers' and transformers'
#: ``from_pretrained`` build modules under accelerate's ``init_empty_weights``, which
#: patches parameter registration for the whole process: a module built in another
#: thread meanwhile lands on the meta device (and transformers then refuses it).
#: Reentrant, so a loader may call another.
MODEL_LOADING = threading.RLock()


def one_load_at_a_time(load):
    """Decorate a function that loads weights to hold ``MODEL_LOADING`` while it runs."""

    @functools.wraps(load)
    def locked(*args, **kwargs):
        with MODEL_LOADING:
            return load(*args, **kwargs)

    return locked


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
