"""LoRA adapters applied per batch row: many subjects over one base UNet in one forward.

A LoRA model is a set of low-rank deltas over its base's UNet layers
(:class:`LoraAdapter`, read from the exported safetensors with diffusers' own
loader). The base layers stay untouched and run once for the whole batch; while
a batch that carries adapters runs (:func:`rows_with_adapters`), a forward hook
on each targeted layer adds, for every adapter in the batch, its delta to the
rows that use it:

    y[rows] += B(A(x[rows])) * alpha / r * scale[rows]

as the Punica/S-LoRA kernels do for LLMs: the batch's adapters are stacked per
layer (:class:`AdapterStack`, zero-padded to one rank), each (row, adapter) pair
gathers its row and its adapter's A and B, one batched matmul pair computes
every delta, and ``index_add_`` adds them back. So a layer costs the same few
operations whether its batch holds one adapter or sixteen. Rows of base requests
get nothing; a row may carry several adapters (a subject and a style), whose
deltas add up, as with several active adapters in peft. The arithmetic is
peft's LoRA layer's (``lora_B(lora_A(x)) * scaling``), so a row's output is what
the model with that adapter loaded at that scale gives.

An adapter's tensors live on the LoRA model (so the registry's byte budget and
LRU decide how many stay resident); the UNet never changes shape or modules, so
a compiled UNet is not invalidated by loading or unloading adapters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from atelier.kit.errors import FailedPrecondition

_DOWN, _UP = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class LoraLayer:
    """One layer's delta: ``down`` is A (r, in), or (r, in, kh, kw) for a conv;
    ``up`` is B (out, r), or (out, r, 1, 1)."""

    down: torch.Tensor
    up: torch.Tensor


@dataclass(eq=False)
class LoraAdapter:
    """A LoRA model's UNet deltas by layer name, and its scaling alpha / r."""

    name: str
    layers: dict[str, LoraLayer]
    scaling: float

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for layer in self.layers.values() for t in (layer.down, layer.up))


def load_lora(name: str, weights: Path, pipeline_class, unet: torch.nn.Module, *,
              alpha: float | None, dtype: torch.dtype, device: str,
              prefix: str = "unet") -> LoraAdapter:
    """Read a LoRA safetensors file (diffusers' or peft's layout) for ``unet``, the
    denoiser whose keys start with ``prefix`` (``unet`` or ``transformer``).

    ``alpha``: the scale numerator when the file's metadata gives none (the
    manifest's); the rank when neither does. Every layer must exist in ``unet``
    with matching shapes: FAILED_PRECONDITION otherwise (trained on another base).
    """
    from diffusers.utils import convert_unet_state_dict_to_peft

    loaded = pipeline_class.lora_state_dict(str(weights.parent), weight_name=weights.name,
                                            return_lora_metadata=True)
    # UNet pipelines return (state, network alphas, metadata); transformer ones no alphas.
    state, network_alphas, metadata = loaded if len(loaded) == 3 else (loaded[0], None,
                                                                         loaded[1])
    state = convert_unet_state_dict_to_peft(
        {k.removeprefix(prefix + "."): v for k, v in state.items()
         if not k.startswith("text_")})
    modules = dict(unet.named_modules())
    layers: dict[str, LoraLayer] = {}
    for key in state:
        if not key.endswith(_DOWN):
            continue
        layer_name = key.removesuffix(_DOWN)
        down, up = state[key], state.get(layer_name + _UP)
        target = modules.get(layer_name)
        if up is None or not _fits(target, down, up):
            raise FailedPrecondition(
                f"LoRA weights of {name} do not fit this base model's UNet at {layer_name}")
        layers[layer_name] = LoraLayer(down.to(device, dtype), up.to(device, dtype))
    if not layers:
        raise FailedPrecondition(f"LoRA weights of {name} hold no UNet layer")
    ranks = {layer.down.shape[0] for layer in layers.values()}
    if len(ranks) != 1:
        raise FailedPrecondition(f"LoRA weights of {name} mix ranks {sorted(ranks)}")
    rank = ranks.pop()
    alpha = (metadata or {}).get(f"{prefix}.lora_alpha") or _network_alpha(network_alphas) or alpha
    return LoraAdapter(name, layers, float(alpha or rank) / rank)


def _network_alpha(alphas: dict | None) -> float | None:
    values = {float(v) for v in (alphas or {}).values()}
    return values.pop() if len(values) == 1 else None


def _fits(module: torch.nn.Module | None, down: torch.Tensor, up: torch.Tensor) -> bool:
    if isinstance(module, torch.nn.Linear):
        return (down.ndim == up.ndim == 2 and down.shape[1] == module.in_features
                and up.shape == (module.out_features, down.shape[0]))
    if isinstance(module, torch.nn.Conv2d):
        return (down.ndim == up.ndim == 4 and module.groups == 1
                and down.shape[1:] == (module.in_channels, *module.kernel_size)
                and up.shape == (module.out_channels, down.shape[0], 1, 1))
    return False


@dataclass(frozen=True)
class AdapterUse:
    """An adapter a request applies, at a scale (0..2; 1 is as trained)."""

    adapter: LoraAdapter
    scale: float


