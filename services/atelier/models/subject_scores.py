"""How much a generated image looks like the subject, and follows its prompt.

The DreamBooth paper's three measures, plus the drift it worries about:

- **DINO**: mean cosine similarity between the class-token embeddings of a
  self-supervised ViT (DINO ViT-S/16) of generated and real subject images, over
  every (generated, real) pair. It tells apart subjects of one class.
- **CLIP-I**: the same with CLIP's projected image embeddings.
- **CLIP-T**: mean cosine over (image, its prompt) pairs between CLIP's image and
  text embeddings; torchmetrics' ``CLIPScore`` reports ``100 * max(CLIP-T, 0)``.
- **drift**: ``1 - mean paired DINO cosine`` between the fine-tuned model's and the
  base model's images of the plain class prompt, drawn with the same seeds. 0 means
  the class still renders as the base rendered it; it grows as the model forgets.

The models are references like every other (hub id, local path, store prefix,
``tiny://``); the training job and best-of-N generation both score through
:class:`ScoringModels`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum

import torch

from atelier.models.runtime import one_load_at_a_time

#: What a deployment should score with: the paper's DINO, and torchmetrics' CLIP.
RECOMMENDED_DINO = "facebook/dino-vits16"
RECOMMENDED_CLIP = "openai/clip-vit-large-patch14"


class Score(StrEnum):
    """A subject score by name; every one but ``drift`` is better when higher."""

    DINO = "dino"
    CLIP_I = "clip_i"
    CLIP_T = "clip_t"
    DRIFT = "drift"

    @property
    def higher_is_better(self) -> bool:
        return self is not Score.DRIFT


@dataclass(frozen=True)
class SubjectScores:
    """One evaluation's scores (see the module's docstring for each)."""

    dino: float
    clip_i: float
    clip_t: float
    drift: float
    images: int
    """Generated images scored."""

    def value(self, score: Score) -> float:
        return getattr(self, score.value)

    def as_dict(self) -> dict:
        return asdict(self)


def best_index(scores: Sequence[SubjectScores], by: Score) -> int:
    """The index of the best of ``scores`` by ``by`` (the latest of equals)."""
    sign = 1.0 if by.higher_is_better else -1.0
    return max(range(len(scores)), key=lambda i: (sign * scores[i].value(by), i))


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over every pair of rows of two unit-norm embedding matrices."""
    return float((a @ b.T).mean())


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of row i of ``a`` with row i of ``b`` (unit-norm rows)."""
    return (a * b).sum(dim=-1)


def clip_t(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> float:
    """Mean cosine of each image with its own prompt."""
    return float(paired_cosine(image_embeddings, text_embeddings).mean())


def drift(tuned: torch.Tensor, base: torch.Tensor) -> float:
    """``1 -`` mean paired DINO cosine of the same seeds' class images."""
    return 1.0 - float(paired_cosine(tuned, base).mean())


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _features(output) -> torch.Tensor:
    """A projected-features tensor from transformers' get_*_features (a tensor, or in
    newer releases an output object holding it)."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


class ScoringModels:
    """A CLIP model and a DINO ViT with their processors, in eval mode on one device.
    ``clip_path`` None loads DINO only (best-of-N generation needs no more)."""

    @one_load_at_a_time
    def __init__(self, clip_path: str | None, dino_path: str,
                 device: str | torch.device = "cpu") -> None:
        from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

        self.device = torch.device(device)
        if clip_path is not None:
            self.clip = CLIPModel.from_pretrained(clip_path, use_safetensors=True).eval().to(
                self.device)
            self.clip_processor = CLIPProcessor.from_pretrained(clip_path)
        self.dino = AutoModel.from_pretrained(dino_path, use_safetensors=True).eval().to(
            self.device)
        self.dino_processor = AutoImageProcessor.from_pretrained(dino_path)

    @torch.no_grad()
    def dino_embeddings(self, images: Sequence) -> torch.Tensor:
        """Unit-norm class-token embeddings of PIL images, [N, D], on the CPU."""
        pixels = self.dino_processor(images=list(images), return_tensors="pt").pixel_values
        hidden = self.dino(pixel_values=pixels.to(self.device)).last_hidden_state
        return _unit(hidden[:, 0]).cpu()

    @torch.no_grad()
    def clip_image_embeddings(self, images: Sequence) -> torch.Tensor:
        pixels = self.clip_processor(images=list(images), return_tensors="pt").pixel_values
        return _unit(_features(self.clip.get_image_features(
            pixel_values=pixels.to(self.device)))).cpu()

    @torch.no_grad()
    def clip_text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.clip_processor.tokenizer(list(texts), padding=True, truncation=True,
                                               return_tensors="pt")
        return _unit(_features(self.clip.get_text_features(
            input_ids=tokens.input_ids.to(self.device),
            attention_mask=tokens.attention_mask.to(self.device)))).cpu()

    def subject_similarity(self, images: Sequence, subject: torch.Tensor) -> list[float]:
        """Each image's mean DINO cosine with the subject's photo embeddings."""
        return (self.dino_embeddings(images) @ subject.T).mean(dim=1).tolist()

    def score(self, generated: Sequence, clip_prompts: Sequence[str], real: Sequence,
              tuned_class: Sequence = (), base_class: Sequence = ()) -> SubjectScores:
        """Scores of ``generated`` images (image i rendered for ``clip_prompts[i]``,
        the prompt with the identifier replaced by the class noun) against the ``real``
        subject images; drift from the class images of the tuned and base models
        (drawn with the same seeds, in the same order; 0 when none are given)."""
        dino_generated = self.dino_embeddings(generated)
        dino_real = self.dino_embeddings(real)
        clip_generated = self.clip_image_embeddings(generated)
        return SubjectScores(
            dino=mean_pairwise_cosine(dino_generated, dino_real),
            clip_i=mean_pairwise_cosine(clip_generated, self.clip_image_embeddings(real)),
            clip_t=clip_t(clip_generated, self.clip_text_embeddings(clip_prompts)),
            drift=drift(self.dino_embeddings(tuned_class), self.dino_embeddings(base_class))
            if tuned_class and base_class else 0.0,
            images=len(generated))
