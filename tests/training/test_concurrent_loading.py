"""Models loaded by several threads of one process at once (two jobs exporting
together, generation loading two models): each comes out whole, on its device."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from atelier.models.pipelines import load_pipeline
from atelier.training.models import load_models
from atelier.training.train_config import TrainConfig
from tests.training.conftest import spec


def test_models_loaded_in_parallel_threads_are_whole(tiny_sd, tiny_klein_base):
    """accelerate's empty-weights context is process-wide: without one load at a time,
    a module built in another thread meanwhile lands on the meta device."""
    import torch

    train = TrainConfig.from_spec(spec(), "stable-diffusion")

    def trainable():
        return list(load_models(str(tiny_sd), train, 0).trainables.parameters())

    def pipeline():
        pipe = load_pipeline(str(tiny_klein_base), dtype=torch.float32, device="cpu")
        return [p for m in (pipe.transformer, pipe.vae, pipe.text_encoder)
                for p in m.parameters()]

    with ThreadPoolExecutor(4) as pool:
        loads = [pool.submit(trainable), pool.submit(pipeline), pool.submit(trainable),
                 pool.submit(pipeline)]
        params = [p for load in loads for p in load.result()]
    assert params and all(p.device.type == "cpu" for p in params)
