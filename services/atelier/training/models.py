"""Building the trainable models of a job: frozen VAE, UNet and text encoder(s),
full fine-tune or LoRA (peft), exactly the same way on every worker and at export.
FLUX.2 [klein] trains LoRA adapters on its transformer (``unet`` names the
denoiser of every family) and never its text encoder.

SD 1.x/2.x have one text encoder (CLIPTextModel); SDXL two (CLIP-L and a
CLIPTextModelWithProjection), each trained or frozen on its own. The base-model
prior needs the untrained model too: for LoRA it is the same modules with their
adapters switched off (:func:`base_model`), for a full fine-tune a frozen copy.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from atelier.models.pipelines import FLUX2_KLEIN, SDXL
from atelier.models.runtime import one_load_at_a_time

if TYPE_CHECKING:
    from atelier.training.train_config import TrainConfig

TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
#: Component names of the text encoders, in the order the UNet sees their states.
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


class Trainables(torch.nn.Module):
    """The UNet and text encoders as one module, so one DDP wrapper (and one
    ``no_sync``) covers them all during gradient accumulation. Parameter names are
    ``unet.*``, ``text_encoder.*`` and (SDXL) ``text_encoder_2.*``."""

    def __init__(self, unet, text_encoders: list) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoders[0] if text_encoders else None
        self.text_encoder_2 = text_encoders[1] if len(text_encoders) > 1 else None

    @property
    def text_encoders(self) -> list:
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    def forward(self, loss_fn, **kwargs):
        return loss_fn(unet=self.unet, text_encoders=self.text_encoders, **kwargs)


@dataclass
class Models:
    family: str
    tokenizers: list
    noise_scheduler: Any
    vae: Any
    trainables: Trainables
    train_text_encoders: list[bool]
    """Per text encoder: whether it trains."""
    lora: bool
    frozen_copies: dict = field(default_factory=dict)
    """Full fine-tunes with the base-model prior: the untrained UNet and text encoders."""

    @property
    def unet(self):
        return self.trainables.unet

    @property
    def text_encoders(self) -> list:
        return self.trainables.text_encoders

    @property
    def any_text_encoder_trains(self) -> bool:
        return any(self.train_text_encoders)

    def trained_text_encoders(self) -> dict[str, Any]:
        """The trained text encoders by component name (for the export)."""
        return {name: encoder for name, encoder, trains in
                zip(TEXT_ENCODERS, self.text_encoders, self.train_text_encoders, strict=False)
                if trains}


def _text_encoder_classes(family: str) -> list:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return [CLIPTextModel, CLIPTextModelWithProjection] if family == SDXL else [CLIPTextModel]


@one_load_at_a_time
def load_models(path: str, spec: TrainConfig, seed: int) -> Models:
    """Load the base components from ``path`` and make the configured parts trainable."""
    if spec.family == FLUX2_KLEIN:
        return _load_flux2_klein(path, spec, seed)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer

    classes = _text_encoder_classes(spec.family)
    tokenizers = [AutoTokenizer.from_pretrained(path, subfolder=sub)
                  for sub in ("tokenizer", "tokenizer_2")[: len(classes)]]
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", use_safetensors=True)
    encoders = [cls.from_pretrained(path, subfolder=name, use_safetensors=True)
                for cls, name in zip(classes, TEXT_ENCODERS, strict=False)]
    vae.requires_grad_(False)
    vae.eval()
    trains = [spec.text_encoder.enabled, spec.text_encoder_2.enabled][: len(encoders)]
    lora = spec.lora_enabled
    frozen: dict = {}
    if _needs_frozen_copies(spec):
        frozen = {"unet": _frozen(unet), "text_encoders": [
            _frozen(e) if t else e for e, t in zip(encoders, trains, strict=True)]}
    torch.manual_seed(seed)  # identical adapter initialisation on every worker
    if lora:
        from peft import LoraConfig

        rank, alpha = spec.lora.rank, spec.lora.alpha
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                    target_modules=lora_targets(spec)))
        for i, encoder in enumerate(encoders):
            encoder.requires_grad_(False)
            if trains[i]:
                # peft directly: transformers' own adapter API needs a newer peft than
                # the one pinned. Exported text encoders are merged (merged_text_encoder).
                from peft import inject_adapter_in_model

                encoders[i] = inject_adapter_in_model(
                    LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                               target_modules=TEXT_LORA_TARGETS), encoder)
    else:
        unet.requires_grad_(True)
        for encoder, train in zip(encoders, trains, strict=True):
            encoder.requires_grad_(train)
    for encoder, train in zip(encoders, trains, strict=True):
        if not train:
            encoder.eval()
    if spec.options.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder, train in zip(encoders, trains, strict=True):
            if train:
                encoder.gradient_checkpointing_enable()
    return Models(spec.family, tokenizers, noise_scheduler, vae, Trainables(unet, encoders),
                  trains, lora, frozen)


def _load_flux2_klein(path: str, spec: TrainConfig, seed: int) -> Models:
    """klein: LoRA on the transformer (its attention and MLP linears), the VAE frozen.
    The Qwen3 text encoder never trains and is not loaded here: prompts are encoded
    once per job (``text_cache``). ``unet`` names the denoiser in every family."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2Transformer2DModel,
    )
    from peft import LoraConfig
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path,
                                                                      subfolder="scheduler")
    vae = AutoencoderKLFlux2.from_pretrained(path, subfolder="vae", use_safetensors=True)
    transformer = Flux2Transformer2DModel.from_pretrained(path, subfolder="transformer",
                                                          use_safetensors=True)
    vae.requires_grad_(False)
    vae.eval()
    transformer.requires_grad_(False)
    torch.manual_seed(seed)  # identical adapter initialisation on every worker
    transformer.add_adapter(LoraConfig(r=spec.lora.rank, lora_alpha=spec.lora.alpha,
                                       init_lora_weights="gaussian",
                                       target_modules=lora_targets(spec)))
    if spec.options.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return Models(spec.family, [tokenizer], noise_scheduler, vae, Trainables(transformer, []),
                  [], lora=True)


