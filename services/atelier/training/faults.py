"""Faults a test injects into a training run, through an optional parameter.

Production code passes ``None`` (nothing is injected, nothing is checked beyond
one ``is None``); the test suite passes a :class:`Faults` to the engine of a
service process it starts (``tests/training/service_with_faults.py``), which
hands it to ``runner.run_job`` and on to every Ray worker.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from atelier.training.jobs import INJECTED_FAILURE

if TYPE_CHECKING:
    from atelier.training.loop import Worker


@dataclass(frozen=True)
class Faults:
    fail_once_at_step: int | None = None
    """At this step the last rank's process dies, once per job (Ray Train restarts
    the worker group from the last checkpoint)."""
    hold_at_step: int | None = None
    """At this step the loop waits until the job is cancelled or interrupted."""

    def before_step(self, worker: Worker, step: int) -> bool:
        """Inject what is due at ``step``; True when the step must not run (held)."""
        if step == self.fail_once_at_step and worker.rank == worker.world - 1 \
                and not worker.jobs.marked(worker.job_id, INJECTED_FAILURE):
            worker.jobs.mark(worker.job_id, INJECTED_FAILURE, {"step": step})
            os._exit(17)
        if step == self.hold_at_step:
            while not worker.stop_requested():
                time.sleep(0.1)
            return True
        return False
