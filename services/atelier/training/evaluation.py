"""Every checkpoint scores its subject: DINO, CLIP-I, CLIP-T and drift.

Rank 0 renders each concept's evaluation prompts with fixed seeds using the
weights the export would write (the EMA when the job exports it), scores them
against the concept's photos (``atelier.models.subject_scores``), and renders the plain
class prompt with the same seeds to compare with the base model's images of it.
Those are drawn once, before the first step (when the trained weights are still
the base's), and stored with the job, so a resumed run compares against the same
pictures. A multi-concept job's scores are the mean over its concepts.

The scores of every evaluated checkpoint are kept in ``jobs/<id>/scores.json``;
the runner reads them for the quality gate and to pick the best checkpoint.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from PIL import Image

from atelier.kit.images import encode_png
from atelier.models.pipelines import FLUX2_KLEIN, SDXL
from atelier.models.subject_scores import Score, ScoringModels, SubjectScores, best_index
from atelier.storage import ObjectNotFound, ObjectStore
from atelier.training.jobs import job_key
from atelier.training.train_config import ConceptConfig, EvaluationConfig, QualityGate
from atelier.v1 import model_pb2

log = logging.getLogger("atelier.training.evaluation")

#: The default prompts, in the paper's three kinds: recontextualisation,
#: accessory, property. ``{subject}`` becomes "<identifier> <class noun>".
DEFAULT_PROMPTS = ("a {subject} on the beach", "a {subject} in the snow",
                   "a {subject} with a city in the background",
                   "a {subject} wearing a red hat", "a purple {subject}")
#: Scores kept on a job record: the latest ones, and always the best.
MAX_KEPT_SCORES = 100


@dataclass(frozen=True)
class StepScores:
    """The scores of the checkpoint at ``step``."""

    step: int
    scores: SubjectScores

    def as_dict(self) -> dict:
        return {"step": self.step, **self.scores.as_dict()}

    def to_proto(self) -> model_pb2.SubjectScores:
        return model_pb2.SubjectScores(step=self.step, **self.scores.as_dict())

    @classmethod
    def from_dict(cls, data: dict) -> StepScores:
        return cls(data["step"], SubjectScores(**{k: v for k, v in data.items()
                                                  if k != "step"}))


def class_noun(concept: ConceptConfig, configured: str = "") -> str:
    """The class noun: the configured one, else the word after the identifier in the
    instance prompt, else the class prompt's last word."""
    if configured:
        return configured
    words = concept.instance_prompt.split()
    if concept.identifier_token in words:
        after = words.index(concept.identifier_token) + 1
        if after < len(words):
            return words[after].strip(",.")
    return (concept.class_prompt.split() or ["subject"])[-1].strip(",.")


def without_identifier(prompt: str, token: str, noun: str) -> str:
    """CLIP-T's prompt: the identifier replaced by the class noun ("a sks dog" and
    "a sks on the beach" both name "a dog")."""
    words = prompt.split()
    out = []
    for i, word in enumerate(words):
        if word != token:
            out.append(word)
        elif i + 1 >= len(words) or words[i + 1] != noun:
            out.append(noun)
    return " ".join(out)


@dataclass(frozen=True)
class ConceptPrompts:
    """What one concept renders: (prompt, CLIP-T prompt) pairs and its class prompt."""

    prompts: tuple[tuple[str, str], ...]
    class_prompt: str


def concept_prompts(concept: ConceptConfig, config: EvaluationConfig,
                    validation_prompts: Sequence[str] = ()) -> ConceptPrompts:
    noun = class_noun(concept, config.class_noun)
    token = concept.identifier_token
    given = [p for p in (config.prompts or validation_prompts) if token in p.split()]
    prompts = given or [t.format(subject=f"{token} {noun}") for t in DEFAULT_PROMPTS]
    return ConceptPrompts(tuple((p, without_identifier(p, token, noun)) for p in prompts),
                          concept.class_prompt or f"a photo of a {noun}")


