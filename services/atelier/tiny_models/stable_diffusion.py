"""A tiny Stable-Diffusion-1.x-style pipeline in diffusers format.

Same architecture family and file layout as SD 1.5 (UNet2DConditionModel with
cross-attention, AutoencoderKL with a scale factor of 8, CLIPTextModel, a
CLIPTokenizer, a PNDM scheduler with SD 1.5's beta schedule), but a few
hundred thousand random parameters. Native resolution: 128x128 px.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

#: Native output size in pixels: latent sample size 16 times the VAE factor 8.
NATIVE_RESOLUTION = 128


def build_tiny_stable_diffusion(out_dir: Path | str, seed: int = 0) -> Path:
    """Write the pipeline to ``out_dir`` (safetensors weights) and return it."""
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from atelier.tiny_models.vocabulary import train_clip_vocabulary

    out_dir = Path(out_dir)
    vocab, merges = train_clip_vocabulary()
    with tempfile.TemporaryDirectory() as tmp:
        import json

        vocab_file = Path(tmp) / "vocab.json"
        merges_file = Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab))
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file),
                                  model_max_length=77)
    tokenizer.model_max_length = 77

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=NATIVE_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        # Cross-attention at the lower resolution only, as in diffusers' own test
        # models: the UNet stays cheap per sample, so (like a real UNet on a GPU)
        # it runs much more efficiently in large batches than one by one.
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=NATIVE_RESOLUTION,
    )
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_random_sd15(out_dir: Path | str, seed: int = 0) -> Path:
    """An SD-1.5-size pipeline with random weights (860M-parameter UNet, ViT-L text
    encoder, SD VAE), for GPU benchmarks. It reuses the tiny tokenizer: token ids
    only index the embedding table, so throughput is that of the real model."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out_dir = Path(out_dir)
    tiny = Path(out_dir).with_name(out_dir.name + "-tokenizer-source")
    build_tiny_stable_diffusion(tiny, seed)
    source = StableDiffusionPipeline.from_pretrained(tiny)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
        bos_token_id=source.tokenizer.bos_token_id, eos_token_id=source.tokenizer.eos_token_id,
        pad_token_id=source.tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                          "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                        "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), sample_size=512,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=source.tokenizer, unet=unet,
        scheduler=source.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
