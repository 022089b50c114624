"""One compatibility fix between vLLM 0.32 and the transformers this project uses.

vLLM's Qwen3-VL input processor runs the HF processor on the prompt with the
videos taken out (it expands each video's tokens itself, with timestamps);
vLLM 0.32 was built against transformers < 5.20, whose processors accepted
video placeholders without videos. transformers >= 5.20 refuses that in
``validate_inputs``. ``allow_unexpanded_video_placeholders`` skips that one
count check, for Qwen-VL processors only, when no videos are passed; every
other check still runs. It is applied in the process that prepares vLLM's
inputs (the service process) and is a no-op on transformers that never checks.
"""

from __future__ import annotations

import functools


def allow_unexpanded_video_placeholders() -> None:
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    original = Qwen3VLProcessor.validate_inputs
    if getattr(original, "_atelier_compat", False):
        return

    @functools.wraps(original)
    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        token = getattr(self, "video_token", None)
        if videos is None and token and text is not None:
            text = text.replace(token, "") if isinstance(text, str) else \
                [t.replace(token, "") if isinstance(t, str) else t for t in text]
        return original(self, images=images, text=text, videos=videos, audio=audio, **kwargs)

    validate_inputs._atelier_compat = True
    Qwen3VLProcessor.validate_inputs = validate_inputs
