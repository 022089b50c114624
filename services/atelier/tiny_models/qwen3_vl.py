"""A tiny Qwen3-VL in transformers format, with its processor.

Real geometry where it matters to the processor and the batching code: patch
16, spatial merge 2, temporal patch 2, interleaved M-RoPE, DeepStack, the Qwen
chat special tokens and a chat template. Everything else is shrunk: text
hidden size 64 with 2 layers, vision depth 2 with hidden size 32. Attention
heads are 32 wide in both towers, the narrowest vLLM's CPU attention kernels
accept, so both analysis backends run the same model.

``qwen3-vl-bench`` is the same model with a text tower of hidden size 512 and 4
layers (about 14M parameters): on the 64-wide model per-step overhead hides
what batching policy gains, so the analysis benchmark uses this one.
"""

from __future__ import annotations

from pathlib import Path

#: Special tokens, in the order they are appended after the learned vocabulary.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: Context length of the tiny text model, in tokens.
CONTEXT_TOKENS = 4096

#: A chat template in the Qwen-VL message format: content items of type
#: ``image``, ``video`` and ``text``. The processor expands ``<|image_pad|>``
#: to the image's tokens, and ``<|video_pad|>`` to per-frame
#: ``<t seconds><|vision_start|>...<|vision_end|>`` groups.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<|video_pad|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


#: Text tower geometry per size (M-RoPE sections sum to head_dim / 2). ``2b`` has
#: Qwen3-VL-2B's text geometry, for the GPU benchmark (random weights).
TEXT_SIZES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32},
    "bench": {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4,
              "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 32},
    "2b": {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
           "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128},
}
_MROPE = {32: [8, 4, 4], 128: [24, 20, 20]}


def build_tiny_qwen3_vl(out_dir: Path | str, seed: int = 0, size: str = "tiny") -> Path:
    """Write model, tokenizer and processor to ``out_dir`` and return it."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2Tokenizer,
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
    )
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    from atelier.tiny_models.vocabulary import train_byte_level_vocabulary

    out_dir = Path(out_dir)
    vocab, merges = train_byte_level_vocabulary()
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[tuple(m.split(" ")) for m in merges],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=CONTEXT_TOKENS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    ids = {token: vocab[token] for token in SPECIAL_TOKENS}

    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(vocab),
            **TEXT_SIZES[size],
            "max_position_embeddings": CONTEXT_TOKENS,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": _MROPE[TEXT_SIZES[size]["head_dim"]],
                "mrope_interleaved": True,
            },
            "bos_token_id": None,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 1,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": TEXT_SIZES[size]["hidden_size"],
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": [0, 1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(out_dir, safe_serialization=True)

    pixel_norm = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    image_processor = Qwen2VLImageProcessor(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        # Pixel budget per image: 64x64 px (4 merged tokens) to 512x512 px (256).
        size={"shortest_edge": 64 * 64, "longest_edge": 512 * 512},
        **pixel_norm,
    )
    video_processor = Qwen3VLVideoProcessor(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": 32 * 32 * 4, "longest_edge": 256 * 256 * 16},
        fps=2,
        min_frames=2,
        max_frames=32,
        cap_pixels_per_frame=True,
        **pixel_norm,
    )
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    return out_dir
