"""Prometheus metrics of the generation service (``atelier_generation_*``, base units)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from atelier.generation.worker_clock import PHASES

_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
_BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)


class GenerationMetrics:
    """Queue, batch, step, image and model-cache metrics."""

    def __init__(self, registry: CollectorRegistry) -> None:
        p = "atelier_generation_"
        self.queue_depth = Gauge(p + "queue_depth", "Requests waiting to join the batch.",
                                 registry=registry)
        self.active_sequences = Gauge(p + "active_sequences",
                                      "Sequences (images) being denoised.", registry=registry)
        self.batch_size = Histogram(
            p + "batch_size", "Sequences per UNet forward pass (each CFG sequence counts once).",
            buckets=_BATCH_BUCKETS, registry=registry)
        self.forward_adapters = Histogram(
            p + "forward_adapters", "Distinct LoRA adapters applied in one UNet forward pass "
            "(0: base rows only).", buckets=(0, 1, 2, 4, 8, 16, 32, 64), registry=registry)
        self.unet_step_seconds = Histogram(
            p + "unet_step_seconds", "Duration of one batched denoising step, seconds.",
            buckets=_STEP_BUCKETS, registry=registry)
        self.forward_rows = Histogram(
            p + "forward_rows", "Rows per denoiser forward pass: a guided sequence is two "
            "(unconditional and conditional), before any bucket padding.",
            buckets=_BATCH_BUCKETS, registry=registry)
        self.worker_seconds = Counter(
            p + "worker_seconds_total",
            "The denoising worker thread's wall time, seconds, by phase: denoise (denoiser "
            "forwards), scheduler (scheduler steps and guidance), vae_encode, vae_decode, "
            "text_encode, idle (nothing admitted) and other (the rest). On CUDA each phase "
            "is timed between device synchronisations.", ["phase"], registry=registry)
        self.images = Counter(p + "images_total",
                              "Images generated, by model and mode (text-to-image, "
                              "image-to-image, inpaint).", ["model", "mode"], registry=registry)
        self.request_seconds = Histogram(
            p + "request_seconds",
            "Request time by phase: queue_wait (until denoising starts) and compute.",
            ["phase"], buckets=_REQUEST_BUCKETS, registry=registry)
        self.rejected = Counter(p + "requests_rejected_total",
                                "Requests refused with RESOURCE_EXHAUSTED, by reason.",
                                ["reason"], registry=registry)
        self.model_loads = Counter(p + "model_loads_total", "Model loads, by result.",
                                   ["result"], registry=registry)
        self.model_load_seconds = Histogram(
            p + "model_load_seconds", "Time to load a model, seconds.",
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600), registry=registry)
        self.warmup_seconds = Gauge(p + "unet_warmup_seconds",
                                    "Time the compiled UNet's warm-up took at start, seconds "
                                    "(0 when compile_unet is off).", registry=registry)
        self.warm_buckets = Gauge(p + "unet_warm_buckets",
                                  "Batch buckets the compiled UNet was warmed at.",
                                  registry=registry)
        self.model_cache_bytes = Gauge(p + "model_cache_bytes",
                                       "Bytes of model weights held in memory.",
                                       registry=registry)
        self.model_cache_budget_bytes = Gauge(
            p + "model_cache_budget_bytes", "Bytes loaded models may hold "
            "(model_cache_bytes, or model_cache_fraction of the device).", registry=registry)
        self.cuda_graph_bytes = Gauge(
            p + "cuda_graph_bytes", "Device memory the captured CUDA graphs of the compiled "
            "denoiser reserve, bytes (0 when cuda_graphs is off).", registry=registry)
        for phase in PHASES:
            self.worker_seconds.labels(phase)
        for phase in ("queue_wait", "compute"):
            self.request_seconds.labels(phase)
        self.rejected.labels("queue_full")
        for result in ("ok", "error"):
            self.model_loads.labels(result)
