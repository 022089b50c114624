"""When to retry a failed call, and how long to wait first.

UNAVAILABLE (server starting, draining, or a dropped connection) is retried with
exponential backoff and full jitter. RESOURCE_EXHAUSTED (the server's queue is
full) is retried after the delay the server names in RetryInfo, or the backoff
when it names none. Nothing else is retried: the other codes will not change
by asking again.

Only calls that are safe to repeat are retried: reads, cancellation, and job
submission, which the clients make idempotent with a ``request_id``. Streams
are retried only before their first message arrives.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

from atelier.client.errors import AtelierRpcError


@dataclass(frozen=True)
class RetryPolicy:
    """Retry settings; ``RetryPolicy(max_attempts=1)`` turns retries off."""

    max_attempts: int = 5
    """Tries in all, the first included."""
    initial_backoff_s: float = 0.2
    """Upper bound of the first jittered wait, in seconds."""
    max_backoff_s: float = 10.0
    """Cap on any single wait, in seconds (also caps a server's retry hint)."""
    multiplier: float = 2.0
    """Growth of the backoff bound per attempt."""
    retry_resource_exhausted: bool = True
    """Whether a full queue is retried (after the server's hint)."""

    def delay(self, attempt: int, error: AtelierRpcError) -> float | None:
        """Seconds to wait before try ``attempt + 1`` after ``error``; None: give up.

        ``attempt`` counts from 1 (the try that just failed)."""
        if attempt >= self.max_attempts:
            return None
        bound = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        if error.code == grpc.StatusCode.UNAVAILABLE:
            return random.uniform(0, bound)
        if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and self.retry_resource_exhausted:
            if error.retry_delay is not None:
                return min(self.max_backoff_s, error.retry_delay)
            return random.uniform(0, bound)
        return None
