"""The model cache's budget and eviction policy, without a model: which idle model
yields, and what a refusal says when none can."""

from __future__ import annotations

import asyncio

import pytest
import torch
from prometheus_client import CollectorRegistry

from atelier.generation.config import GenerationEngineSettings
from atelier.generation.metrics import GenerationMetrics
from atelier.generation.registry import (
    DEFAULT_CPU_CACHE_BYTES,
    LoadedModel,
    ModelEntry,
    ModelRegistry,
    cache_budget,
)
from atelier.kit.errors import FailedPrecondition, ResourceExhausted


def _registry(tmp_path, budget: int | None = 1000) -> ModelRegistry:
    settings = GenerationEngineSettings(
        base_models={"sd": "tiny://stable-diffusion", "sdxl": "tiny://stable-diffusion-xl",
                     "other": "tiny://stable-diffusion"},
        default_model="sd", model_cache_bytes=budget)
    return ModelRegistry(settings, tmp_path, None, "cpu", torch.float32,
                         GenerationMetrics(CollectorRegistry()))


def _loaded(registry: ModelRegistry, model_id: str, nbytes: int, refs: int = 0,
            last_used: float = 0.0, base: LoadedModel | None = None) -> LoadedModel:
    model = LoadedModel(ModelEntry(model_id, "lora" if base else "base", ""), object(), nbytes,
                        base=base, refs=refs, last_used=last_used)
    registry.loaded[model_id] = model
    return model


def test_the_budget_is_the_setting_or_the_devices_share(tmp_path):
    assert _registry(tmp_path, 1234).budget == 1234
    assert _registry(tmp_path, None).budget == DEFAULT_CPU_CACHE_BYTES
    settings = GenerationEngineSettings(model_cache_fraction=0.25)
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        assert cache_budget(settings, "cuda") == int(total * 0.25)
    assert cache_budget(settings, "cpu") == DEFAULT_CPU_CACHE_BYTES


def test_idle_models_yield_least_recent_first_and_the_default_last(tmp_path):
    registry = _registry(tmp_path)
    _loaded(registry, "sd", 500, last_used=1.0)  # the default model, used longest ago
    _loaded(registry, "other", 300, last_used=3.0)
    asyncio.run(registry._make_room(400, "sdxl"))
    assert set(registry.loaded) == {"sd"}  # the other idle model went first
    asyncio.run(registry._make_room(900, "sdxl"))
    assert registry.loaded == {}  # then the idle default model yields too


def test_a_full_cache_names_what_holds_it(tmp_path):
    registry = _registry(tmp_path)
    base = _loaded(registry, "sd", 600, refs=2)
    _loaded(registry, "other", 300, refs=1, base=base)
    with pytest.raises(ResourceExhausted) as caught:
        asyncio.run(registry._make_room(200, "sdxl"))
    message = str(caught.value)
    assert "to load models/sdxl (200 bytes)" in message, message
    assert "models/sd (600 bytes, the default model; held by 1 request and base of 1 " \
           "loaded model)" in message, message
    assert "models/other (300 bytes; held by 1 request)" in message, message
    assert "busy" not in message
    assert set(registry.loaded) == {"sd", "other"}  # nothing in use was unloaded


def test_a_model_larger_than_the_whole_cache_is_a_precondition(tmp_path):
    registry = _registry(tmp_path)
    with pytest.raises(FailedPrecondition, match="more than the whole model cache"):
        asyncio.run(registry._make_room(5000, "sdxl"))


def test_cuda_graphs_need_the_compiled_denoiser():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="cuda_graphs needs compile_unet"):
        GenerationEngineSettings(cuda_graphs=True)
    assert GenerationEngineSettings(cuda_graphs=True, compile_unet=True).cuda_graphs
