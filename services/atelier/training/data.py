"""Training examples: instance and class images, bucketed, augmented and batched.

Which examples a rank sees at a step, and how they are cropped and flipped, is
a pure function of (seed, step, micro-step, rank), so a resumed run sees exactly
what an uninterrupted one would have, with no data-loader state to save:

- **The instance stream.** Each epoch is a seeded permutation of every instance
  image of every concept, split by bucket (``buckets.py``) into micro-batches of
  ``train_batch_size`` (the last batch of a bucket is filled from that bucket's
  start), in a seeded batch order. Micro-batch number
  ``(step * accumulation + micro) * world + rank`` of the stream is one rank's,
  so every rank gets a distinct batch at each step.
- **Prior rows.** Each instance row brings one prior row of its own concept:
  a class image (that concept's own seeded stream, cropped to the batch's
  bucket) or, with the base-model prior, its own noisy latents again.
- **Augmentation.** Three seeded numbers per row: the crop offsets and the flip.

:class:`Examples` turns a :class:`MicroPlan` into a ``method.Batch``, from the
images (crop, flip, to tensors) or from the latent cache (``latent_cache.py``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from atelier.models.pipelines import SDXL
from atelier.training.buckets import Placement, buckets, nearest_bucket, place
from atelier.training.method import Batch
from atelier.training.train_config import PriorSource, TrainConfig

INSTANCE, CLASS_IMAGE, BASE_PRIOR = "instance", "class", "base"


def seeded(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from integers (stable across processes and runs)."""
    seed = 0x9E3779B97F4A7C15
    for part in parts:
        seed = (seed * 6364136223846793005 + (part & 0xFFFFFFFFFFFFFFFF) + 1442695040888963407) \
            % (1 << 63)
    return torch.Generator(device=device).manual_seed(seed)


def load_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def mask_of(image: Image.Image, mask_data: bytes | None, from_alpha: bool) -> Image.Image | None:
    """A stored mask, or the image's alpha channel, as an ``L`` image; None without one."""
    if from_alpha:
        return image.convert("RGBA").getchannel("A")
    if mask_data is None:
        return None
    return load_image(mask_data).convert("L")


@dataclass
class Instance:
    image: Image.Image  # RGB
    mask: Image.Image | None  # L
    prompt: str
    concept: int
    bucket: tuple[int, int]


@dataclass(frozen=True)
class Row:
    """One row of a micro-batch: what it shows and how it is augmented."""

    kind: str  # INSTANCE, CLASS_IMAGE or BASE_PRIOR
    concept: int
    index: int  # the instance (INSTANCE, BASE_PRIOR) or class image (CLASS_IMAGE)
    draws: tuple[float, float, float]  # crop x, crop y, flip


@dataclass(frozen=True)
class MicroPlan:
    bucket: tuple[int, int]
    rows: list[Row]

    @property
    def num_instance(self) -> int:
        return sum(1 for r in self.rows if r.kind == INSTANCE)


def epoch_batches(instance_buckets: list[tuple[int, int]], per_rank: int, seed: int,
                  epoch: int) -> list[list[int]]:
    """The micro-batches (instance indices, one bucket each) of one epoch, in order."""
    order = torch.randperm(len(instance_buckets), generator=seeded(seed, 0, epoch)).tolist()
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index in order:
        by_bucket.setdefault(instance_buckets[index], []).append(index)
    batches = []
    for members in by_bucket.values():
        for start in range(0, len(members), per_rank):
            batches.append([members[(start + k) % len(members)] for k in range(per_rank)])
    shuffle = torch.randperm(len(batches), generator=seeded(seed, 2, epoch)).tolist()
    return [batches[i] for i in shuffle]


