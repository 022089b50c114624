"""Prometheus metrics of the analysis service (``atelier_analysis_*``, base units)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TASKS = ("VQA", "DOCUMENT", "CHART", "VIDEO", "OCR", "GENERAL", "GROUNDING")


class AnalysisMetrics:
    """Requests, time to first token, tokens, batches, queue and image tokens."""

    def __init__(self, registry: CollectorRegistry) -> None:
        p = "atelier_analysis_"
        self.registry = registry
        self.requests = Counter(p + "requests_total", "Analysis requests, by task.", ["task"],
                                registry=registry)
        self.ttft = Histogram(
            p + "time_to_first_token_seconds", "From arrival to the first generated token.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry)
        self.tokens = Counter(p + "generated_tokens_total", "Tokens generated.",
                              registry=registry)
        self.tokens_per_second = Gauge(
            p + "generate_tokens_per_second",
            "Tokens per second of the last batched generate call (all rows).",
            registry=registry)
        self.batch_size = Histogram(p + "batch_size", "Requests per generate call.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                                    registry=registry)
        self.queue_depth = Gauge(p + "queue_depth", "Requests waiting for a batch.",
                                 registry=registry)
        self.image_tokens = Histogram(
            p + "image_tokens_per_request", "Image and video tokens in one request's prompt.",
            buckets=(0, 16, 64, 256, 1024, 4096, 16384), registry=registry)
        self.decode_bytes = Gauge(
            p + "decode_budget_bytes_in_use",
            "Estimated bytes held by requests being decoded and preprocessed.",
            registry=registry)
        self.rejected = Counter(p + "requests_rejected_total",
                                "Requests refused with RESOURCE_EXHAUSTED, by reason.",
                                ["reason"], registry=registry)
        for task in TASKS:
            self.requests.labels(task)
        self.rejected.labels("queue_full")
