"""Build tiny models once into a local cache; ``tiny://<name>`` references resolve here.

Each model lives in ``<cache_dir>/tiny/<name>-seed<seed>-v<BUILD_VERSION>``. A
build writes into a temporary directory and renames it into place, under a
file lock, so concurrent processes (parallel tests, three services starting
together) build it once and never see a half-written model.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from atelier.tiny_models import (
    QWEN3_VL_2B_RANDOM,
    TINY_CLIP,
    TINY_DINO,
    TINY_FLUX2_KLEIN,
    TINY_FLUX2_KLEIN_BASE,
    TINY_QWEN3_VL,
    TINY_QWEN3_VL_BENCH,
    TINY_SD_INPAINTING,
    TINY_SD_V_PREDICTION,
    TINY_SDXL,
    TINY_STABLE_DIFFUSION,
)

#: Bump when a builder changes, so stale caches are rebuilt instead of reused.
BUILD_VERSION = 4


def _builders() -> dict[str, Callable[[Path, int], Path]]:
    from atelier.tiny_models.flux2_klein import build_tiny_flux2_klein
    from atelier.tiny_models.qwen3_vl import build_tiny_qwen3_vl
    from atelier.tiny_models.scoring import build_tiny_clip, build_tiny_dino
    from atelier.tiny_models.stable_diffusion import build_tiny_sdxl, build_tiny_stable_diffusion

    return {
        TINY_STABLE_DIFFUSION: build_tiny_stable_diffusion,
        TINY_SD_INPAINTING: lambda out, seed: build_tiny_stable_diffusion(
            out, seed, variant="inpainting"),
        TINY_SD_V_PREDICTION: lambda out, seed: build_tiny_stable_diffusion(
            out, seed, variant="v-prediction"),
        TINY_SDXL: build_tiny_sdxl,
        TINY_FLUX2_KLEIN_BASE: build_tiny_flux2_klein,
        TINY_FLUX2_KLEIN: lambda out, seed: build_tiny_flux2_klein(out, seed,
                                                                   variant="distilled"),
        TINY_QWEN3_VL: build_tiny_qwen3_vl,
        TINY_QWEN3_VL_BENCH: lambda out, seed: build_tiny_qwen3_vl(out, seed, size="bench"),
        TINY_CLIP: build_tiny_clip,
        TINY_DINO: build_tiny_dino,
        QWEN3_VL_2B_RANDOM: lambda out, seed: build_tiny_qwen3_vl(out, seed, size="2b"),
    }


def tiny_model_names() -> list[str]:
    return [TINY_STABLE_DIFFUSION, TINY_SD_INPAINTING, TINY_SD_V_PREDICTION, TINY_SDXL,
            TINY_FLUX2_KLEIN_BASE, TINY_FLUX2_KLEIN, TINY_QWEN3_VL, TINY_QWEN3_VL_BENCH,
            TINY_CLIP, TINY_DINO]


def ensure_tiny_model(name: str, cache_dir: Path | str, seed: int = 0) -> Path:
    """The directory of tiny model ``name``, building it first if it is not cached."""
    builders = _builders()
    if name not in builders:
        raise KeyError(f"unknown tiny model {name!r}; known: {', '.join(sorted(builders))}")
    root = Path(cache_dir) / "tiny"
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{name}-seed{seed}-v{BUILD_VERSION}"
    if (target / ".complete").exists():
        return target
    with FileLock(str(target) + ".lock"):
        if (target / ".complete").exists():
            return target
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-") as tmp:
            staging = Path(tmp) / "model"
            builders[name](staging, seed)
            (staging / ".complete").write_text(f"{name} seed={seed} v{BUILD_VERSION}\n")
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
    return target
