"""A real training service on loopback, in its own process with its own local Ray
(2 CPUs), as `make up` runs it; and subject images.

The service runs out of the test process so that Ray's driver, its native threads
and its forked daemons never share a process with pytest: a crash there fails one
test instead of the whole run."""

from __future__ import annotations

import io
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image, ImageDraw

from atelier.dev import local_stack
from atelier.kit.settings import StorageSettings
from atelier.v1 import common_pb2, training_pb2, training_pb2_grpc

S = training_pb2


def subject_photo(pose: int, size: int = 96) -> bytes:
    """A drawn toy: a round body and a head, in one of a few poses."""
    image = Image.new("RGB", (size, size), (230, 230, 220))
    draw = ImageDraw.Draw(image)
    dx = (pose - 1.5) * 10
    draw.ellipse((28 + dx, 40, 68 + dx, 80), fill=(200, 60, 40))
    draw.ellipse((38 + dx * 1.5, 18, 58 + dx * 1.5, 38), fill=(240, 190, 60))
    noise = (np.random.RandomState(pose).rand(size, size, 3) * 20).astype("uint8")
    image = Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype("uint8"))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def spec(**overrides) -> S.TrainingJobSpec:
    base = dict(
        instance_images=[common_pb2.ImageInput(data=subject_photo(p)) for p in range(4)],
        identifier_token="sks", instance_prompt="a photo of sks toy",
        class_prompt="a photo of a toy",
        prior_preservation=S.PriorPreservation(enabled=True, num_class_images=4,
                                               class_image_steps=2),
        text_encoder=S.TextEncoderTraining(enabled=True),
        resolution=64, max_train_steps=4, train_batch_size=1, seed=7,
        resources=S.TrainingResources(num_workers=2),
        checkpointing=S.CheckpointPolicy(every_n_steps=2, keep_last=2),
    )
    base.update(overrides)
    return S.TrainingJobSpec(**base)


@dataclass
class TrainingProcess:
    """A training service process: its gRPC target and /metrics port."""

    target: str
    metrics_port: int
    proc: subprocess.Popen

    def stop(self, timeout: float = 240) -> None:
        """SIGTERM (running jobs checkpoint and stop; Ray shuts down), then wait."""
        codes = local_stack.stop({"training": self.proc}, timeout=timeout)
        assert codes == {"training": 0}, f"the training service exited {codes}"


def storage_env(settings: StorageSettings) -> dict[str, str]:
    """StorageSettings as the ATELIER_STORAGE__* variables a service process reads."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        elif isinstance(value, Path):
            value = str(Path(value).resolve())
        env[f"ATELIER_STORAGE__{name.upper()}"] = str(value).lower() if isinstance(
            value, bool) else str(value)
    return env


def start_training(store_settings: StorageSettings, model_cache, faults: dict | None = None,
                   **engine) -> TrainingProcess:
    """Start the service on free ports with ``engine`` settings and injected ``faults``
    (``atelier.training.faults.Faults`` fields), and wait until it is SERVING."""
    from tests.conftest import free_port

    svc = local_stack.LocalService("training", free_port(), free_port(),
                                   "atelier.v1.TrainingService",
                                   "tests.training.service_with_faults" if faults else "")
    # Jobs score their subject only when their spec asks (evaluation.enabled): most
    # tests here are about something else, and the scores cost renders at every checkpoint.
    env = {**storage_env(store_settings), "ATELIER_MODELS__CACHE_DIR": str(model_cache),
           "ATELIER_TRAINING__POLL_INTERVAL_S": "0.2", "ATELIER_TRAINING__LOCAL_RAY_CPUS": "2",
           "ATELIER_TRAINING__EVALUATE_SUBJECTS": "false",
           **{f"ATELIER_TRAINING__{k.upper()}": str(v) for k, v in engine.items()}}
    procs = local_stack.start([svc], log_level="WARNING", env=env, argv=[json.dumps(faults)]
                              if faults else ())
    try:
        local_stack.wait_serving([svc], procs, timeout=300)
    except Exception:
        local_stack.stop(procs)
        raise
    return TrainingProcess(svc.target, svc.metrics_port, procs["training"])


def watch_to_end(stub, name: str, timeout: float = 600) -> list:
    return list(stub.WatchTrainingJob(S.WatchTrainingJobRequest(name=name), timeout=timeout))


@pytest.fixture
def stub_for():
    channels = []

    def make(server: TrainingProcess):
        channel = grpc.insecure_channel(server.target)
        channels.append(channel)
        return training_pb2_grpc.TrainingServiceStub(channel)

    yield make
    for channel in channels:
        channel.close()


@pytest.fixture
def local_store(local_settings):
    from atelier.storage import open_store

    return open_store(local_settings)