def gate_failure(scores: SubjectScores, gate: QualityGate) -> str | None:
    """Why ``scores`` fail ``gate`` (every threshold missed), or None when they pass."""
    missed = []
    for name, score, low in (("min_dino", Score.DINO, True), ("min_clip_i", Score.CLIP_I, True),
                             ("min_clip_t", Score.CLIP_T, True),
                             ("max_drift", Score.DRIFT, False)):
        threshold = getattr(gate, name)
        if threshold is None:
            continue
        value = scores.value(score)
        if (value < threshold) if low else (value > threshold):
            missed.append(f"{score.value} {value:.4f} is {'below' if low else 'above'} the "
                          f"quality gate's {name} {threshold:g}")
    return "; ".join(missed) or None


def scores_key(job_id: str) -> str:
    return job_key(job_id, "scores.json")


def read_scores(store: ObjectStore, job_id: str) -> list[StepScores]:
    try:
        return [StepScores.from_dict(d) for d in store.get_json(scores_key(job_id))]
    except ObjectNotFound:
        return []


def kept_scores(scores: list[StepScores], by: Score) -> list[StepScores]:
    """At most MAX_KEPT_SCORES: the latest, and the best by ``by``."""
    if len(scores) <= MAX_KEPT_SCORES:
        return scores
    best = scores[best_index([s.scores for s in scores], by)]
    tail = scores[-(MAX_KEPT_SCORES - 1):]
    return tail if best in tail else [best, *tail]


def best_step(scores: list[StepScores], by: Score, steps: Sequence[int]) -> StepScores | None:
    """The best of the scored checkpoints still stored (``steps``)."""
    candidates = [s for s in scores if s.step in set(steps)]
    if not candidates:
        return None
    return candidates[best_index([s.scores for s in candidates], by)]


def _rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def pipeline_of(m, scheduler_config, embeddings: dict | None = None):
    """A diffusers pipeline over the run's own modules (DDIM sampling for SD and SDXL;
    klein samples with its own scheduler, its prompts from ``embeddings``, the job's
    text cache)."""
    from diffusers import DDIMScheduler

    from atelier.models.pipelines import pipeline_from_components

    if m.family == FLUX2_KLEIN:
        from diffusers import FlowMatchEulerDiscreteScheduler

        pipe = pipeline_from_components(
            m.family, vae=m.vae, transformer=m.unet, tokenizer=m.tokenizers[0],
            text_encoder=None, is_distilled=False,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_config))
        return CachedPromptPipeline(pipe, embeddings or {})

    components = {"vae": m.vae, "unet": m.unet,
                  "scheduler": DDIMScheduler.from_config(scheduler_config)}
    for i, (tokenizer, encoder) in enumerate(zip(m.tokenizers, m.text_encoders, strict=True)):
        suffix = f"_{i + 1}" if i else ""
        components[f"tokenizer{suffix}"] = tokenizer
        components[f"text_encoder{suffix}"] = encoder
    if m.family != SDXL:
        components["feature_extractor"] = None
    return pipeline_from_components(m.family, **components)


class CachedPromptPipeline:
    """A pipeline without its text encoder: each prompt's states (and the empty negative
    prompt's, for guidance) come from the job's text cache. Called like the pipeline."""

    def __init__(self, pipe, embeddings: dict) -> None:
        self.pipe, self.embeddings = pipe, embeddings

    def _states(self, prompt: str) -> torch.Tensor:
        if prompt not in self.embeddings:
            raise KeyError(f"prompt {prompt!r} is not in the job's text cache")
        hidden = self.embeddings[prompt][0]
        return hidden.to(self.pipe.transformer.device, self.pipe.transformer.dtype)

    def __call__(self, prompt: str, **kwargs):
        return self.pipe(prompt_embeds=self._states(prompt),
                         negative_prompt_embeds=self._states(""), **kwargs)


