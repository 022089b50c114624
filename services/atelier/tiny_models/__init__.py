"""Tiny, randomly initialised models in the real diffusers/transformers formats.

Built offline and deterministically from a seed, so tests, benchmarks and the
embedded defaults exercise the same ``from_pretrained`` paths as real models
without any download. Their outputs are noise: they prove plumbing, batching
and fidelity, not quality.

- :mod:`.stable_diffusion`: Stable Diffusion 1.x-style pipelines (base, inpainting,
  v-prediction) and a tiny SDXL.
- :mod:`.flux2_klein`: FLUX.2 [klein] in its ``base`` and distilled variants, and a
  4B-size random one for the GPU benchmark.
- :mod:`.qwen3_vl`: a Qwen3-VL model with its processor (and a wider bench size).
- :mod:`.scoring`: a CLIP and a DINO-style ViT that score subjects.
- :mod:`.cache`: build once into a local cache (``tiny://`` model references).
"""

TINY_STABLE_DIFFUSION = "stable-diffusion"
TINY_SD_INPAINTING = "stable-diffusion-inpainting"
TINY_SD_V_PREDICTION = "stable-diffusion-v-prediction"
TINY_SDXL = "stable-diffusion-xl"
TINY_FLUX2_KLEIN_BASE = "flux2-klein-base"
TINY_FLUX2_KLEIN = "flux2-klein"  # distilled
TINY_QWEN3_VL = "qwen3-vl"
TINY_QWEN3_VL_BENCH = "qwen3-vl-bench"
#: Qwen3-VL-2B text geometry with random weights: the GPU benchmark's model.
QWEN3_VL_2B_RANDOM = "qwen3-vl-2b-random"
#: Subject scoring (``atelier.models.subject_scores``): CLIP-I/CLIP-T, and DINO.
TINY_CLIP = "clip"
TINY_DINO = "dino"