def batches_per_epoch(instance_buckets: list[tuple[int, int]], per_rank: int) -> int:
    counts: dict[tuple[int, int], int] = {}
    for bucket in instance_buckets:
        counts[bucket] = counts.get(bucket, 0) + 1
    return sum(-(-n // per_rank) for n in counts.values())


def pick(count: int, stream: int, pos: int, seed: int) -> int:
    """The example at position ``pos`` of a stream of seeded epoch orders of ``count``."""
    epoch, offset = divmod(pos, count)
    return torch.randperm(count, generator=seeded(seed, stream, epoch)).tolist()[offset]


@dataclass
class Examples:
    """A run's decoded examples and the batching rule over them."""

    spec: TrainConfig
    instances: list[Instance]
    class_images: dict[int, list[Image.Image]]  # by concept
    _batches: dict = field(default_factory=dict, repr=False)
    _resize_cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, spec: TrainConfig, read, class_keys: dict[int, list[str]]) -> Examples:
        """Decode every image, mask and class image (``read``: key -> bytes)."""
        candidates = buckets(spec.resolution, spec.options.aspect_ratio_bucketing)
        instances = []
        for ci, concept in enumerate(spec.concepts):
            for example in concept.images:
                raw = load_image(read(example.key))
                mask = mask_of(raw, read(example.mask_key) if example.mask_key else None,
                               example.mask_from_alpha)
                instances.append(Instance(raw.convert("RGB"), mask, example.prompt, ci,
                                          nearest_bucket(raw.size, candidates)))
        classes = {ci: [load_image(read(k)).convert("RGB") for k in keys]
                   for ci, keys in class_keys.items()}
        return cls(spec, instances, classes)

    @property
    def instance_buckets(self) -> list[tuple[int, int]]:
        return [i.bucket for i in self.instances]

    def plan(self, *, step: int, micro: int, rank: int, world: int) -> MicroPlan:
        """The rows of one rank's micro-batch."""
        spec = self.spec
        per_rank = spec.train_batch_size
        number = (step * spec.gradient_accumulation_steps + micro) * world + rank
        epoch, offset = divmod(number, batches_per_epoch(self.instance_buckets, per_rank))
        if epoch not in self._batches:
            self._batches = {epoch: epoch_batches(self.instance_buckets, per_rank,
                                                  spec.seed, epoch)}
        members = self._batches[epoch][offset]
        rows, class_rows, base_rows = [], [], []
        for slot, index in enumerate(members):
            pos = number * per_rank + slot
            concept = self.instances[index].concept
            rows.append(Row(INSTANCE, concept, index, _draws(spec.seed, 10, pos)))
            prior = spec.concepts[concept].prior
            if not prior.enabled:
                continue
            if prior.source is PriorSource.BASE_MODEL:
                base_rows.append(Row(BASE_PRIOR, concept, slot, (0.0, 0.0, 0.0)))
            else:
                images = self.class_images[concept]
                class_rows.append(Row(CLASS_IMAGE, concept,
                                      pick(len(images), 1 + concept, pos, spec.seed),
                                      _draws(spec.seed, 11 + concept, pos)))
        return MicroPlan(self.instances[members[0]].bucket, rows + class_rows + base_rows)

    # -- rows to tensors ------------------------------------------------------------------
    def placement(self, row: Row, bucket: tuple[int, int]) -> tuple[Placement, bool]:
        """Where a row's image goes in ``bucket``, and whether it is flipped. Cached
        latents have one (centred) crop."""
        options = self.spec.options
        image = self.instances[row.index].image if row.kind == INSTANCE else \
            self.class_images[row.concept][row.index]
        center = options.center_crop or options.cache_latents
        flip = options.random_flip and row.draws[2] < 0.5
        return place(image.size, bucket, row.draws[:2], center), flip

    def _resized(self, row: Row, which: str, size: tuple[int, int]) -> Image.Image:
        """A row's image (or mask) resized to ``size``, computed once."""
        key = (row.kind == INSTANCE, row.concept, row.index, which, size)
        if key not in self._resize_cache:
            if which == "mask":
                image, resample = self.instances[row.index].mask, Image.BILINEAR
            elif row.kind == INSTANCE:
                image, resample = self.instances[row.index].image, Image.BICUBIC
            else:
                image, resample = self.class_images[row.concept][row.index], Image.BICUBIC
            self._resize_cache[key] = image.resize(size, resample)
        return self._resize_cache[key]

    def pixels(self, row: Row, bucket: tuple[int, int]) -> torch.Tensor:
        """A row's image, placed and maybe flipped, as a [-1, 1] CHW tensor."""
        where, flip = self.placement(row, bucket)
        image = crop(self._resized(row, "image", where.resized), where, flip)
        return to_tensor(image) / 127.5 - 1.0

    def mask(self, row: Row, bucket: tuple[int, int]) -> torch.Tensor:
        """An instance row's per-pixel loss weights, [1, H, W]."""
        instance = self.instances[row.index]
        if instance.mask is None:
            return torch.ones(1, bucket[1], bucket[0])
        where, flip = self.placement(row, bucket)
        mask = to_tensor(crop(self._resized(row, "mask", where.resized), where, flip)) / 255.0
        outside = self.spec.options.masked_loss_outside_weight
        return mask + (1.0 - mask) * outside

    def prompts(self, plan: MicroPlan) -> list[str]:
        return [self.instances[r.index].prompt if r.kind == INSTANCE
                else self.spec.concepts[r.concept].class_prompt for r in plan.rows]

    def batch(self, plan: MicroPlan, token_ids, *, latents=None, embeddings=None) -> Batch:
        """The plan's ``Batch``. ``token_ids``: prompt -> ids per encoder; ``latents``: the
        latent cache (else pixels); ``embeddings``: cached text conditioning (prompt ->
        (hidden, pooled)) when the text encoders are frozen."""
        bucket, rows = plan.bucket, plan.rows
        instance_rows = [r for r in rows if r.kind == INSTANCE]
        image_rows = [r for r in rows if r.kind != BASE_PRIOR]
        prompts = self.prompts(plan)
        encoders = len(token_ids.get(prompts[0], ()))  # none: cached conditioning only
        out = Batch(num_instance=len(instance_rows),
                    input_ids=[torch.stack([token_ids[p][e] for p in prompts])
                               for e in range(encoders)])
        if latents is not None:
            out.latent_params = torch.stack([latents.params(self, r, bucket)
                                             for r in image_rows])
        else:
            out.pixels = torch.stack([self.pixels(r, bucket) for r in image_rows])
        if embeddings is not None:
            hidden = torch.cat([embeddings[p][0] for p in prompts])
            pooled = None if embeddings[prompts[0]][1] is None else \
                torch.cat([embeddings[p][1] for p in prompts])
            out.embeddings = (hidden, pooled)
        if any(self.instances[r.index].mask is not None for r in instance_rows):
            out.masks = torch.stack([self.mask(r, bucket) for r in instance_rows])
        if self.spec.family == SDXL:  # the UNet's micro-conditioning
            ids = [self.placement(r if r.kind != BASE_PRIOR else instance_rows[r.index],
                                  bucket)[0].time_ids() for r in rows]
            out.time_ids = torch.tensor(ids, dtype=torch.float32)
        prior = [r for r in rows if r.kind != INSTANCE]
        out.prior_weights = torch.tensor(
            [self.spec.concepts[r.concept].prior.loss_weight for r in prior],
            dtype=torch.float32)
        out.base_rows = torch.tensor([r.index for r in rows if r.kind == BASE_PRIOR],
                                     dtype=torch.long)
        return out


def _draws(seed: int, stream: int, pos: int) -> tuple[float, float, float]:
    values = torch.rand(3, generator=seeded(seed, stream, pos)).tolist()
    return values[0], values[1], values[2]


def crop(resized: Image.Image, where: Placement, flip: bool) -> Image.Image:
    """An image already resized as ``where`` says, cropped to its bucket, maybe flipped."""
    left, top = where.crop
    out = resized.crop((left, top, left + where.bucket[0], top + where.bucket[1]))
    return out.transpose(Image.FLIP_LEFT_RIGHT) if flip else out


def to_tensor(image: Image.Image) -> torch.Tensor:
    """CHW float32 (0..255) of an RGB or L image."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
