"""Building the trainable models of a job: frozen VAE, UNet and text encoder,
full fine-tune or LoRA (peft), exactly the same way on every worker and at export."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from atelier.training.train_config import TrainConfig

UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class Models:
    tokenizer: Any
    noise_scheduler: Any
    vae: Any
    unet: Any
    text_encoder: Any
    train_text_encoder: bool
    lora: bool


class Trainables(torch.nn.Module):
    """The UNet and text encoder as one module, so one DDP wrapper (and one
    ``no_sync``) covers both during gradient accumulation."""

    def __init__(self, unet, text_encoder) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, loss_fn, **kwargs):
        return loss_fn(unet=self.unet, text_encoder=self.text_encoder, **kwargs)


def load_models(path: str, spec: TrainConfig, seed: int) -> Models:
    """Load the base components from ``path`` and make the configured parts trainable."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", use_safetensors=True)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder",
                                                 use_safetensors=True)
    vae.requires_grad_(False)
    vae.eval()
    train_te = spec.text_encoder.enabled
    lora = spec.lora_enabled
    torch.manual_seed(seed)  # identical adapter initialisation on every worker
    if lora:
        from peft import LoraConfig

        rank, alpha = spec.lora.rank, spec.lora.alpha
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                    target_modules=UNET_LORA_TARGETS))
        text_encoder.requires_grad_(False)
        if train_te:
            # peft directly: transformers' own adapter API needs a newer peft than the
            # one pinned. Exported text encoders are merged (see merged_text_encoder).
            from peft import inject_adapter_in_model

            text_encoder = inject_adapter_in_model(
                LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                           target_modules=TEXT_LORA_TARGETS), text_encoder)
    else:
        unet.requires_grad_(True)
        text_encoder.requires_grad_(train_te)
    if not train_te:
        text_encoder.eval()
    if spec.options.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_te:
            text_encoder.gradient_checkpointing_enable()
    return Models(tokenizer, noise_scheduler, vae, unet, text_encoder, train_te, lora)


def trainable_state(module: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(module.named_parameters())
    return {n: params[n].detach().cpu().contiguous() for n in names}


def merged_text_encoder(trained, base_path: str):
    """A plain CLIPTextModel with a LoRA-trained text encoder's adapters merged in
    (W + scale * B @ A for every adapted linear layer)."""
    from transformers import CLIPTextModel

    merged = CLIPTextModel.from_pretrained(base_path, subfolder="text_encoder",
                                           use_safetensors=True)
    with torch.no_grad():
        for name, module in trained.named_modules():
            lora_a = getattr(module, "lora_A", None)
            if not lora_a or "default" not in lora_a:
                continue
            delta = module.lora_B["default"].weight @ module.lora_A["default"].weight
            merged.get_submodule(name).weight += module.scaling["default"] * delta
    return merged
