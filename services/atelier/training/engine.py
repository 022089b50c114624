"""The training engine: owns the object store where job records and checkpoints live.

At this stage it opens (and, on MinIO, creates) the store at start, which gates
health; jobs on Ray Train arrive with the Training issue.
"""

from __future__ import annotations

import asyncio

from atelier.storage import ObjectStore, open_store
from atelier.training.config import Settings


class TrainingEngine:
    """Owns the object store handle."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store: ObjectStore | None = None

    async def start(self) -> None:
        """Open the store (creating the bucket if missing), off the event loop."""
        self.store = await asyncio.to_thread(open_store, self.settings.storage)
