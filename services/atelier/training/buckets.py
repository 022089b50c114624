"""Aspect-ratio buckets: image sizes of about one pixel budget, and where an image goes.

With bucketing a job trains each image at the bucket nearest its aspect ratio
instead of a square crop: the buckets are every (width, height) with sides
multiples of 64, an aspect ratio within 1:4..4:1, and at most ``resolution^2``
pixels (the largest height for each width). Without bucketing there is one
bucket, the square ``resolution``.

:func:`place` says how an image fits its bucket: resized to cover it, then
cropped (centred, or at a seeded random offset). The original size and the
crop are what SDXL's ``add_time_ids`` record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from atelier.training.spec import BUCKET_STEP

MAX_ASPECT = 4.0


def buckets(resolution: int, bucketing: bool) -> list[tuple[int, int]]:
    """The (width, height) buckets at a resolution^2 pixel budget."""
    if not bucketing:
        return [(resolution, resolution)]
    budget = resolution * resolution
    out = set()
    for width in range(BUCKET_STEP, int(resolution * MAX_ASPECT) + 1, BUCKET_STEP):
        height = budget // width // BUCKET_STEP * BUCKET_STEP
        if height >= BUCKET_STEP and max(width / height, height / width) <= MAX_ASPECT:
            out |= {(width, height), (height, width)}
    return sorted(out)


def nearest_bucket(size: tuple[int, int], candidates: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log ratio) to ``size``'s; ties go
    to the larger bucket."""
    aspect = math.log(size[0] / size[1])
    return min(candidates, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


@dataclass(frozen=True)
class Placement:
    """How an image of ``original`` size is fitted to ``bucket``: resized to ``resized``,
    then cropped at ``crop`` (left, top)."""

    original: tuple[int, int]
    bucket: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int]

    def time_ids(self) -> list[int]:
        """SDXL's micro-conditioning: original (h, w), crop (top, left), target (h, w)."""
        return [self.original[1], self.original[0], self.crop[1], self.crop[0],
                self.bucket[1], self.bucket[0]]


def place(original: tuple[int, int], bucket: tuple[int, int], draws: tuple[float, float],
          center: bool) -> Placement:
    """Resize to cover the bucket (keeping the aspect ratio), then crop: at the centre,
    or at ``draws`` (two numbers in [0, 1)) of the slack."""
    width, height = original
    scale = max(bucket[0] / width, bucket[1] / height)
    resized = (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))
    slack = (resized[0] - bucket[0], resized[1] - bucket[1])
    if center:
        crop = (slack[0] // 2, slack[1] // 2)
    else:
        crop = (int(draws[0] * (slack[0] + 1)), int(draws[1] * (slack[1] + 1)))
    return Placement(original, bucket, resized, crop)
