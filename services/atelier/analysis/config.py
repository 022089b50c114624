"""Settings of the analysis service."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from atelier.analysis.vllm_settings import VllmSettings
from atelier.kit.settings import Section, ServiceSettings
from atelier.ports import GRPC_PORTS, METRICS_PORTS

MiB = 1024 * 1024


class AnalysisEngineSettings(Section):
    """The analysis engine: model, backend, batching and per-request limits."""

    model: str = "tiny://qwen3-vl"
    """The vision-language model: a ``tiny://`` name, ``store://`` prefix, local
    path or Hugging Face id (e.g. ``Qwen/Qwen3-VL-2B-Instruct``). The tiny
    default needs no download."""
    backend: Literal["transformers", "vllm"] = "transformers"
    """``transformers``: AutoModelForImageTextToText in this process behind atelier's
    batcher (the light embedded default). ``vllm``: vLLM's asynchronous engine
    (continuous batching, paged KV and prefix caching, tensor, pipeline and expert
    parallelism), configured by ``vllm``. Both serve the same API."""
    vllm: VllmSettings = VllmSettings()
    """Engine settings of the vllm backend (ignored by transformers)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model runs; ``auto`` picks CUDA when available."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Compute dtype; ``auto``: float32 on CPU, bfloat16 on CUDA."""
    max_batch_size: int = Field(16, ge=1, le=256)
    """Most requests decoded together in one generate call (transformers backend; vLLM
    has ``vllm.max_num_seqs``). Also BatchAnalyze items in flight at once."""
    max_queue_length: int = Field(64, ge=1, le=10_000)
    """Requests waiting for a batch; beyond it RESOURCE_EXHAUSTED at once. On vLLM,
    requests admitted beyond the ``max_num_seqs`` it can run."""
    batch_wait_ms: float = Field(50.0, ge=0, le=1000)
    """Longest wait, in milliseconds, for requests that are already being prepared
    (decoded and tokenized) to join a batch that is not full. With nothing in
    preparation a batch starts at once, so an idle service adds no latency."""
    max_images: int = Field(8, ge=1, le=64)
    """Images per request."""
    max_image_bytes: int = Field(20 * MiB, ge=1024)
    """Encoded bytes per image."""
    max_image_pixels: int = Field(40_000_000, ge=64 * 64)
    """Decoded width x height per image, before resizing (guards against
    decompression bombs)."""
    max_decode_bytes: int | None = Field(None, ge=MiB)
    """Memory that requests being decoded and preprocessed may use at once, bytes,
    estimated from the image and video headers before anything is decoded (about
    16 bytes a pixel through decode, RGB conversion and the processor). A request
    that does not fit waits in the bounded queue, or is refused at once when the
    queue is full; one larger than the whole budget is INVALID_ARGUMENT. None:
    two images of max_image_pixels (1.28 GB at the defaults). The process's peak
    stays near this plus the model."""
    min_image_side: int = Field(16, ge=1)
    """Smallest accepted width or height, pixels."""
    image_min_pixels: int = Field(64 * 64, ge=32 * 32)
    """Pixel budget per image after resizing, lower bound (processor min_pixels)."""
    image_max_pixels: int = Field(512 * 512, ge=32 * 32)
    """Pixel budget per image after resizing, upper bound (processor max_pixels):
    bounds image tokens, about pixels / 1024 for Qwen3-VL, before the model runs."""
    max_video_bytes: int = Field(64 * MiB, ge=1024)
    """Encoded bytes per video."""
    max_video_frames: int = Field(32, ge=1, le=768)
    """Frames sampled from a video, at most."""
    default_video_fps: float = Field(2.0, gt=0, le=30)
    """Sampling rate for videos when the request sets none, frames per second."""
    video_max_pixels: int = Field(256 * 256 * 16, ge=32 * 32)
    """Pixel budget for all frames of a video together (processor longest_edge)."""
    max_new_tokens: int = Field(2048, ge=1)
    """Upper limit of DecodingParams.max_new_tokens."""
    default_max_new_tokens: int = Field(512, ge=1)
    """max_new_tokens when a request sets none."""
    max_input_tokens: int = Field(8192, ge=16)
    """Prompt tokens (text, image and video) per request; more is INVALID_ARGUMENT.
    Also capped by the model's context length."""
    json_completion_tokens: int = Field(256, ge=0)
    """Tokens a JSON answer may use past max_new_tokens to close its open
    strings, arrays and objects, so that it always parses."""
    max_batch_items: int = Field(256, ge=1)
    """Images per BatchAnalyze call."""


    @property
    def decode_budget_bytes(self) -> int:
        """max_decode_bytes, or its default derived from max_image_pixels."""
        from atelier.kit.images import DECODE_BYTES_PER_PIXEL

        return self.max_decode_bytes or 2 * self.max_image_pixels * DECODE_BYTES_PER_PIXEL


class Settings(ServiceSettings):
    """Everything the analysis service reads at start (env prefix ``ATELIER_``)."""

    default_grpc_port: ClassVar[int] = GRPC_PORTS["analysis"]
    default_metrics_port: ClassVar[int] = METRICS_PORTS["analysis"]

    analysis: AnalysisEngineSettings = AnalysisEngineSettings()
