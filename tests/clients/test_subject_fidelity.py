"""Subjects that score themselves, end to end on the three service processes: a 2x2
`atelier train sweep` whose jobs report DINO, CLIP-I, CLIP-T and drift for every
checkpoint and export their best one; the quality gate failing and passing at
thresholds set from a run's own scores; the scores on the Model; and best-of-N
generation, ranked as an independent DINO computation ranks the candidates."""

from __future__ import annotations

import io
import json

import pytest
import yaml
from PIL import Image

from atelier.client import GenerationClient, Sweep, TrainingClient
from atelier.client.sweep import load_spec
from atelier.dev.demo_assets import toy_photo
from atelier.kit.settings import StorageSettings
from atelier.models.subject_scores import ScoringModels
from atelier.storage import open_store
from atelier.training import checkpoints
from atelier.v1 import training_pb2 as T
from tests.clients.conftest import atelier_cli

GRID = ["--grid", "learning_rate=0.0001,0.005", "--grid", "max_train_steps=2,3"]
SCORE_NAMES = ("dino", "clip_i", "clip_t", "drift")


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep")
    for pose in range(3):
        (folder / f"pose-{pose}.png").write_bytes(toy_photo(pose, size=96))
    spec = {
        "instance_images": [{"file": f"pose-{p}.png"} for p in range(3)],
        "identifier_token": "sks", "instance_prompt": "a photo of sks toy",
        "resolution": 64, "method": "FINE_TUNE_METHOD_LORA", "seed": 5,
        "resources": {"num_workers": 1},
        "checkpointing": {"every_n_steps": 1, "keep_last": 1},
        "evaluation": {"num_inference_steps": 3, "export_best_by": "SUBJECT_SCORE_DINO"},
        "model_id": "sweep-toy",
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def sweep(local_services, spec_file):
    target = local_services.targets["training"]
    result = atelier_cli("train", "sweep", str(spec_file), *GRID, "--best-by", "dino",
                         server=target)
    assert result.returncode == 0, result.stdout + result.stderr
    with TrainingClient(target) as client:
        definition = Sweep(load_spec(spec_file), {"learning_rate": ["0.0001", "0.005"],
                                                  "max_train_steps": ["2", "3"]})
        runs = definition.wait(client, definition.submit(client))
    return {"cli": result, "runs": runs, "definition": definition}


def test_a_sweep_scores_every_checkpoint_exports_the_best_and_names_the_winner(
        sweep, local_services, spec_file):
    runs = sweep["runs"]
    assert len({r.job.name for r in runs}) == 4
    store = open_store(StorageSettings(local_root=local_services.store))
    for run in runs:
        job = run.job
        assert job.state == T.TRAINING_JOB_STATE_SUCCEEDED, job.failure_reason
        steps = job.spec.max_train_steps
        # All four scores for every checkpoint, over gRPC.
        assert [s.step for s in job.scores] == list(range(1, steps + 1))
        for s in job.scores:
            assert s.images == 5 and -1 <= s.dino <= 1 and -1 <= s.clip_i <= 1
            assert -1 <= s.clip_t <= 1 and 0 <= s.drift <= 2
        # The best checkpoint by DINO is exported, and keep-last-1 kept it.
        best = max(job.scores, key=lambda s: (s.dino, s.step))
        assert job.exported_step == best.step
        job_id = job.name.removeprefix("trainingJobs/")
        assert checkpoints.complete_steps(store, job_id) == sorted({best.step, steps})
        assert run.scores == best
    # The CLI printed the table and named the same winner as the client's choice.
    winner = Sweep.best(runs, "dino")
    out = sweep["cli"].stdout
    assert f"best by dino: {winner.job.model}" in out
    assert all(r.job.name.removeprefix("trainingJobs/") in out for r in runs), out
    assert {r.job.model for r in runs} == {f"models/sweep-toy-{i}" for i in range(1, 5)}

    # A rerun is the same sweep: the same jobs come back, nothing new starts.
    again = atelier_cli("--json", "train", "sweep", str(spec_file), *GRID, "--detach",
                        server=local_services.targets["training"])
    assert again.returncode == 0, again.stderr
    assert sorted(json.loads(line)["job"] for line in again.stdout.splitlines()) == \
        sorted(r.job.name for r in runs)


def test_models_carry_their_scores(sweep, local_services):
    winner = Sweep.best(sweep["runs"], "dino")
    with GenerationClient(local_services.targets["generation"]) as client:
        model = client.get_model(winner.job.model)
        listed = {m.name: m for m in client.list_models()}
    assert model.scores == winner.scores
    for run in sweep["runs"]:
        assert listed[run.job.model].scores == run.scores


def _gated(spec: T.TrainingJobSpec, model_id: str, **gate) -> T.TrainingJobSpec:
    gated = T.TrainingJobSpec()
    gated.CopyFrom(spec)
    gated.model_id = model_id
    gated.evaluation.quality_gate.CopyFrom(T.QualityGate(**gate))
    return gated


def test_the_gate_fails_and_passes_at_thresholds_from_a_runs_own_scores(sweep,
                                                                        local_services):
    definition, runs = sweep["definition"], sweep["runs"]
    index = next(i for i, r in enumerate(runs) if r is Sweep.best(runs, "dino"))
    scores = runs[index].scores
    spec = definition.specs[index]  # the same job again: the same scores
    with TrainingClient(local_services.targets["training"]) as client:
        failing = client.create_job(_gated(spec, "gate-fail", min_dino=scores.dino + 0.01,
                                           max_drift=scores.drift + 0.01))
        passing = client.create_job(_gated(spec, "gate-pass", min_dino=scores.dino - 0.01,
                                           min_clip_t=scores.clip_t - 0.01))
        events = list(client.watch_job(passing.name, timeout=600))
        failed = client.wait_for_job(failing.name, timeout=600)
        passed = client.get_job(passing.name)
    assert failed.state == T.TRAINING_JOB_STATE_FAILED
    reason = failed.failure_reason
    assert reason.startswith(f"checkpoint step {scores.step} failed the quality gate: dino ")
    assert reason.endswith(" is below the quality gate's min_dino "
                           f"{T.QualityGate(min_dino=scores.dino + 0.01).min_dino:g}")
    assert "drift" not in reason  # within its threshold
    assert not failed.model and failed.scores[-1].dino == scores.dino
    store = open_store(StorageSettings(local_root=local_services.store))
    assert checkpoints.complete_steps(store, failed.name.removeprefix("trainingJobs/"))
    assert passed.state == T.TRAINING_JOB_STATE_SUCCEEDED and passed.model == "models/gate-pass"
    # Watch reports every checkpoint's scores as they come.
    streamed = [e.scores for e in events if e.HasField("scores")]
    assert [s.step for s in streamed] == [s.step for s in passed.scores]
    assert streamed == list(passed.scores)


def _pil(image) -> Image.Image:
    return Image.open(io.BytesIO(image.data)).convert("RGB")


def test_best_of_n_returns_the_candidates_most_like_the_subject(sweep, local_services,
                                                                tiny_dino, tmp_path):
    model = Sweep.best(sweep["runs"], "dino").job.model
    fields = dict(model=model, steps=3, seed=21, width=64, height=64)
    prompt = "a photo of sks toy on the beach"
    with GenerationClient(local_services.targets["generation"]) as client:
        best = client.generate(prompt, num_images=2, num_candidates=4, **fields)
        every = client.generate(prompt, num_images=4, **fields)
    assert not every.subject_similarity and not every.candidates
    # An independent DINO ranking of all four candidates against the subject's photos.
    scoring = ScoringModels(None, str(tiny_dino))
    subject = scoring.dino_embeddings([Image.open(io.BytesIO(toy_photo(p, size=96)))
                                       .convert("RGB") for p in range(3)])
    similarity = scoring.subject_similarity([_pil(i) for i in every.images], subject)
    ranked = sorted(zip(every.seeds, similarity, strict=True), key=lambda c: (-c[1], c[0]))
    assert [c.seed for c in best.candidates] == [seed for seed, _ in ranked]
    assert [c.subject_similarity for c in best.candidates] == pytest.approx(
        [score for _, score in ranked], abs=1e-5)
    assert list(best.seeds) == [seed for seed, _ in ranked[:2]]
    assert list(best.subject_similarity) == pytest.approx([s for _, s in ranked[:2]],
                                                          abs=1e-5)
    by_seed = dict(zip(every.seeds, (i.data for i in every.images), strict=True))
    assert [i.data for i in best.images] == [by_seed[s] for s in best.seeds]

    # The CLI: --candidates, with each image's similarity.
    result = atelier_cli("--json", "generate", prompt, "--model", model, "-n", "1",
                         "--candidates", "3", "--steps", "3", "--seed", "21", "--width", "64",
                         "--height", "64", "-o", str(tmp_path),
                         server=local_services.targets["generation"])
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert len(reply["images"]) == 1 and len(reply["candidates"]) == 3
    assert reply["seeds"] == [reply["candidates"][0]["seed"]]
    first_three = sorted([c for c in ranked if c[0] < 24], key=lambda c: (-c[1], c[0]))
    assert [int(c["seed"]) for c in reply["candidates"]] == [s for s, _ in first_three]

    # A base model has no subject to compare with.
    from atelier.client import FailedPrecondition, InvalidArgument

    with GenerationClient(local_services.targets["generation"]) as client:
        with pytest.raises(FailedPrecondition):
            client.generate(prompt, num_images=1, num_candidates=2, steps=2, width=64,
                            height=64)
        with pytest.raises(InvalidArgument) as bad:
            client.generate(prompt, model=model, num_images=2, num_candidates=1, steps=2)
    assert [v.field for v in bad.value.field_violations] == ["num_candidates"]
