"""Class-prior images: generated with the base model, spread over Ray workers, cached.

The cache key is a hash of everything that determines the images: the base
model (its reference and the names and sizes of its files), the class prompt,
the resolution, the scheduler (DDIM for SD and SDXL; a flow model's own, which
the model reference covers), steps, guidance scale and seed. A second job
with the same class reuses the images; a changed prompt or model gets a new
key and never sees stale priors. Image ``i`` is always drawn with seed
``seed + i``, so a cache grown by several jobs holds the same images as one
built at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from atelier.kit.images import encode_png
from atelier.storage import ObjectStore
from atelier.training.jobs import ROOT

log = logging.getLogger("atelier.training.priors")

PRIORS = ROOT + "class-priors/"
SCHEDULER = "ddim"


def model_fingerprint(path: str) -> str:
    """Names and sizes of a local model's files (changes when the model changes)."""
    root = Path(path)
    if not root.is_dir():
        return path
    items = sorted(f"{p.relative_to(root)}:{p.stat().st_size}"
                   for p in root.rglob("*") if p.is_file() and p.name != ".complete")
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


def cache_key(base_ref: str, fingerprint: str, prompt: str, resolution: int, steps: int,
              guidance: float, seed: int) -> str:
    payload = json.dumps({"base": base_ref, "fingerprint": fingerprint, "prompt": prompt,
                          "resolution": resolution, "scheduler": SCHEDULER, "steps": steps,
                          "guidance": guidance, "seed": seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def image_key(key: str, index: int) -> str:
    return f"{PRIORS}{key}/{index:05d}.png"


def cached_count(store: ObjectStore, key: str) -> int:
    """How many images of this cache entry are complete (contiguous from 0)."""
    try:
        return int(store.get_json(f"{PRIORS}{key}/manifest.json")["count"])
    except Exception:
        return 0


def generate_slice(model_path: str, prompt: str, resolution: int, steps: int,
                   guidance: float, seed: int, indices: list[int], storage: dict,
                   key: str) -> int:
    """Generate and store the class images ``indices`` (runs inside a Ray task)."""
    import torch
    from diffusers import DDIMScheduler

    from atelier.kit.settings import StorageSettings
    from atelier.models.families import family_of
    from atelier.models.pipelines import load_pipeline
    from atelier.models.runtime import pick_device, pick_dtype
    from atelier.storage import open_store

    store = open_store(StorageSettings(**storage))
    device = pick_device("auto")
    # The project's dtype rule (bf16 on CUDA, fp32 on CPU), as generation uses it.
    pipe = load_pipeline(model_path, dtype=pick_dtype("auto", device), device=device)
    if family_of(pipe).prediction != "flow":  # a flow model samples with its own scheduler
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    for i in indices:
        image = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance,
                     height=resolution, width=resolution,
                     generator=torch.Generator().manual_seed(seed + i)).images[0]
        store.put_bytes(image_key(key, i), encode_png(image), "image/png")
    return len(indices)


def ensure_class_priors(store: ObjectStore, *, key: str, count: int, model_path: str,
                        prompt: str, resolution: int, steps: int, guidance: float, seed: int,
                        storage: dict, workers: int, cpus: int, gpus: int) -> tuple[list[str], int]:
    """Keys of ``count`` class images, generating the missing ones on Ray workers.

    Returns (keys, how many were generated now)."""
    have = cached_count(store, key)
    missing = list(range(have, count))
    if missing:
        import ray

        task = ray.remote(num_cpus=cpus, num_gpus=gpus)(generate_slice)
        slices = [missing[w::workers] for w in range(workers) if missing[w::workers]]
        ray.get([task.remote(model_path, prompt, resolution, steps, guidance, seed, part,
                             storage, key) for part in slices])
        store.put_json(f"{PRIORS}{key}/manifest.json", {
            "count": count, "prompt": prompt, "resolution": resolution, "steps": steps,
            "guidance": guidance, "seed": seed, "scheduler": SCHEDULER})
        log.info("class priors generated", extra={"key": key, "generated": len(missing)})
    return [image_key(key, i) for i in range(count)], len(missing)
