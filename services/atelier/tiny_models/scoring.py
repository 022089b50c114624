"""Tiny, random image-scoring models: a CLIP (text and vision towers, with its
processor) and a DINO-style ViT (with its image processor), in transformers format.

They stand in for ``openai/clip-vit-large-patch14`` and ``facebook/dino-vits16``,
the models a deployment scores subjects with (``atelier.models.subject_scores``): the same
classes, file layouts and ``from_pretrained`` calls (torchmetrics' ``CLIPScore``
loads the tiny CLIP too), at 32 px inputs and a few thousand parameters. Their
weights are drawn wider than transformers' default initialisation so that
embeddings depend visibly on the image, not only on the class token.
"""

from __future__ import annotations

from pathlib import Path

#: Input side of both tiny towers, pixels.
IMAGE_SIZE = 32
_INIT_RANGE = 0.2
_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, initializer_range=_INIT_RANGE)
#: ImageNet statistics, as DINO's processor uses them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_tiny_clip(out_dir: Path | str, seed: int = 0) -> Path:
    """A CLIPModel with a CLIPProcessor (the tiny CLIP tokenizer, 32 px images)."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPVisionConfig,
    )

    from atelier.tiny_models.stable_diffusion import _clip_tokenizer

    out = Path(out_dir)
    tokenizer = _clip_tokenizer()
    vocab = tokenizer.get_vocab()
    text = CLIPTextConfig(vocab_size=len(vocab), max_position_embeddings=77, projection_dim=32,
                          bos_token_id=vocab["<|startoftext|>"],
                          eos_token_id=vocab["<|endoftext|>"],
                          pad_token_id=vocab["<|endoftext|>"], **_TOWER)
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=8, projection_dim=32, **_TOWER)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                        projection_dim=32, initializer_factor=1.0)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    _widen(model, seed)
    model.save_pretrained(out, safe_serialization=True)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                           crop_size={"height": IMAGE_SIZE,
                                                      "width": IMAGE_SIZE}),
        tokenizer=tokenizer)
    processor.save_pretrained(out)
    return out


def build_tiny_dino(out_dir: Path | str, seed: int = 0) -> Path:
    """A ViTModel (DINO's architecture: class token, no distillation head) with a
    ViTImageProcessor that resizes to 32 px and normalises with ImageNet statistics."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    out = Path(out_dir)
    torch.manual_seed(seed + 1)
    model = ViTModel(ViTConfig(image_size=IMAGE_SIZE, patch_size=8, qkv_bias=True, **_TOWER))
    _widen(model, seed + 1)
    model.save_pretrained(out, safe_serialization=True)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                      image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)
                      ).save_pretrained(out)
    return out


def _widen(model, seed: int) -> None:
    """Redraw every weight matrix at ``_INIT_RANGE``: some models' init ignores
    ``initializer_range`` for their patch and position embeddings."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 or name.endswith(("class_embedding", "cls_token")):
                param.copy_(torch.randn(param.shape, generator=generator) * _INIT_RANGE)
