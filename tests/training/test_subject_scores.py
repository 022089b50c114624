"""The subject scores against independent computations: CLIP-T against torchmetrics'
CLIPScore with the same CLIP model, DINO and CLIP-I against transformers' models
used directly; identical images, the evaluation prompts, the quality gate, the best
checkpoint and keep-last-K's protection of it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from atelier.models.subject_scores import Score, ScoringModels, SubjectScores, best_index
from atelier.training import checkpoints
from atelier.training.evaluation import (
    StepScores,
    best_step,
    class_noun,
    concept_prompts,
    gate_failure,
    kept_scores,
    without_identifier,
)
from atelier.training.train_config import (
    ConceptConfig,
    EvaluationConfig,
    PriorConfig,
    QualityGate,
)
from tests.training.conftest import subject_photo


@pytest.fixture(scope="module")
def scoring(tiny_clip, tiny_dino):
    return ScoringModels(str(tiny_clip), str(tiny_dino))


def photos(n: int) -> list[Image.Image]:
    return [Image.open(io.BytesIO(subject_photo(p))).convert("RGB") for p in range(n)]


def noise(seed: int, size: int = 80) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255
                            ).astype("uint8"))


def test_clip_t_is_torchmetrics_clip_score_over_100(scoring, tiny_clip):
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    class Features(CLIPModel):
        """torchmetrics 1.x expects get_*_features to return the tensor that older
        transformers returned; transformers 5 wraps it in an output object."""

        def get_image_features(self, *args, **kwargs):
            return super().get_image_features(*args, **kwargs).pooler_output

        def get_text_features(self, *args, **kwargs):
            return super().get_text_features(*args, **kwargs).pooler_output

    metric = CLIPScore(model_name_or_path=lambda: (Features.from_pretrained(str(tiny_clip)),
                                                   CLIPProcessor.from_pretrained(str(tiny_clip))))
    images = [*photos(3), noise(1, size=96)]
    prompts = ["a photo of a toy", "a red toy on the beach", "a toy in the snow", "a tree"]
    pixels = torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1) for i in images])
    ours = scoring.score(images, prompts, photos(1)).clip_t
    cos = (scoring.clip_image_embeddings(images) * scoring.clip_text_embeddings(prompts)
           ).sum(-1)
    assert ours == pytest.approx(float(cos.mean()), abs=1e-6)  # the mean pair cosine
    # torchmetrics clamps the mean of its batch at 0: pair by pair, and all together.
    per_pair = []
    for i in range(len(images)):
        metric.reset()
        per_pair.append(float(metric(pixels[i:i + 1], prompts[i:i + 1])))
        assert per_pair[-1] == pytest.approx(100 * max(float(cos[i]), 0.0), abs=1e-3)
    assert max(per_pair) > 0  # not only 0 == 0
    metric.reset()
    assert float(metric(pixels, prompts)) == pytest.approx(100 * max(ours, 0.0), abs=1e-3)


def test_dino_and_clip_i_match_a_direct_computation(scoring, tiny_clip, tiny_dino):
    from transformers import CLIPModel, CLIPProcessor, ViTImageProcessor, ViTModel

    generated, real = [noise(2), noise(3), photos(4)[3]], photos(3)
    vit, vit_processor = ViTModel.from_pretrained(str(tiny_dino)), \
        ViTImageProcessor.from_pretrained(str(tiny_dino))
    clip, clip_processor = CLIPModel.from_pretrained(str(tiny_clip)), \
        CLIPProcessor.from_pretrained(str(tiny_clip))

    def dino(images):
        with torch.no_grad():
            out = vit(**vit_processor(images=images, return_tensors="pt"))
        cls = out.last_hidden_state[:, 0]
        return cls / cls.norm(dim=-1, keepdim=True)

    def clip_image(images):
        with torch.no_grad():
            feats = clip.get_image_features(**clip_processor(images=images,
                                                             return_tensors="pt"))
        feats = getattr(feats, "pooler_output", feats)
        return feats / feats.norm(dim=-1, keepdim=True)

    def mean_cos(a, b):
        return float(np.mean([[float(x @ y) for y in b] for x in a]))

    scores = scoring.score(generated, ["a toy"] * 3, real)
    assert scores.dino == pytest.approx(mean_cos(dino(generated), dino(real)), abs=1e-5)
    assert scores.clip_i == pytest.approx(mean_cos(clip_image(generated), clip_image(real)),
                                          abs=1e-5)
    assert scores.images == 3 and scores.drift == 0.0


def test_identical_images_score_one_and_unrelated_ones_lower(scoring):
    real = photos(3)
    for image in real:
        same = scoring.score([image], ["a toy"], [image])
        assert same.dino == pytest.approx(1.0, abs=1e-5)
        assert same.clip_i == pytest.approx(1.0, abs=1e-5)
    subject = real[0]
    alike = subject.filter(ImageFilter.GaussianBlur(1))
    for unrelated in (noise(5), Image.new("RGB", subject.size, (20, 120, 240))):
        assert scoring.score([unrelated], ["a toy"], [subject]).dino < \
            scoring.score([alike], ["a toy"], [subject]).dino
    # Drift: the same class images are no drift at all; other ones are.
    assert scoring.score(real, ["a toy"] * 3, real, tuned_class=real,
                         base_class=real).drift == pytest.approx(0.0, abs=1e-5)
    assert scoring.score(real, ["a toy"] * 3, real, tuned_class=[noise(6)] * 3,
                         base_class=real).drift > 0.05


def test_evaluation_prompts_and_their_clip_t_prompts():
    concept = ConceptConfig("sks", "a photo of sks toy", "a photo of a toy", PriorConfig(), ())
    assert class_noun(concept) == "toy"
    assert class_noun(concept, "robot") == "robot"
    assert class_noun(ConceptConfig("sks", "sks", "a red cat", PriorConfig(), ())) == "cat"
    assert without_identifier("a sks toy on the beach", "sks", "toy") == "a toy on the beach"
    assert without_identifier("a photo of sks", "sks", "toy") == "a photo of toy"
    default = concept_prompts(concept, EvaluationConfig(enabled=True))
    assert ("a sks toy wearing a red hat", "a toy wearing a red hat") in default.prompts
    assert ("a purple sks toy", "a purple toy") in default.prompts
    assert default.class_prompt == "a photo of a toy"
    given = concept_prompts(concept, EvaluationConfig(enabled=True),
                            validation_prompts=["sks toy on the moon", "a cat"])
    assert given.prompts == (("sks toy on the moon", "toy on the moon"),)


def _scores(dino, clip_i=0.5, clip_t=0.3, drift=0.1) -> SubjectScores:
    return SubjectScores(dino=dino, clip_i=clip_i, clip_t=clip_t, drift=drift, images=5)


def test_the_gate_names_each_missed_score_and_its_threshold():
    s = _scores(0.61, clip_t=0.29, drift=0.2)
    assert gate_failure(s, QualityGate()) is None
    assert gate_failure(s, QualityGate(min_dino=0.6, min_clip_t=0.28, max_drift=0.25)) is None
    reason = gate_failure(s, QualityGate(min_dino=0.62, max_drift=0.19, min_clip_t=0.1))
    assert reason == ("dino 0.6100 is below the quality gate's min_dino 0.62; drift 0.2000 "
                      "is above the quality gate's max_drift 0.19")


def test_the_best_checkpoint_and_keep_last_k_protecting_it(local_store):
    history = [StepScores(1, _scores(0.2, drift=0.3)), StepScores(2, _scores(0.7, drift=0.5)),
               StepScores(3, _scores(0.4, drift=0.1))]
    assert best_index([h.scores for h in history], Score.DINO) == 1
    assert best_step(history, Score.DRIFT, [1, 2, 3]).step == 3
    assert best_step(history, Score.DINO, [3]).step == 3  # 2 is no longer stored
    long = [StepScores(i, _scores(0.9 if i == 5 else 0.1)) for i in range(1, 151)]
    kept = kept_scores(long, Score.DINO)
    assert len(kept) == 100 and kept[0].step == 5 and kept[-1].step == 150

    job = "prune"
    for step in (1, 2, 3, 4):
        local_store.put_json(f"{checkpoints.checkpoint_prefix(job, step)}/state.json", {})
        checkpoints.seal(local_store, job, step, {})
    assert checkpoints.prune(local_store, job, 1, protect=[2]) == [2, 4]
    assert checkpoints.complete_steps(local_store, job) == [2, 4]
    assert checkpoints.prune(local_store, job, 1) == [4]
    assert not any(local_store.list(checkpoints.checkpoint_prefix(job, 2) + "/"))


def test_a_run_resumed_from_an_unscored_checkpoint_scores_it(local_settings, tiny_sd,
                                                             model_cache):
    """A run that stopped between sealing its last checkpoint and scoring it: the
    resumed run scores that checkpoint first, so the gate and the best pick see it."""
    from atelier.storage import open_store
    from atelier.training.bases import describe_base
    from atelier.training.config import TrainingEngineSettings
    from atelier.training.evaluation import read_scores, scores_key
    from atelier.training.jobs import JobStore
    from atelier.training.loop import Worker
    from atelier.training.submission import submit_job
    from atelier.training.train_config import TrainConfig
    from atelier.training.worker_config import WorkerConfig, worker_storage
    from atelier.v1 import common_pb2
    from atelier.v1 import training_pb2 as S

    store = open_store(local_settings)
    config = TrainingEngineSettings(base_models={"sd": str(tiny_sd)}, default_base_model="sd")
    job, _ = submit_job(JobStore(store), config, "", "unscored", S.TrainingJobSpec(
        instance_images=[common_pb2.ImageInput(data=subject_photo(p)) for p in range(2)],
        identifier_token="sks", instance_prompt="a photo of sks toy", resolution=64,
        max_train_steps=2, checkpointing=S.CheckpointPolicy(every_n_steps=1, keep_last=2),
        evaluation=S.SubjectEvaluation(enabled=True, num_inference_steps=2,
                                       prompts=["a sks toy in the snow"])),
        base=describe_base(str(tiny_sd)))
    loop_config = WorkerConfig(
        job_id="unscored", train=TrainConfig.from_spec(job.spec),
        storage=worker_storage(local_settings), cache_dir=str(model_cache),
        base_ref=str(tiny_sd), clip_model="tiny://clip", dino_model="tiny://dino")
    Worker(loop_config).train()
    first = read_scores(store, "unscored")
    assert [s.step for s in first] == [1, 2]
    store.put_json(scores_key("unscored"), [first[0].as_dict()])  # step 2 went unscored
    Worker(loop_config).train()  # resumes at step 2 = max_train_steps: no step runs
    again = read_scores(store, "unscored")
    assert [s.step for s in again] == [1, 2] and again[1] == first[1]
