"""The tiny models load through the real from_pretrained paths and run."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from atelier.tiny_models.cli import main as tiny_cli


def _digest(directory) -> dict[str, str]:
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*")) if p.is_file() and p.name != ".complete"
    }


def test_stable_diffusion_loads_and_generates(tiny_sd):
    from diffusers import StableDiffusionPipeline

    assert not list(tiny_sd.rglob("*.bin")), "weights must be safetensors"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 128
    ids = pipe.tokenizer("a photo of sks dog on the moon").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert len(ids) < 16  # learned merges, not one token per character

    def run(seed):
        return pipe("a photo of sks dog", num_inference_steps=3, output_type="np",
                    generator=torch.Generator().manual_seed(seed)).images[0]

    first, again, other = run(0), run(0), run(1)
    assert first.shape == (128, 128, 3)
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_qwen3_vl_loads_and_generates_from_image_and_video(tiny_qwen):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.video_utils import VideoMetadata

    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen).eval()
    processor = AutoProcessor.from_pretrained(tiny_qwen)
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    vision = model.config.vision_config
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (16, 2, 2)
    assert model.config.text_config.hidden_size == 64
    assert model.config.text_config.num_hidden_layers == 2
    assert (vision.depth, vision.hidden_size) == (2, 32)

    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(96, 128, 3) * 255).astype("uint8"))
    messages = [{"role": "user", "content": [{"type": "image"},
                                              {"type": "text", "text": "describe this image"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    # 128x96 px -> 8x6 patches of 16 px -> 4x3 merged tokens.
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 8]]
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert image_tokens == 12
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 6 or \
        out[0, -1].item() in model.generation_config.eos_token_id

    frames = (rng.rand(4, 64, 64, 3) * 255).astype("uint8")
    messages = [{"role": "user", "content": [{"type": "video"},
                                              {"type": "text", "text": "what happens"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    metadata = VideoMetadata(total_num_frames=4, fps=2.0, frames_indices=[0, 1, 2, 3])
    inputs = processor(text=[prompt], videos=[frames], return_tensors="pt",
                       videos_kwargs={"video_metadata": [metadata], "do_sample_frames": False})
    text = processor.batch_decode(inputs["input_ids"])[0]
    assert "<0.2 seconds>" in text and "<1.2 seconds>" in text  # frame timestamps
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_sdxl_loads_and_generates(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    assert not list(tiny_sdxl.rglob("*.bin")), "weights must be safetensors"
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.tokenizer is not None and pipe.tokenizer_2 is not None
    assert pipe.unet.config.addition_embed_type == "text_time"
    image = pipe("a photo of sks dog", num_inference_steps=3, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (128, 128, 3) and np.isfinite(image).all()


def test_sd_variants_load(tiny_sd_inpainting, tiny_sd_v):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    inpainting = StableDiffusionInpaintPipeline.from_pretrained(tiny_sd_inpainting)
    assert inpainting.unet.config.in_channels == 9
    v = StableDiffusionPipeline.from_pretrained(tiny_sd_v)
    assert v.scheduler.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("name", ["stable-diffusion", "stable-diffusion-xl", "qwen3-vl"])
def test_builds_are_deterministic(tmp_path, name):
    assert tiny_cli(["build", name, "--out", str(tmp_path / "a"), "--seed", "3"]) == 0
    assert tiny_cli(["build", name, "--out", str(tmp_path / "b"), "--seed", "3"]) == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert tiny_cli(["build", name, "--out", str(tmp_path / "c"), "--seed", "4"]) == 0
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_cache_builds_once(tmp_path):
    from atelier.tiny_models.cache import ensure_tiny_model

    first = ensure_tiny_model("qwen3-vl", tmp_path)
    stamp = (first / "config.json").stat().st_mtime_ns
    assert ensure_tiny_model("qwen3-vl", tmp_path) == first
    assert (first / "config.json").stat().st_mtime_ns == stamp
    assert json.loads((first / "config.json").read_text())["model_type"] == "qwen3_vl"
