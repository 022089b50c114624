"""One table of training defaults: a spec that sets only what it must trains the same
whichever path builds its config (the service, ``atelier-train run``, a sweep, and
``TrainConfig.from_spec`` on a spec that never went through submission)."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from google.protobuf import json_format

from atelier.client.sweep import Sweep
from atelier.kit.auth import Principal, principal_var
from atelier.kit.metrics import ServerMetrics
from atelier.storage import open_store
from atelier.training import defaults
from atelier.training.bases import base_family
from atelier.training.config import Settings
from atelier.training.engine import TrainingEngine
from atelier.training.jobs import JobStore
from atelier.training.metrics import TrainingMetrics
from atelier.training.standalone import submit_spec_file
from atelier.training.train_config import Method, TrainConfig
from atelier.v1 import common_pb2
from atelier.v1 import training_pb2 as S
from tests.training.conftest import subject_photo


def bare_spec() -> S.TrainingJobSpec:
    """Only what a job must say: its photos, identifier and prompt."""
    return S.TrainingJobSpec(
        instance_images=[common_pb2.ImageInput(data=subject_photo(p)) for p in range(3)],
        identifier_token="sks", instance_prompt="a photo of sks toy")


def comparable(config: TrainConfig, stored: TrainConfig) -> TrainConfig:
    """Without what differs per job by design: the photos' store keys, and the two
    values submission fixes for the job (a random seed, the base's native resolution)."""
    concepts = tuple(dataclasses.replace(c, images=tuple(
        dataclasses.replace(i, key="") for i in c.images)) for c in config.concepts)
    return dataclasses.replace(config, concepts=concepts, seed=stored.seed,
                               resolution=stored.resolution)


@pytest.mark.parametrize("base", ["tiny_sd", "tiny_klein_base"])
def test_an_unset_spec_trains_alike_through_every_path(request, tmp_path, local_settings,
                                                       model_cache, base):
    path = request.getfixturevalue(base)
    settings = Settings(storage=local_settings.model_dump(), models={"cache_dir": model_cache},
                        training={"base_models": {"sd": str(path)},
                                  "default_base_model": "sd"})
    store = open_store(settings.storage)
    jobs = JobStore(store)
    engine = TrainingEngine(settings, TrainingMetrics(ServerMetrics().registry))
    engine.attach(store)
    family = base_family(str(path))

    def through_the_service(spec: S.TrainingJobSpec, job_id: str) -> TrainConfig:
        token = principal_var.set(Principal("alice"))
        try:
            engine._create("", job_id, spec, lambda: False)
        finally:
            principal_var.reset(token)
        return TrainConfig.from_spec(jobs.load(job_id).spec, family)

    service = through_the_service(bare_spec(), "service")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(json_format.MessageToDict(bare_spec())))
    standalone_id = submit_spec_file(settings, store, spec_file, "standalone")
    standalone = TrainConfig.from_spec(jobs.load(standalone_id).spec, family)
    sweep_spec = Sweep(bare_spec(), {"seed": [service.seed]}).specs[0]
    sweep = through_the_service(sweep_spec, "sweep")
    fallback = TrainConfig.from_spec(bare_spec(), family)

    assert service.method is Method.LORA  # was a full fine-tune on the fallback path
    assert service.checkpoint_every == defaults.CHECKPOINT_EVERY
    assert service.learning_rate == defaults.LEARNING_RATE[S.FINE_TUNE_METHOD_LORA]
    # Class images and scored renders sample at the family's own defaults.
    prior = service.concepts[0].prior
    assert (prior.class_image_steps, prior.class_image_guidance_scale) == \
        (service.evaluation.num_inference_steps, service.evaluation.guidance_scale) == \
        ((50, 4.0) if family == "flux2-klein" else (25, 7.5))
    assert service.lora.targets == ("attention_mlp" if family == "flux2-klein" else "attention")
    for other in (standalone, sweep):
        assert comparable(other, service) == comparable(service, service)
    # Whether a job scores its subject is the service's setting
    # (``training.evaluate_subjects``), which a spec that skipped submission never saw.
    fallback = dataclasses.replace(fallback, evaluation=dataclasses.replace(
        fallback.evaluation, enabled=service.evaluation.enabled))
    assert comparable(fallback, service) == comparable(service, service)
    assert sweep.seed == service.seed
