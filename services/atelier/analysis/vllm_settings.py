"""Typed settings of the vLLM backend, and their mapping onto vLLM's engine arguments.

``engine_args`` builds vLLM's own ``AsyncEngineArgs`` (a dataclass: names and
types are checked on construction, values when the engine starts), so a wrong
setting is a clear error at service start and a test can build the arguments of
every sample configuration without starting an engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from atelier.kit.settings import Section

if TYPE_CHECKING:
    from atelier.analysis.config import AnalysisEngineSettings

GiB = 1024**3

#: The closing logits processor, by qualified name, loaded by vLLM's engine core.
CLOSING_PROCESSOR = "atelier.analysis.vllm_closing:CloseJsonPastBudget"


class VllmSettings(Section):
    """vLLM engine settings (``analysis.vllm``), used when ``analysis.backend`` is vllm."""

    tensor_parallel_size: int = Field(1, ge=1, le=64)
    """GPUs each model replica's layers are split across (within a node: NVLink)."""
    pipeline_parallel_size: int = Field(1, ge=1, le=64)
    """Stages the layers are split into, one per node group (across nodes)."""
    data_parallel_size: int = Field(1, ge=1, le=64)
    """Replicas of the model inside one engine; with expert parallel, the attention
    layers are data parallel and the experts are spread over all ranks."""
    enable_expert_parallel: bool = False
    """Spread a mixture-of-experts model's experts over the tensor (x data)
    parallel ranks instead of splitting each expert (Qwen3-VL-235B-A22B)."""
    distributed_executor_backend: Literal["mp", "ray"] | None = None
    """How ranks run: ``mp`` (processes on this node) or ``ray`` (a Ray cluster,
    ``RAY_ADDRESS``, for more than one node). None: vLLM chooses (mp on one node)."""
    max_model_len: int | None = Field(None, ge=64)
    """Context length, tokens (prompt plus answer). None: the model's own. Bounds
    the KV cache one sequence may need."""
    max_num_seqs: int = Field(64, ge=1, le=4096)
    """Sequences decoded together at most (continuous batching)."""
    max_num_batched_tokens: int | None = Field(None, ge=64)
    """Tokens scheduled in one engine step (prefill chunks plus decodes). None:
    vLLM's default for the hardware."""
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    """Fraction of each GPU's memory vLLM may use (weights, activations, KV cache)."""
    kv_cache_bytes: int | None = Field(None, ge=16 * 1024**2)
    """KV-cache size per rank, bytes. Required on CPU, where there is no device
    memory to take a fraction of; on GPU it overrides ``gpu_memory_utilization``.
    None on CPU: 1 GiB."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of shared prompt prefixes (task instructions, a
    repeated image) across requests."""
    quantization: str | None = None
    """Weight quantisation method as vLLM names it (``fp8``, ``awq``, ...), or
    None for the checkpoint's own."""
    enforce_eager: bool = False
    """No CUDA graphs (less memory, slower decode); always eager on CPU."""
    trust_remote_code: bool = False
    """Run code shipped with the checkpoint (not needed for Qwen3-VL)."""
    scheduling_policy: Literal["fcfs", "priority"] = "priority"
    """``priority``: AnalyzeRequest.priority orders the queue (lower first, then
    arrival); ``fcfs``: arrival only."""
    seed: int = 0
    """Engine seed; a request's own seed still makes its sampling reproducible."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """Further engine arguments by vLLM's own names, passed through unchanged. An
    unknown name, or a value that does not fit vLLM's annotation, fails at start."""


def engine_args(config: AnalysisEngineSettings, model_path: str, device: str, dtype: str):
    """vLLM ``AsyncEngineArgs`` for ``config``; raises ValueError on a bad setting."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    try:
        return AsyncEngineArgs(**engine_kwargs(config, model_path, device, dtype))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"analysis.vllm: {exc}") from None


def engine_kwargs(config: AnalysisEngineSettings, model_path: str, device: str,
                  dtype: str) -> dict[str, Any]:
    """The engine arguments by vLLM's names (also what ``vllm.LLM`` takes offline)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    v = config.vllm
    kwargs: dict[str, Any] = dict(
        model=model_path,
        tokenizer=model_path,
        dtype=dtype,
        seed=v.seed,
        tensor_parallel_size=v.tensor_parallel_size,
        pipeline_parallel_size=v.pipeline_parallel_size,
        data_parallel_size=v.data_parallel_size,
        enable_expert_parallel=v.enable_expert_parallel,
        distributed_executor_backend=v.distributed_executor_backend,
        max_model_len=v.max_model_len,
        max_num_seqs=v.max_num_seqs,
        max_num_batched_tokens=v.max_num_batched_tokens,
        gpu_memory_utilization=v.gpu_memory_utilization,
        kv_cache_memory_bytes=v.kv_cache_bytes or (GiB if device == "cpu" else None),
        enable_prefix_caching=v.enable_prefix_caching,
        quantization=v.quantization,
        enforce_eager=v.enforce_eager or device == "cpu",
        trust_remote_code=v.trust_remote_code,
        scheduling_policy=v.scheduling_policy,
        # The same media limits and pixel budgets as the transformers backend.
        limit_mm_per_prompt={"image": config.max_images, "video": 1},
        mm_processor_kwargs={
            "images_kwargs": {"size": {"shortest_edge": config.image_min_pixels,
                                       "longest_edge": config.image_max_pixels}},
            "videos_kwargs": {"size": {"shortest_edge": config.image_min_pixels,
                                       "longest_edge": config.video_max_pixels}},
        },
        # JSON arrives as the transformers backend's own grammar (EBNF), compiled by
        # xgrammar as there; no free whitespace should vLLM's JSON options be used.
        structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
        logits_processors=[CLOSING_PROCESSOR],
        generation_config="auto",
        disable_log_stats=False,
    )
    _check_extra(v.extra, AsyncEngineArgs)
    kwargs.update(v.extra)
    return kwargs


def _check_extra(extra: dict[str, Any], args_class: type) -> None:
    """Names of ``extra`` must be engine arguments, and values must fit their
    annotated types (checked with pydantic where the annotation resolves)."""
    import sys

    from pydantic import TypeAdapter, ValidationError

    fields = args_class.__dataclass_fields__
    namespace = vars(sys.modules[args_class.__module__])
    unknown = set(extra) - set(fields)
    if unknown:
        raise ValueError(f"analysis.vllm.extra: vLLM has no engine argument "
                         f"{', '.join(sorted(unknown))}")
    for name, value in extra.items():
        annotation = fields[name].type
        try:
            if isinstance(annotation, str):
                annotation = eval(annotation, namespace)
            adapter = TypeAdapter(annotation)
        except Exception:  # an annotation pydantic cannot model: vLLM checks it at start
            continue
        try:
            adapter.validate_python(value)
        except ValidationError as exc:
            first = exc.errors()[0]["msg"]
            raise ValueError(f"analysis.vllm.extra.{name}: {first}") from None
