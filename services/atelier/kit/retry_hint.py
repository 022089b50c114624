"""How long a refused client should wait: a moving average of recent work.

Every queue that refuses with RESOURCE_EXHAUSTED gives a retry hint from how long
its recent units of work (a batch, a request, a job) took, smoothed so that one
slow unit neither doubles the hint nor is forgotten at once.
"""

from __future__ import annotations

#: Weight of the newest observation in the average.
SMOOTHING = 0.2


class RecentSeconds:
    """An exponential moving average of durations, in seconds."""

    def __init__(self, initial_s: float = 1.0) -> None:
        self.seconds = initial_s
        """The current average; ``initial_s`` until the first observation."""

    def observe(self, seconds: float) -> None:
        self.seconds = (1 - SMOOTHING) * self.seconds + SMOOTHING * seconds

    def hint(self, floor_s: float = 0.5, units_ahead: float = 1.0) -> float:
        """Seconds to wait for ``units_ahead`` units of work, at least ``floor_s``."""
        return max(floor_s, round(units_ahead * self.seconds, 2))
