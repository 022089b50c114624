"""The analysis engine: loads the vision-language model and its processor.

At this stage it loads them at start (which gates health); batched and
constrained generation arrives with the Analysis issue.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from atelier.analysis.config import Settings
from atelier.model_sources import resolve_model_ref
from atelier.runtime import pick_device, quiet_model_loading
from atelier.storage import ObjectStore, open_store

log = logging.getLogger("atelier.analysis")


class AnalysisEngine:
    """Owns the object store handle, the model and the processor."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store: ObjectStore | None = None
        self.model: Any = None
        self.processor: Any = None

    async def start(self) -> None:
        """Open the store and load model and processor, off the event loop."""
        await asyncio.to_thread(self._start)

    def _start(self) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        quiet_model_loading()

        self.store = open_store(self.settings.storage)
        ref = self.settings.analysis.model
        path = resolve_model_ref(ref, cache_dir=self.settings.models.cache_dir, store=self.store,
                                 field="analysis.model")
        device = pick_device(self.settings.analysis.device)
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path).to(device).eval()
        log.info("loaded model", extra={"model": ref, "device": device})