class Evaluator:
    """Rank 0's scorer of one job: its prompts, photos, base images and past scores."""

    def __init__(self, store: ObjectStore, job_id: str, concepts: Sequence[ConceptConfig],
                 config: EvaluationConfig, *, validation_prompts: Sequence[str],
                 resolution: int, seed: int, scoring: ScoringModels) -> None:
        self.store, self.job_id, self.config = store, job_id, config
        self.resolution, self.seed, self.scoring = resolution, seed, scoring
        self.concepts = [concept_prompts(c, config, validation_prompts) for c in concepts]
        self.photos = [[_rgb(store.get_bytes(i.key)) for i in c.images] for c in concepts]
        self.history = read_scores(store, job_id)

    # -- rendering ----------------------------------------------------------------------
    def _render(self, pipe, prompt: str, first_seed: int) -> list[Image.Image]:
        n = self.config.images_per_prompt
        generators = [torch.Generator().manual_seed(first_seed + k) for k in range(n)]
        return pipe(prompt, num_images_per_prompt=n, generator=generators,
                    num_inference_steps=self.config.num_inference_steps,
                    guidance_scale=self.config.guidance_scale, height=self.resolution,
                    width=self.resolution).images

    def _class_images(self, pipe, index: int) -> list[Image.Image]:
        """The class prompt at the seeds of the concept's evaluation prompts."""
        out = []
        for j in range(len(self.concepts[index].prompts)):
            out += self._render(pipe, self.concepts[index].class_prompt, self._seed(j))
        return out

    def _seed(self, prompt_index: int) -> int:
        return self.seed + prompt_index * self.config.images_per_prompt

    def _base_key(self, index: int, k: int) -> str:
        return job_key(self.job_id, "evaluation", "base", f"{index}-{k}.png")

    def store_base_images(self, pipe) -> None:
        """Render and store the base model's class images (the drift reference), once."""
        index_key = job_key(self.job_id, "evaluation", "base", "index.json")
        if self.store.exists(index_key):
            return
        counts = []
        with torch.no_grad():
            for index in range(len(self.concepts)):
                images = self._class_images(pipe, index)
                for k, image in enumerate(images):
                    self.store.put_bytes(self._base_key(index, k), encode_png(image), "image/png")
                counts.append(len(images))
        self.store.put_json(index_key, {"counts": counts})

    def _base_images(self, index: int) -> list[Image.Image]:
        index_key = job_key(self.job_id, "evaluation", "base", "index.json")
        counts = self.store.get_json(index_key)["counts"]
        return [_rgb(self.store.get_bytes(self._base_key(index, k)))
                for k in range(counts[index])]

    # -- scoring ------------------------------------------------------------------------
    def evaluate(self, step: int, pipe) -> StepScores:
        """Render with the pipeline's current weights, score, record and return."""
        per_concept = []
        with torch.no_grad():
            for index, concept in enumerate(self.concepts):
                generated, clip_prompts = [], []
                for j, (prompt, clip_prompt) in enumerate(concept.prompts):
                    images = self._render(pipe, prompt, self._seed(j))
                    generated += images
                    clip_prompts += [clip_prompt] * len(images)
                per_concept.append(self.scoring.score(
                    generated, clip_prompts, self.photos[index],
                    tuned_class=self._class_images(pipe, index),
                    base_class=self._base_images(index)))
        result = StepScores(step, _mean(per_concept))
        self.history = [s for s in self.history if s.step != step] + [result]
        self.history = kept_scores(self.history, self.config.export_best_by or Score.DINO)
        self.store.put_json(scores_key(self.job_id), [s.as_dict() for s in self.history])
        return result

    def best(self, steps: Sequence[int]) -> StepScores | None:
        """The current best of the stored checkpoints, by the export's score."""
        if self.config.export_best_by is None:
            return None
        return best_step(self.history, self.config.export_best_by, steps)


def _mean(scores: list[SubjectScores]) -> SubjectScores:
    n = len(scores)
    first = scores[0]
    return replace(first, **{name: sum(getattr(s, name) for s in scores) / n
                             for name in ("dino", "clip_i", "clip_t", "drift")},
                   images=sum(s.images for s in scores))
