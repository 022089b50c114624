"""A real training service on loopback (local Ray, 2 CPU workers), and subject images."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from PIL import Image, ImageDraw

from atelier.training import app
from atelier.v1 import common_pb2, training_pb2, training_pb2_grpc
from tests.kit.server_thread import ServerThread, start_app

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


def start_training(store_settings, model_cache, **engine) -> ServerThread:
    return start_app(app, storage=store_settings, model_cache=model_cache, section="training",
                     engine={"poll_interval_s": 0.2, **engine})


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             ignore_reinit_error=True)
    yield
    ray.shutdown()


def watch_to_end(stub, name: str, timeout: float = 600) -> list:
    return list(stub.WatchTrainingJob(S.WatchTrainingJobRequest(name=name), timeout=timeout))


@pytest.fixture
def stub_for():
    channels = []

    def make(server: ServerThread):
        channel = grpc.insecure_channel(server.target)
        channels.append(channel)
        return training_pb2_grpc.TrainingServiceStub(channel)

    yield make
    for channel in channels:
        channel.close()
