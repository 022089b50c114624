"""Settings of the generation service."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from atelier.kit.settings import Section, ServiceSettings
from atelier.ports import GRPC_PORTS, METRICS_PORTS

GiB = 1024**3


class GenerationEngineSettings(Section):
    """The generation engine: models, batching limits and request bounds."""

    base_models: dict[str, str] = Field(
        default_factory=lambda: {"tiny-sd": "tiny://stable-diffusion",
                                 "tiny-sdxl": "tiny://stable-diffusion-xl",
                                 "tiny-klein-base": "tiny://flux2-klein-base",
                                 "tiny-klein": "tiny://flux2-klein"}
    )
    """Base models by id (``models/{id}``): id -> reference (``tiny://`` name,
    ``store://`` prefix, local path or Hugging Face id). Fine-tuned models are
    discovered in the object store and need no entry here."""
    default_model: str = "tiny-sd"
    """Id of the base model used when a request names none; loaded at start so
    health turns SERVING only once it can generate."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the pipelines run; ``auto`` picks CUDA when available."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Compute dtype. ``auto``: float32 on CPU (exact parity with the diffusers
    reference), bfloat16 on CUDA."""
    max_batch_size: int = Field(16, ge=1, le=256)
    """Most sequences (images) denoised together per step, per model and size.
    With classifier-free guidance each sequence is two UNet samples."""
    max_queue_length: int = Field(64, ge=1, le=10_000)
    """Requests waiting to join the batch; beyond it requests get
    RESOURCE_EXHAUSTED at once. Bounded so latency stays bounded under load."""
    max_images_per_request: int = Field(8, ge=1, le=64)
    """Upper limit of GenerateRequest.num_images."""
    max_candidates: int = Field(16, ge=1, le=64)
    """Upper limit of GenerateRequest.num_candidates (best of N): every candidate is
    a sequence of the request, denoised and decoded like an image it returns, so a
    request's candidates never exceed max_batch_size either."""
    dino_model: str = "tiny://dino"
    """DINO ViT that ranks best-of-N candidates by likeness to a model's subject;
    a reference like the models'. Deployments use ``facebook/dino-vits16``, the
    training service's ``dino_model``, so the ranking matches the scores."""
    max_steps: int = Field(150, ge=1, le=1000)
    """Upper limit of GenerateRequest.num_inference_steps."""
    max_resolution: int = Field(1024, ge=64, le=4096)
    """Upper limit of width and height, pixels."""
    max_input_image_side: int = Field(4096, ge=64, le=16384)
    """Largest side of an init image or mask, pixels. Checked from the image header
    before decoding; the image is then resized to the output size."""
    max_reference_images: int = Field(4, ge=0, le=10)
    """Upper limit of GenerateRequest.reference_images (FLUX.2 [klein]). Each one's
    tokens join every forward of its request: a 1024 px reference adds 4096 tokens
    to the image's, so attention cost grows with their square."""
    max_input_image_bytes: int = Field(32 * 1024**2, ge=1024)
    """Largest encoded init image or mask, bytes. (gRPC's own message limit
    applies too: grpc.max_message_bytes.)"""
    max_decode_bytes: int = Field(1 * GiB, ge=16 * 1024**2)
    """Bytes that init images and masks being decoded and preprocessed may use at
    once (priced from their headers before decoding, at 16 bytes a pixel). A
    request that does not fit waits in a line of max_queue_length, then is
    refused with RESOURCE_EXHAUSTED; one larger than the whole budget is
    INVALID_ARGUMENT."""
    model_cache_bytes: int | None = Field(None, ge=0)
    """Memory budget for loaded models (parameter bytes). Least recently used
    idle models are unloaded to fit a new one; the default model counts too, and
    is unloaded last (it is reloaded by its next request). Unset: on CUDA,
    ``model_cache_fraction`` of the device's total memory; on CPU 8 GiB."""
    model_cache_fraction: float = Field(0.5, gt=0, le=0.95)
    """Share of the CUDA device's total memory that loaded models may hold when
    ``model_cache_bytes`` is unset. The rest is for activations: a batch of 64
    SDXL rows at 1024 px needs tens of GiB, and compiled graphs and CUDA graphs
    keep their own pools."""
    channels_last: bool = True
    """Use channels_last memory format for the UNet on CUDA (faster convs)."""
    decode_wait_steps: int = Field(2, ge=0, le=50)
    """A finished image waits at most this many denoising steps for other images of
    its batch group that finish by then, so they share one VAE decode. Small VAE
    batches are inefficient; 2 steps add tens of milliseconds at most. 0 decodes
    every image as soon as it is done."""
    max_adapters_per_request: int = Field(4, ge=1, le=16)
    """Most LoRA adapters one request may apply (GenerateRequest.adapters, plus a
    LoRA model named in ``model``). Each costs a small matmul pair per targeted
    layer for the request's rows."""
    mix_adapters: bool = True
    """LoRA requests over one base share one UNet forward: the base layers run on
    the whole batch and each row adds its own adapters' deltas. False runs one
    forward per adapter set instead (what the benchmark compares against)."""
    compile_unet: bool = False
    """Compile each UNet with ``torch.compile`` (inductor; a C++ compiler on CPU)
    and pad every forward's batch to the next of ``batch_buckets`` so shapes
    repeat. The default model's buckets are compiled at start, at its native
    size, before health turns SERVING (minutes on CPU); another model or size
    compiles on its first request. Forwards that carry LoRA adapters run eager."""
    cuda_graphs: bool = False
    """With ``compile_unet`` on CUDA, compile in inductor's ``reduce-overhead`` mode:
    each batch bucket's forward is captured once as a CUDA graph and replayed, so a
    step costs one launch instead of hundreds. The graphs keep their own memory
    pool (reported as ``atelier_generation_cuda_graph_bytes``). Off by default:
    it pays off when forwards are short next to their launch overhead (small
    models, small batches), and costs memory. On CPU it compiles as
    ``compile_unet`` alone does."""
    batch_buckets: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    """UNet batch sizes (rows: a guided image is two) a compiled forward is padded
    to. The largest must hold 2 * max_batch_size rows."""
    min_retry_after_s: float = Field(0.5, gt=0)
    """Smallest retry hint sent with RESOURCE_EXHAUSTED, seconds."""
    model_refresh_interval_s: float = Field(10.0, gt=0, le=3600)
    """How often loaded fine-tuned models are checked against the store, seconds:
    a model deleted (DeleteModel on any replica) or replaced there stops being
    served by this replica within this time. Each check lists the model
    manifests once."""

    @model_validator(mode="after")
    def _consistent(self) -> GenerationEngineSettings:
        if self.default_model not in self.base_models:
            raise ValueError(f"default_model {self.default_model!r} is not in base_models")
        if self.max_images_per_request > self.max_batch_size:
            raise ValueError("max_images_per_request must not exceed max_batch_size")
        if self.cuda_graphs and not self.compile_unet:
            raise ValueError("cuda_graphs needs compile_unet (graphs are captured per bucket)")
        buckets = self.batch_buckets
        if not buckets or sorted(set(buckets)) != buckets or buckets[0] < 1:
            raise ValueError("batch_buckets must be increasing positive batch sizes")
        if self.compile_unet and buckets[-1] < 2 * self.max_batch_size:
            raise ValueError(f"the largest of batch_buckets must hold 2 * max_batch_size = "
                             f"{2 * self.max_batch_size} rows")
        largest = 2 * self.max_input_image_side ** 2 * 16  # an init image and its mask
        if self.max_decode_bytes < largest:
            raise ValueError(f"max_decode_bytes must hold an init image and a mask of "
                             f"max_input_image_side px a side: at least {largest} bytes")
        return self


class Settings(ServiceSettings):
    """Everything the generation service reads at start (env prefix ``ATELIER_``)."""

    default_grpc_port: ClassVar[int] = GRPC_PORTS["generation"]
    default_metrics_port: ClassVar[int] = METRICS_PORTS["generation"]

    generation: GenerationEngineSettings = GenerationEngineSettings()
