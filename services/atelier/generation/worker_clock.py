"""Where the denoising worker's time goes: its wall time split into phases.

The worker thread times each phase of its loop with :meth:`WorkerClock.phase`
and counts it in ``atelier_generation_worker_seconds_total{phase}``:

- ``denoise``: denoiser forwards;
- ``scheduler``: scheduler updates and guidance arithmetic;
- ``vae_encode`` / ``vae_decode``: init-image encoding and image decoding;
- ``text_encode``: prompt encoding;
- ``idle``: waiting with nothing admitted;
- ``other``: the rest of each iteration (admission, events, previews, Python).

On CUDA, kernels run asynchronously, so a host clock around a launch measures
the launch, not the work: each phase starts and ends with a device
synchronisation. The synchronisations cost a few microseconds per phase, against
forwards of tens of milliseconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

PHASES = ("denoise", "scheduler", "vae_encode", "vae_decode", "text_encode", "idle", "other")


class WorkerClock:
    """Accumulates phase seconds; ``report(phase, seconds)`` receives each one."""

    def __init__(self, device: str = "cpu",
                 report: Callable[[str, float], None] | None = None) -> None:
        self._sync = torch.cuda.synchronize if device.startswith("cuda") else None
        self._report = report or (lambda phase, seconds: None)
        self._timed = 0.0  # named phases inside the current iteration
        self._iteration_start: float | None = None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._sync is not None:
            self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync is not None:
                self._sync()
            seconds = time.perf_counter() - start
            self._timed += seconds
            self._report(name, seconds)

    def begin_iteration(self) -> None:
        self._iteration_start = time.perf_counter()
        self._timed = 0.0

    def end_iteration(self) -> None:
        """Counts what the iteration's named phases did not as ``other``."""
        if self._iteration_start is None:
            return
        rest = time.perf_counter() - self._iteration_start - self._timed
        self._iteration_start = None
        if rest > 0:
            self._report("other", rest)
