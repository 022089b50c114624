"""Training examples: instance and class images, augmented and batched per step.

Which examples a rank sees at a step, and how they are flipped and cropped, is
a pure function of (seed, step, micro-step, rank). Each epoch is a seeded
permutation; the global stream of examples is split so every rank gets a
distinct shard of each step. Resuming at step k therefore reproduces exactly
what an uninterrupted run would have seen, with no data-loader state to save.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image


def seeded(*parts: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from integers (stable across processes and runs)."""
    seed = 0x9E3779B97F4A7C15
    for part in parts:
        seed = (seed * 6364136223846793005 + (part & 0xFFFFFFFFFFFFFFFF) + 1442695040888963407) \
            % (1 << 63)
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class ExampleSet:
    """Decoded images of one kind (instance or class) and the prompt they share."""

    images: list[Image.Image]
    prompt: str
    _resized: dict = field(default_factory=dict, repr=False)

    def resized(self, index: int, resolution: int) -> Image.Image:
        """Image ``index`` with its short side at ``resolution`` (computed once)."""
        key = (index, resolution)
        if key not in self._resized:
            self._resized[key] = resize_short_side(self.images[index], resolution)
        return self._resized[key]


def load_images(blobs: list[bytes]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]


def resize_short_side(image: Image.Image, resolution: int) -> Image.Image:
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    return image.resize(size, Image.BICUBIC)


def augment(image: Image.Image, resolution: int, generator: torch.Generator,
            random_flip: bool, center_crop: bool) -> torch.Tensor:
    """Crop an image whose short side is ``resolution`` to a square, maybe flip it;
    return it as a [-1, 1] CHW tensor."""
    size = image.size
    # Always draw the same numbers, so the stream does not depend on the options.
    draws = torch.rand(3, generator=generator).tolist()
    if center_crop:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    else:
        left = int(draws[0] * (size[0] - resolution + 1))
        top = int(draws[1] * (size[1] - resolution + 1))
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and draws[2] < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def positions(step: int, micro: int, rank: int, world: int, accumulation: int,
              per_rank: int) -> list[int]:
    """Global positions in the example stream for one rank's micro-batch."""
    first = ((step * accumulation + micro) * world + rank) * per_rank
    return list(range(first, first + per_rank))


def pick(examples: ExampleSet, stream: int, pos: int, seed: int) -> tuple[int, int]:
    """(example index, augmentation key) of position ``pos`` in a seeded epoch order."""
    count = len(examples.images)
    epoch, offset = divmod(pos, count)
    order = torch.randperm(count, generator=seeded(seed, stream, epoch)).tolist()
    return order[offset], pos


def micro_batch(instance: ExampleSet, prior: ExampleSet | None, *, step: int, micro: int,
                rank: int, world: int, accumulation: int, per_rank: int, seed: int,
                resolution: int, random_flip: bool, center_crop: bool
                ) -> tuple[torch.Tensor, list[str]]:
    """Pixel values and prompts for [instance..., class...] of one rank's micro-batch."""
    pixels, prompts = [], []
    sets = [(0, instance)] + ([(1, prior)] if prior is not None else [])
    for stream, examples in sets:
        for pos in positions(step, micro, rank, world, accumulation, per_rank):
            index, key = pick(examples, stream, pos, seed)
            pixels.append(augment(examples.resized(index, resolution), resolution,
                                  seeded(seed, 10 + stream, key), random_flip, center_crop))
            prompts.append(examples.prompt)
    return torch.stack(pixels), prompts
