"""Typed Python clients of the three atelier services, sync and asyncio.

Installs with the base package (no torch). Every call has a deadline, retries
UNAVAILABLE with backoff and RESOURCE_EXHAUSTED after the server's hint, sends
the bearer token, speaks TLS/mTLS when asked, and raises AtelierRpcError
subclasses that carry the status code and the rich error details.
See docs/clients.md for a tour of every call.
"""

from atelier.client.analysis import AnalysisClient, AsyncAnalysisClient, answer_json
from atelier.client.connection import ConnectionOptions
from atelier.client.errors import (
    AlreadyExists,
    AtelierRpcError,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from atelier.client.generation import AsyncGenerationClient, GenerationClient
from atelier.client.media import image_input, image_inputs, save_images, to_pil, video_input
from atelier.client.retry import RetryPolicy
from atelier.client.sweep import Sweep, SweepRun
from atelier.client.training import (
    FINAL_STATES,
    AsyncTrainingClient,
    TrainingClient,
    dreambooth_spec,
)

__all__ = [
    "FINAL_STATES",
    "AlreadyExists",
    "AnalysisClient",
    "AsyncAnalysisClient",
    "AsyncGenerationClient",
    "AsyncTrainingClient",
    "AtelierRpcError",
    "ConnectionOptions",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "GenerationClient",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "Sweep",
    "SweepRun",
    "TrainingClient",
    "Unauthenticated",
    "Unavailable",
    "answer_json",
    "dreambooth_spec",
    "image_input",
    "image_inputs",
    "save_images",
    "to_pil",
    "video_input",
]
