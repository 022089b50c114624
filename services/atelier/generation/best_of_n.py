"""Best of N: rank a request's candidates by their likeness to the model's subject.

A fine-tuned model's export stores its subject's photos (``subject_images`` in the
manifest). Their DINO embeddings are computed once per model (and kept for the
``max_models`` most recent); a request's candidates, generated in the same
continuous batch as everything else, are embedded and ranked by their mean cosine
with them (``atelier.models.subject_scores``). The DINO model loads on first use. All
of its tensor work runs on the denoising worker thread between steps, as the UNet's
does, so no other thread starts a torch thread pool.
"""

from __future__ import annotations

import asyncio
import io
from collections import OrderedDict
from pathlib import Path

import torch
from PIL import Image

from atelier.generation.batching import DenoiseBatcher
from atelier.generation.registry import ModelEntry
from atelier.kit.errors import FailedPrecondition
from atelier.models.manifest import model_key
from atelier.models.sources import resolve_model_ref
from atelier.models.subject_scores import ScoringModels
from atelier.storage import ObjectStore


class BestOfN:
    def __init__(self, dino_ref: str, *, cache_dir: Path, store: ObjectStore,
                 batcher: DenoiseBatcher, device, max_models: int = 64) -> None:
        self.dino_ref, self.cache_dir, self.store = dino_ref, cache_dir, store
        self.batcher, self.device, self.max_models = batcher, device, max_models
        self._scoring: ScoringModels | None = None
        self._load_lock = asyncio.Lock()
        self._subjects: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    async def _on_worker(self, fn):
        return await asyncio.wrap_future(self.batcher.run_on_worker(fn))

    async def _scorer(self) -> ScoringModels:
        async with self._load_lock:
            if self._scoring is None:
                path = await asyncio.to_thread(resolve_model_ref, self.dino_ref,
                                               cache_dir=self.cache_dir, store=self.store,
                                               field="generation.dino_model")
                self._scoring = await self._on_worker(
                    lambda: ScoringModels(None, path, self.device))
            return self._scoring

    async def subject(self, entry: ModelEntry) -> torch.Tensor:
        """The subject photos' DINO embeddings of ``entry``; FAILED_PRECONDITION for a
        model that stores none (a base model, or one exported without them)."""
        manifest = entry.manifest
        if manifest is None or not manifest.subject_images:
            raise FailedPrecondition(
                f"num_candidates above num_images ranks candidates by likeness to a "
                f"fine-tuned model's subject; {entry.name} stores no subject photos")
        key = (entry.model_id, manifest.create_time)
        if key in self._subjects:
            self._subjects.move_to_end(key)
            return self._subjects[key]
        photos = await asyncio.to_thread(self._photos, entry)
        scoring = await self._scorer()
        embeddings = await self._on_worker(lambda: scoring.dino_embeddings(photos))
        self._subjects[key] = embeddings
        while len(self._subjects) > self.max_models:
            self._subjects.popitem(last=False)
        return embeddings

    def _photos(self, entry: ModelEntry) -> list[Image.Image]:
        return [Image.open(io.BytesIO(self.store.get_bytes(
            model_key(entry.model_id, path)))).convert("RGB")
            for path in entry.manifest.subject_images]

    async def rank(self, images: list[Image.Image], seeds: list[int],
                   subject: torch.Tensor) -> list[tuple[int, float]]:
        """(candidate index, similarity) for every candidate, most alike first (the
        lower seed first among equals)."""
        scoring = await self._scorer()
        scores = await self._on_worker(lambda: scoring.subject_similarity(images, subject))
        return sorted(enumerate(scores), key=lambda item: (-item[1], item[0]))
