"""Tiny Stable Diffusion pipelines in diffusers format: SD 1.x, its variants, and SDXL.

Same architecture families and file layouts as the real models (SD 1.5:
UNet2DConditionModel with cross-attention, AutoencoderKL with a scale factor
of 8, CLIPTextModel, a CLIPTokenizer, a PNDM scheduler with SD 1.5's beta
schedule; an inpainting and an SD 2.x-style v-prediction variant; SDXL with two
text encoders and ``text_time`` conditioning), but a few hundred thousand
random parameters. Native resolution: 128x128 px.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

#: Native output size in pixels: latent sample size 16 times the VAE factor 8.
NATIVE_RESOLUTION = 128


def _clip_tokenizer():
    """A CLIP tokenizer over the learned tiny vocabulary (77 tokens, as CLIP)."""
    import json

    from transformers import CLIPTokenizer

    from atelier.tiny_models.vocabulary import train_clip_vocabulary

    vocab, merges = train_clip_vocabulary()
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file = Path(tmp) / "vocab.json"
        merges_file = Path(tmp) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab))
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file),
                                  model_max_length=77)
    tokenizer.model_max_length = 77
    return tokenizer


def _clip_config(tokenizer, **overrides):
    from transformers import CLIPTextConfig

    vocab = tokenizer.get_vocab()
    fields = dict(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    return CLIPTextConfig(**{**fields, **overrides})


def _tiny_vae(**overrides):
    from diffusers import AutoencoderKL

    fields = dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16),
        layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=NATIVE_RESOLUTION,
    )
    return AutoencoderKL(**{**fields, **overrides})


def _sd_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDIMScheduler, PNDMScheduler

    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1,
                  prediction_type=prediction_type)
    if prediction_type == "v_prediction":  # as SD 2.x's 768 px models
        return DDIMScheduler(clip_sample=False, **common)
    return PNDMScheduler(skip_prk_steps=True, **common)


def build_tiny_stable_diffusion(out_dir: Path | str, seed: int = 0, *,
                                variant: str = "base") -> Path:
    """Write the pipeline to ``out_dir`` (safetensors weights) and return it.

    ``variant``: ``base`` (SD 1.x), ``inpainting`` (a 9-channel UNet: latents, mask
    and masked-image latents, saved as StableDiffusionInpaintPipeline) or
    ``v-prediction`` (SD 2.x style: linear attention projections, a v-prediction
    DDIM schedule).
    """
    import torch
    from diffusers import (
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    if variant not in ("base", "inpainting", "v-prediction"):
        raise ValueError(f"unknown variant {variant!r}")
    out_dir = Path(out_dir)
    tokenizer = _clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(tokenizer))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=NATIVE_RESOLUTION // 8,
        in_channels=9 if variant == "inpainting" else 4,
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
        use_linear_projection=variant == "v-prediction",
    )
    torch.manual_seed(seed + 2)
    vae = _tiny_vae()
    scheduler = _sd_scheduler("v_prediction" if variant == "v-prediction" else "epsilon")
    cls = StableDiffusionInpaintPipeline if variant == "inpainting" else StableDiffusionPipeline
    pipeline = cls(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_tiny_sdxl(out_dir: Path | str, seed: int = 0) -> Path:
    """A tiny SDXL: a UNet with ``text_time`` added conditioning, CLIPTextModel plus
    CLIPTextModelWithProjection with their two tokenizers, a VAE with SDXL's scaling
    factor, and SDXL's Euler schedule. Native resolution 128x128 px."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out_dir = Path(out_dir)
    tokenizer = _clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_config(tokenizer))
    torch.manual_seed(seed + 10)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer, hidden_size=32,
                                                              projection_dim=32))
    time_embed_dim = 8
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=NATIVE_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,  # both encoders' hidden states side by side
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # six time ids, each embedded, plus the pooled text embedding
        projection_class_embeddings_input_dim=6 * time_embed_dim + 32,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 2)
    vae = _tiny_vae(scaling_factor=0.13025, force_upcast=True)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
        interpolation_type="linear", prediction_type="epsilon", use_karras_sigmas=False,
    )
    pipeline = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=_clip_tokenizer(), unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_random_sd15(out_dir: Path | str, seed: int = 0, dtype=None,
                      device: str = "cpu") -> Path:
    """An SD-1.5-size pipeline with random weights (860M-parameter UNet, ViT-L text
    encoder, SD VAE), for GPU benchmarks. It reuses the tiny tokenizer: token ids
    only index the embedding table, so throughput is that of the real model.
    ``device``: where the weights are drawn (a GPU draws 1B in a second);
    ``dtype``: the dtype they are saved in (bf16 halves the files and the load)."""
    import torch
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    tiny = Path(out_dir).with_name(out_dir.name + "-tokenizer-source")
    build_tiny_stable_diffusion(tiny, seed)
    source = StableDiffusionPipeline.from_pretrained(tiny)
    torch.manual_seed(seed)
    with torch.device(device):
        text_encoder, unet, vae = _random_sd15_modules(source)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=source.tokenizer, unet=unet,
        scheduler=source.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    _save(pipeline, out_dir, dtype)
    return out_dir


def _save(pipeline, out_dir: Path, dtype) -> None:
    """Save in ``dtype`` (None: as built), from host memory."""
    pipeline.to("cpu", dtype) if dtype is not None else pipeline.to("cpu")
    pipeline.save_pretrained(out_dir, safe_serialization=True)


def _random_sd15_modules(source):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

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
    return text_encoder, unet, vae


def build_random_sdxl(out_dir: Path | str, seed: int = 0, device: str = "cpu") -> Path:
    """An SDXL-base-size pipeline with random weights (2.6B-parameter UNet, CLIP-L and
    OpenCLIP-bigG-size text encoders, the SDXL VAE; 1024 px), for GPU benchmarks.
    It reuses the tiny tokenizer, as :func:`build_random_sd15` does; ``device`` is
    where the weights are drawn. Saved in bf16."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out_dir = Path(out_dir)
    tiny = Path(out_dir).with_name(out_dir.name + "-tokenizer-source")
    build_tiny_sdxl(tiny, seed)
    source = StableDiffusionXLPipeline.from_pretrained(tiny)
    tokenizer = source.tokenizer
    torch.manual_seed(seed)
    with torch.device(device):
        text_encoder = CLIPTextModel(_clip_config(
            tokenizer, vocab_size=49408, hidden_size=768, intermediate_size=3072,
            num_hidden_layers=12, num_attention_heads=12, projection_dim=768))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(
            tokenizer, vocab_size=49408, hidden_size=1280, intermediate_size=5120,
            num_hidden_layers=32, num_attention_heads=20, projection_dim=1280, hidden_act="gelu"))
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), sample_size=1024, scaling_factor=0.13025,
            force_upcast=True,
        )
    pipeline = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=source.tokenizer_2, unet=unet, scheduler=source.scheduler,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    _save(pipeline, out_dir, torch.bfloat16)
    return out_dir