def lora_targets(spec: TrainConfig):
    """peft ``target_modules`` of the denoiser for the job's LoRA preset."""
    from atelier.models.families import family_named

    return family_named(spec.family).lora_presets[spec.lora.targets]


@one_load_at_a_time
def load_text_encoder(path: str, family: str):
    """A frozen family's text encoder, in eval mode (``text_cache`` loads it only
    when a prompt is not cached yet)."""
    from transformers import Qwen3ForCausalLM

    if family != FLUX2_KLEIN:
        raise ValueError(f"{family} text encoders load with the models")
    encoder = Qwen3ForCausalLM.from_pretrained(path, subfolder="text_encoder",
                                               use_safetensors=True)
    return encoder.requires_grad_(False).eval()


def _needs_frozen_copies(spec: TrainConfig) -> bool:
    from atelier.training.train_config import PriorSource

    return not spec.lora_enabled and any(
        c.prior.enabled and c.prior.source is PriorSource.BASE_MODEL for c in spec.concepts)


def _frozen(module):
    twin = copy.deepcopy(module)
    twin.requires_grad_(False)
    return twin.eval()


@contextlib.contextmanager
def base_model(m: Models):
    """The untrained model as (unet, text encoders), for the base-model prior: LoRA
    modules with their adapters off, or a full fine-tune's frozen copies."""
    if m.frozen_copies:
        yield m.frozen_copies["unet"], m.frozen_copies["text_encoders"]
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [layer for layer in m.trainables.modules() if isinstance(layer, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield m.unet, m.text_encoders
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def to_device(m: Models, device) -> None:
    m.vae.to(device)
    m.trainables.to(device)
    for module in [m.frozen_copies.get("unet"), *m.frozen_copies.get("text_encoders", [])]:
        if module is not None:
            module.to(device)


def trainable_state(module: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(module.named_parameters())
    return {n: params[n].detach().cpu().contiguous() for n in names}


@one_load_at_a_time
def merged_text_encoder(trained, base_path: str, name: str = "text_encoder"):
    """A plain text encoder (the base's class) with a LoRA-trained one's adapters merged
    in (W + scale * B @ A for every adapted linear layer)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
    merged = cls.from_pretrained(base_path, subfolder=name, use_safetensors=True)
    with torch.no_grad():
        for module_name, module in trained.named_modules():
            lora_a = getattr(module, "lora_A", None)
            if not lora_a or "default" not in lora_a:
                continue
            delta = module.lora_B["default"].weight @ module.lora_A["default"].weight
            merged.get_submodule(module_name).weight += module.scaling["default"] * delta
    return merged
