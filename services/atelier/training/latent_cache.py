"""The latent cache: every image's VAE latent distribution, computed once per job.

The VAE is frozen, so an image's latent distribution at its bucket (and for its
flip, with ``random_flip``) never changes. With ``options.cache_latents`` the
ranks encode the entries before the first step, each a share, and store them
with the job (``jobs/<id>/cache/latents-<fingerprint>/``); every rank then loads
them all, and a step samples from the cached distribution with the step's own
generator, the draw the uncached path makes. A resumed run (a restarted worker
group or service) finds the cache complete and loads it instead of encoding.
The fingerprint covers everything the latents depend on (base model, images,
masks, class images, resolution, bucketing, flips), so a stale cache is never
read.

Cached latents have one crop: centred (``data.Examples.placement``).
"""

from __future__ import annotations

import hashlib
import json
import logging

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from atelier.training.data import CLASS_IMAGE, INSTANCE, Examples, Row
from atelier.training.jobs import job_key
from atelier.training.method import encode_latents

log = logging.getLogger("atelier.training.latent_cache")
ENCODE_BATCH = 8


def fingerprint(base_ref: str, examples: Examples, class_keys: dict[int, list[str]]) -> str:
    spec = examples.spec
    payload = json.dumps({
        "base": base_ref, "family": spec.family, "resolution": spec.resolution,
        "bucketing": spec.options.aspect_ratio_bucketing, "flip": spec.options.random_flip,
        "images": [[e.key, e.mask_key, e.mask_from_alpha] for c in spec.concepts
                   for e in c.images],
        "classes": {str(k): v for k, v in sorted(class_keys.items())}}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def entry_key(row: Row, bucket: tuple[int, int], flip: bool) -> str:
    if row.kind == INSTANCE:
        return f"i{row.index}-f{int(flip)}"
    return f"c{row.concept}-{row.index}-{bucket[0]}x{bucket[1]}-f{int(flip)}"


def entries(examples: Examples) -> list[tuple[str, Row, tuple[int, int]]]:
    """Every (key, row, bucket) a run can ask for, in a fixed order."""
    flips = (0.9, 0.1) if examples.spec.options.random_flip else (0.9,)  # draws: no flip, flip
    out = []
    concept_buckets: dict[int, set] = {}
    for index, instance in enumerate(examples.instances):
        concept_buckets.setdefault(instance.concept, set()).add(instance.bucket)
        for draw in flips:
            row = Row(INSTANCE, instance.concept, index, (0.0, 0.0, draw))
            out.append((entry_key(row, instance.bucket, draw < 0.5), row, instance.bucket))
    for concept, images in sorted(examples.class_images.items()):
        for bucket in sorted(concept_buckets.get(concept, ())):
            for index in range(len(images)):
                for draw in flips:
                    row = Row(CLASS_IMAGE, concept, index, (0.0, 0.0, draw))
                    out.append((entry_key(row, bucket, draw < 0.5), row, bucket))
    return out


class LatentCache:
    def __init__(self, params: dict[str, torch.Tensor]) -> None:
        self._params = params

    def __len__(self) -> int:
        return len(self._params)

    def params(self, examples: Examples, row: Row, bucket: tuple[int, int]) -> torch.Tensor:
        """The cached latent distribution (moments) of one image row."""
        _, flip = examples.placement(row, bucket)
        return self._params[entry_key(row, bucket, flip)]


def _encode(examples: Examples, todo, vae, device) -> dict[str, torch.Tensor]:
    out = {}
    by_bucket: dict[tuple[int, int], list] = {}
    for key, row, bucket in todo:
        by_bucket.setdefault(bucket, []).append((key, row))
    for bucket, items in by_bucket.items():
        for start in range(0, len(items), ENCODE_BATCH):
            chunk = items[start:start + ENCODE_BATCH]
            pixels = torch.stack([examples.pixels(row, bucket) for _, row in chunk])
            moments = encode_latents(vae, pixels.to(device)).parameters.float().cpu()
            out.update({key: moments[i].contiguous() for i, (key, _) in enumerate(chunk)})
    return out


def build_or_load(store, job_id: str, examples: Examples, fingerprint_: str, *, vae, device,
                  rank: int, world: int, barrier) -> LatentCache:
    """The run's latent cache: loaded if the store has it complete, else encoded
    (each rank ``entries[rank::world]``), stored, and loaded by every rank."""
    folder = job_key(job_id, "cache", f"latents-{fingerprint_}")
    complete = f"{folder}/complete.json"
    if not store.exists(complete):
        every = entries(examples)
        part = _encode(examples, every[rank::world], vae, device)
        store.put_bytes(f"{folder}/part-{rank:03d}-of-{world:03d}.safetensors",
                        save_safetensors(part))
        barrier()
        if rank == 0:
            store.put_json(complete, {"parts": world, "entries": len(every)})
            log.info("latent cache stored", extra={"job": job_id, "folder": folder})
        barrier()
    parts = store.get_json(complete)["parts"]
    params: dict[str, torch.Tensor] = {}
    for r in range(parts):
        params.update(load_safetensors(store.get_bytes(
            f"{folder}/part-{r:03d}-of-{parts:03d}.safetensors")))
    return LatentCache(params)
