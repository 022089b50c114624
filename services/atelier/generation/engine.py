"""The generation engine: loads Stable-Diffusion pipelines.

At this stage it opens the object store and loads the default base model at
start (which gates health); step-level continuous batching arrives with the
Generation issue.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from atelier.generation.config import Settings
from atelier.model_sources import resolve_model_ref
from atelier.runtime import pick_device, quiet_model_loading
from atelier.storage import ObjectStore, open_store

log = logging.getLogger("atelier.generation")


class GenerationEngine:
    """Owns the object store handle and the loaded pipelines."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store: ObjectStore | None = None
        self.pipeline: Any = None

    async def start(self) -> None:
        """Open the store and load the default base model, off the event loop."""
        await asyncio.to_thread(self._start)

    def _start(self) -> None:
        from diffusers import StableDiffusionPipeline

        quiet_model_loading()

        self.store = open_store(self.settings.storage)
        ref = self.settings.generation.default_model
        path = resolve_model_ref(ref, cache_dir=self.settings.models.cache_dir, store=self.store,
                                 field="generation.default_model")
        device = pick_device(self.settings.generation.device)
        pipeline = StableDiffusionPipeline.from_pretrained(path, use_safetensors=True)
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline = pipeline.to(device)
        log.info("loaded base model", extra={"model": ref, "device": device})