@dataclass(eq=False)
class AdapterStack:
    """Several adapters' Linear layers stacked and zero-padded to one rank: per layer,
    ``down`` (K, r, in) and ``up`` (K, out, r), so that one gathered matmul pair
    serves every adapter of a batch (zeros where an adapter lacks a layer or rank:
    they add nothing). Conv layers stay per adapter."""

    adapters: tuple[LoraAdapter, ...]
    linear: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def build(cls, adapters: tuple[LoraAdapter, ...]) -> AdapterStack:
        rank = max(layer.down.shape[0] for a in adapters for layer in a.layers.values())
        shapes: dict[str, LoraLayer] = {}
        for adapter in adapters:
            for name, layer in adapter.layers.items():
                if layer.down.ndim == 2:
                    shapes.setdefault(name, layer)
        linear = {}
        for name, like in shapes.items():
            k = len(adapters)
            down = like.down.new_zeros((k, rank, like.down.shape[1]))
            up = like.up.new_zeros((k, like.up.shape[0], rank))
            for i, adapter in enumerate(adapters):
                layer = adapter.layers.get(name)
                if layer is not None:
                    r = layer.down.shape[0]
                    down[i, :r] = layer.down
                    up[i, :, :r] = layer.up
            linear[name] = (down, up)
        return cls(adapters, linear)


class AdapterStacks:
    """The stacks of the adapter sets batches used last (a few: each is a copy of its
    adapters' tensors). Worker thread only."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._stacks: dict[tuple[int, ...], AdapterStack] = {}

    def get(self, adapters: tuple[LoraAdapter, ...]) -> AdapterStack:
        key = tuple(id(a) for a in adapters)
        stack = self._stacks.pop(key, None) or AdapterStack.build(adapters)
        self._stacks[key] = stack  # most recent last
        while len(self._stacks) > self.keep:
            self._stacks.pop(next(iter(self._stacks)))
        return stack


@dataclass
class RowAdapters:
    """For one batched forward: every (row, adapter) pair, as the row, the adapter's
    slot in ``stack`` and the pair's scale (times the adapter's alpha / r)."""

    batch_size: int
    stack: AdapterStack
    rows: torch.Tensor
    slots: torch.Tensor
    scales: torch.Tensor
    by_adapter: list[tuple[LoraAdapter, torch.Tensor, torch.Tensor]] = field(
        default_factory=list)  # for conv layers: each adapter's rows and scales

    @classmethod
    def plan(cls, rows: Sequence[Sequence[AdapterUse]], device, dtype,
             stacks: AdapterStacks | None = None) -> RowAdapters | None:
        """``rows[i]``: the adapters of batch row i. None when no row has one."""
        pairs = [(i, use) for i, uses in enumerate(rows) for use in uses]
        if not pairs:
            return None
        adapters = tuple(sorted({id(u.adapter): u.adapter for _, u in pairs}.values(),
                                key=lambda a: a.name))
        slot = {id(a): k for k, a in enumerate(adapters)}
        stack = (stacks or AdapterStacks()).get(adapters)

        def tensors(chosen):
            return (torch.tensor([i for i, _ in chosen], device=device),
                    torch.tensor([u.scale * u.adapter.scaling for _, u in chosen],
                                 device=device, dtype=dtype))

        index, scales = tensors(pairs)
        plan = cls(len(rows), stack, index,
                   torch.tensor([slot[id(u.adapter)] for _, u in pairs], device=device),
                   scales)
        if any(layer.down.ndim == 4 for a in adapters for layer in a.layers.values()):
            for adapter in adapters:
                plan.by_adapter.append((adapter, *tensors(
                    [(i, u) for i, u in pairs if u.adapter is adapter])))
        return plan

    def layer_names(self) -> set[str]:
        return {name for adapter in self.stack.adapters for name in adapter.layers}

    def add_deltas(self, name: str, module: torch.nn.Module, x: torch.Tensor,
                   out: torch.Tensor) -> None:
        """``out`` (the base layer's output for ``x``) gains each row's deltas, in place."""
        if x.shape[0] != self.batch_size:
            raise RuntimeError(f"{name} saw a batch of {x.shape[0]} rows, not "
                               f"{self.batch_size}: adapters cannot be applied per row")
        stacked = self.stack.linear.get(name)
        if stacked is not None:
            down, up = stacked
            picked = x.index_select(0, self.rows).to(down.dtype)
            flat = picked.reshape(picked.shape[0], -1, picked.shape[-1])  # (P, tokens, in)
            hidden = torch.bmm(flat, down.index_select(0, self.slots).transpose(1, 2))
            delta = torch.bmm(hidden, up.index_select(0, self.slots).transpose(1, 2))
            delta = delta * self.scales.view(-1, 1, 1)
            out.index_add_(0, self.rows,
                           delta.reshape(*picked.shape[:-1], -1).to(out.dtype))
            return
        for adapter, index, scales in self.by_adapter:  # conv layers
            layer = adapter.layers.get(name)
            if layer is None:
                continue
            picked = x.index_select(0, index).to(layer.down.dtype)
            hidden = F.conv2d(picked, layer.down, None, module.stride, module.padding,
                              module.dilation)
            delta = F.conv2d(hidden, layer.up) * scales.view(-1, 1, 1, 1)
            out.index_add_(0, index, delta.to(out.dtype))


@contextlib.contextmanager
def rows_with_adapters(plan: RowAdapters | None,
                       modules: dict[str, torch.nn.Module]) -> Iterator[None]:
    """While the block runs, the UNet's targeted layers add ``plan``'s deltas.
    ``modules``: the UNet's modules by name (``dict(unet.named_modules())``)."""
    if plan is None:
        yield
        return
    handles = []
    try:
        for name in plan.layer_names():
            module = modules[name]

            def hook(module, args, output, name=name):
                plan.add_deltas(name, module, args[0], output)
                return output

            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
