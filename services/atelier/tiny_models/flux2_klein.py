"""A tiny FLUX.2 [klein] in diffusers format, in its two variants, and a 4B-size random one.

Same parts and file layout as the real models: a ``Flux2Transformer2DModel``
(double- and single-stream blocks, 4-axis RoPE, no guidance embedding), an
``AutoencoderKLFlux2`` (2x2 patchified latents normalised by the VAE's batch-norm
statistics), a ``Qwen3ForCausalLM`` text encoder with a Qwen2 tokenizer and a
chat template, and a ``FlowMatchEulerDiscreteScheduler`` with dynamic shifting.

The pipeline conditions on the encoder's hidden states at layers 9, 18 and 27
(``text_encoder_out_layers``), so the tiny encoder has 28 layers, each 32 wide:
the transformer's joint attention width is 3 x 32. Native size 128x128 px: a
VAE factor of 8 and 2x2 patches make a 8x8 token grid.

``base`` has ``is_distilled=False`` (guided by true CFG); ``distilled`` is the
same weights with ``is_distilled=True`` (one row per image, no guidance).
"""

from __future__ import annotations

from pathlib import Path

#: Native output size in pixels.
NATIVE_RESOLUTION = 128

#: Text encoder width and depth: layers 9, 18 and 27 must exist.
TEXT_HIDDEN = 32
TEXT_LAYERS = 28
#: The pipeline's prompt length, in tokens (prompts are padded to it).
MAX_SEQUENCE_LENGTH = 512

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")

#: Qwen3's chat template for plain-text messages, with ``enable_thinking``.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}{%- endif -%}"
)

#: klein's flow-matching schedule: exponential time shift of ``mu`` (the pipeline
#: computes it from the image's token count and the step count).
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                 base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                 max_image_seq_len=4096, time_shift_type="exponential")

#: FLUX.2 [klein] 4B's transformer geometry (random weights: the GPU benchmark's).
KLEIN_4B = dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20,
                attention_head_dim=128, num_attention_heads=24, joint_attention_dim=7680,
                timestep_guidance_channels=256, mlp_ratio=3.0,
                axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False)


def _tokenizer():
    from transformers import Qwen2Tokenizer

    from atelier.tiny_models.vocabulary import train_byte_level_vocabulary

    vocab, merges = train_byte_level_vocabulary()
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], unk_token=None,
        bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=MAX_SEQUENCE_LENGTH)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _text_encoder(tokenizer, **geometry):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    fields = dict(hidden_size=TEXT_HIDDEN, intermediate_size=64,
                  num_hidden_layers=TEXT_LAYERS, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16)
    config = Qwen3Config(
        vocab_size=len(tokenizer), max_position_embeddings=MAX_SEQUENCE_LENGTH * 2,
        tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        **{**fields, **geometry})
    return Qwen3ForCausalLM(config)


def _vae(latent_channels: int, block_out_channels, seed: int):
    import torch
    from diffusers import AutoencoderKLFlux2

    depth = len(block_out_channels)
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * depth,
        up_block_types=("UpDecoderBlock2D",) * depth,
        block_out_channels=tuple(block_out_channels), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=8, sample_size=NATIVE_RESOLUTION)
    # Batch-norm statistics that are not the identity, so normalising matters.
    g = torch.Generator().manual_seed(seed)
    features = vae.bn.num_features
    vae.bn.running_mean.copy_(0.1 * torch.randn(features, generator=g, device="cpu"))
    vae.bn.running_var.copy_(0.5 + torch.rand(features, generator=g, device="cpu"))
    return vae


def build_tiny_flux2_klein(out_dir: Path | str, seed: int = 0, *,
                           variant: str = "base") -> Path:
    """Write the pipeline to ``out_dir`` (safetensors weights) and return it.
    ``variant``: ``base`` or ``distilled`` (the same weights, ``is_distilled=True``)."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )

    if variant not in ("base", "distilled"):
        raise ValueError(f"unknown klein variant {variant!r}")
    out_dir = Path(out_dir)
    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    text_encoder = _text_encoder(tokenizer)
    torch.manual_seed(seed + 1)
    latent_channels = 4
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * TEXT_HIDDEN,
        timestep_guidance_channels=32, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4),
        rope_theta=2000, guidance_embeds=False)
    torch.manual_seed(seed + 2)
    vae = _vae(latent_channels, (8, 16, 16, 16), seed + 3)
    pipeline = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
        is_distilled=variant == "distilled")
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def build_random_klein_4b(out_dir: Path | str, seed: int = 0, device: str = "cpu") -> Path:
    """FLUX.2 [klein] 4B's transformer and VAE geometry with random weights, saved in
    bfloat16, for the GPU benchmark at 1024 px. The text encoder keeps 28 layers but
    is 256 wide, so the transformer's text projection takes 3 x 256 features instead
    of 7680: a 2560-wide Qwen3 would add minutes of random init and nothing the
    denoising benchmark measures (prompts are encoded once per request)."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )

    out_dir = Path(out_dir)
    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    with torch.device(device):
        text_encoder = _text_encoder(tokenizer, hidden_size=2560 // 10, head_dim=64,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=512).to(torch.bfloat16)
        transformer = Flux2Transformer2DModel(**{**KLEIN_4B, "joint_attention_dim": 3 * 256})
        transformer.to(torch.bfloat16)
        vae = _vae(32, (128, 256, 512, 512), seed + 3).to(torch.bfloat16)
    pipeline = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
        is_distilled=False)
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
