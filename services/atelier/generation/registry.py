"""The model registry: base models from config, fine-tuned models from the object store,
loaded on demand into an LRU cache with a memory budget.

- Loading runs in a thread, so requests to models already loaded go on.
- Concurrent requests for a model that is loading await the same load.
- A LoRA model is its adapter's tensors (``adapters.LoraAdapter``) over its base:
  it shares every base weight, and the base UNet is never modified, so any mix
  of adapters runs in one forward (``adapters.py``) and loading or unloading one
  never touches a running batch. A full fine-tune shares the base's VAE,
  tokenizer and (unless it was trained) text encoder.
- A model's family (``atelier.models.families``: SD 1.x/2.x, SDXL or FLUX.2
  [klein]) comes from its pipeline class for a base, from the manifest for a
  fine-tune (which must match its base's). ``LoadedModel.info`` is what the
  engine and the servicer know of it: family, default size, steps and guidance,
  and the modes it takes.
- Fine-tuned models belong to a principal (the manifest's ``owner``): others
  get NOT_FOUND, as for a model that does not exist.
- A deleted (or re-exported) model is forgotten by every replica within
  ``model_refresh_interval_s``: ``refresh`` compares what is loaded with the
  manifests in the store. Requests already running on it finish first.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from atelier.generation.adapters import LoraAdapter, load_lora
from atelier.generation.config import GenerationEngineSettings
from atelier.generation.metrics import GenerationMetrics
from atelier.kit.auth import Principal
from atelier.kit.errors import AtelierError, FailedPrecondition, NotFound, ResourceExhausted
from atelier.kit.validation import echo
from atelier.models.families import Family, FamilyInfo, family_of
from atelier.models.families.stable_diffusion import INPAINTING_CHANNELS, LATENT_CHANNELS_ONLY
from atelier.models.manifest import MANIFEST_NAME, MODELS_PREFIX, ModelManifest, model_key
from atelier.models.pipelines import load_pipeline, prepare
from atelier.models.runtime import one_load_at_a_time
from atelier.models.sources import download_store_prefix, remove_store_mirror, resolve_model_ref
from atelier.storage import ObjectNotFound, ObjectStore

log = logging.getLogger("atelier.generation.registry")
audit = logging.getLogger("atelier.audit")

NOT_LOADED, LOADING, LOADED, FAILED = "NOT_LOADED", "LOADING", "LOADED", "FAILED"
DEFAULT_CPU_CACHE_BYTES = 8 * 1024**3


#: What requests need to know of a loaded model (its family's view of it).
ModelInfo = FamilyInfo


@dataclass(frozen=True)
class ModelEntry:
    """A model the service knows about (loaded or not)."""

    model_id: str
    kind: str  # "base", "lora" or "full"
    source: str
    manifest: ModelManifest | None = None
    create_time: datetime | None = None

    @property
    def name(self) -> str:
        return f"models/{self.model_id}"

    @property
    def base_id(self) -> str | None:
        return self.manifest.base_model.removeprefix("models/") if self.manifest else None

    @property
    def owner(self) -> str:
        """The owning principal; "" for base models and models without one (public)."""
        return self.manifest.owner if self.manifest else ""

    @property
    def family(self) -> str | None:
        """From the manifest; None for a base model (known once loaded)."""
        return self.manifest.family if self.manifest else None


@dataclass(eq=False)
class LoadedModel:
    """A model in memory. ``pipeline`` is what the engine runs: a LoRA model's is
    its base's (with its own text encoders when it trained them), and ``lora``
    holds its adapter."""

    entry: ModelEntry
    pipeline: Any
    nbytes: int
    base: LoadedModel | None = None
    lora: LoraAdapter | None = None
    compiled_unet: Any = None  # torch.compile of pipeline.unet, made on first use
    refs: int = 0
    last_used: float = field(default_factory=time.monotonic)
    _validation_tokenizer: Any = None
    _info: ModelInfo | None = None
    _family: Family | None = None
    _unet_modules: dict[str, torch.nn.Module] | None = None

    @property
    def model_id(self) -> str:
        return self.entry.model_id

    @property
    def family(self) -> Family:
        if self._family is None:
            self._family = family_of(self.pipeline)
        return self._family

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            self._info = self.family.info(self.pipeline)
        return self._info

    @property
    def denoiser(self) -> torch.nn.Module:
        """The UNet or transformer that denoises."""
        return self.family.denoiser(self.pipeline)

    @property
    def validation_tokenizer(self):
        """A private copy of the tokenizer for request checks on the event loop.

        Fast tokenizers keep padding/truncation state on a shared Rust object, so the
        worker thread's batched encoding and a concurrent length check must not share one.
        """
        if self._validation_tokenizer is None:
            self._validation_tokenizer = copy.deepcopy(self.pipeline.tokenizer)
        return self._validation_tokenizer

    @property
    def unet_owner(self) -> LoadedModel:
        """The model whose UNet runs this one's forwards: the base of a LoRA model."""
        return self.base if self.lora is not None else self

    @property
    def own_text_encoders(self) -> bool:
        """A LoRA model that trained its text encoder brings its own (merged) one."""
        return self.lora is not None and self.pipeline is not self.base.pipeline

    @property
    def unet_modules(self) -> dict[str, torch.nn.Module]:
        """The denoiser's modules by name, where adapters hook in."""
        if self._unet_modules is None:
            self._unet_modules = dict(self.denoiser.named_modules())
        return self._unet_modules


def module_bytes(*modules: torch.nn.Module) -> int:
    return sum(
        t.numel() * t.element_size()
        for m in modules if m is not None
        for t in [*m.parameters(), *m.buffers()]
    )


class ModelRegistry:
    """Knows every model, loads and unloads them, and counts who uses them."""

    def __init__(
        self,
        settings: GenerationEngineSettings,
        cache_dir: Path,
        store: ObjectStore,
        device: str,
        dtype: torch.dtype,
        metrics: GenerationMetrics,
    ) -> None:
        self.settings = settings
        self.cache_dir = cache_dir
        self.store = store
        self.device = device
        self.dtype = dtype
        self.metrics = metrics
        self.loaded: dict[str, LoadedModel] = {}
        self.failed: set[str] = set()
        self._loading: dict[str, asyncio.Future] = {}
        self._load_tasks: set[asyncio.Task] = set()
        self._manifests: dict[str, tuple[tuple, ModelManifest | None]] = {}
        self.budget = cache_budget(settings, device)
        """Bytes loaded models may hold (``model_cache_bytes``, or a share of the device)."""
        metrics.model_cache_budget_bytes.set(self.budget)

    # -- catalog ------------------------------------------------------------------
    def _base_entries(self) -> dict[str, ModelEntry]:
        return {mid: ModelEntry(mid, "base", ref) for mid, ref in self.settings.base_models.items()}

    def _stored_entries(self) -> dict[str, ModelEntry]:
        entries = {}
        for info in self.store.list(MODELS_PREFIX):
            parts = info.key.split("/")
            if len(parts) != 3 or parts[2] != MANIFEST_NAME:
                continue
            stamp = (info.size, info.etag, info.last_modified)
            cached = self._manifests.get(info.key)
            if cached is None or cached[0] != stamp:
                try:
                    manifest = ModelManifest.model_validate(self.store.get_json(info.key))
                except (ValueError, ObjectNotFound) as exc:
                    log.warning("skipping invalid manifest", extra={"key": info.key,
                                                                    "error": str(exc)[:200]})
                    manifest = None
                cached = (stamp, manifest)
                self._manifests[info.key] = cached
            manifest = cached[1]
            if manifest is not None and manifest.model_id == parts[1]:
                entries[parts[1]] = ModelEntry(
                    parts[1], manifest.kind, f"store://{MODELS_PREFIX}{parts[1]}", manifest,
                    manifest.create_time,
                )
        return entries

    def catalog(self) -> dict[str, ModelEntry]:
        """Every known model by id: configured bases, then fine-tunes in the store."""
        entries = self._stored_entries()
        entries.update(self._base_entries())  # configured ids win over stored ones
        return dict(sorted(entries.items()))

    def entry(self, model_id: str, principal: Principal | None = None) -> ModelEntry:
        """The model's entry; NOT_FOUND if it does not exist or ``principal`` may not
        see it."""
        model_id = model_id.removeprefix("models/")
        base = self._base_entries().get(model_id)
        if base is not None:
            return base
        loaded = self.loaded.get(model_id)
        entry = loaded.entry if loaded is not None else self._stored_entries().get(model_id)
        if entry is None or (principal is not None and not principal.owns(entry.owner)):
            raise NotFound("model", f"models/{model_id}")
        return entry

    # -- deletion and refresh ------------------------------------------------------------
    def delete_stored(self, model_id: str, principal: Principal) -> int:
        """Remove a fine-tuned model from the store (manifest first, so no replica
        lists or loads it from then on). Blocking; returns the objects deleted."""
        entry = self.entry(model_id, principal)
        if entry.kind == "base":
            raise FailedPrecondition(f"{entry.name} is a configured base model; remove it "
                                     "from generation.base_models instead")
        prefix = model_key(entry.model_id) + "/"
        removed = 0
        try:
            self.store.delete(model_key(entry.model_id, MANIFEST_NAME))
            removed += 1
        except ObjectNotFound:
            pass
        removed += self.store.delete_prefix(prefix)
        remove_store_mirror(self.store, MODELS_PREFIX + entry.model_id, self.cache_dir)
        audit.info("deleted model", extra={"principal": principal.name, "model": entry.name,
                                           "owner": entry.owner, "objects": removed})
        return removed

    async def forget(self, model_id: str) -> None:
        """Stop serving a loaded model: new requests no longer get it at once;
        it is unloaded as soon as the requests running on it finish."""
        model = self.loaded.pop(model_id, None)
        self._manifests.pop(model_key(model_id, MANIFEST_NAME), None)
        if model is None:
            return
        log.info("model forgotten (deleted or changed in the store)",
                 extra={"model": model.entry.name})
        while model.refs > 0:
            await asyncio.sleep(0.05)
        await self.unload(model)
        await asyncio.to_thread(remove_store_mirror, self.store,
                                MODELS_PREFIX + model_id, self.cache_dir)

    async def refresh(self) -> None:
        """Forget loaded fine-tuned models whose manifest was deleted or replaced."""
        stored = await asyncio.to_thread(self._stored_entries)
        for model_id, model in list(self.loaded.items()):
            if model.entry.kind == "base":
                continue
            current = stored.get(model_id)
            if current is None or current.manifest != model.entry.manifest:
                await self.forget(model_id)

    def state(self, model_id: str) -> str:
        if model_id in self.loaded:
            return LOADED
        if model_id in self._loading:
            return LOADING
        return FAILED if model_id in self.failed else NOT_LOADED

    def held_bytes(self) -> int:
        return sum(m.nbytes for m in self.loaded.values())

    # -- loading --------------------------------------------------------------------
    async def acquire(self, model_id: str) -> LoadedModel:
        """The loaded model, loading it first if needed; call ``release`` when done."""
        model_id = model_id.removeprefix("models/")
        model = self.loaded.get(model_id)
        if model is None:
            pending = self._loading.get(model_id)
            if pending is None:
                # Registered before any await, so concurrent callers join this load.
                pending = asyncio.get_running_loop().create_future()
                self._loading[model_id] = pending
                task = asyncio.create_task(self._load(model_id, pending))
                self._load_tasks.add(task)
                task.add_done_callback(self._load_tasks.discard)
            model = await asyncio.shield(pending)
        model.refs += 1
        model.last_used = time.monotonic()
        return model

    def release(self, model: LoadedModel) -> None:
        model.refs -= 1
        model.last_used = time.monotonic()

    async def _load(self, model_id: str, done: asyncio.Future) -> None:
        start = time.perf_counter()
        base: LoadedModel | None = None
        entry = ModelEntry(model_id, "unknown", "")
        try:
            entry = await asyncio.to_thread(self.entry, model_id)
            if entry.kind == "base":
                pipeline = await asyncio.to_thread(self._load_base_pipeline, entry)
                nbytes = module_bytes(family_of(pipeline).denoiser(pipeline), pipeline.vae,
                                      pipeline.text_encoder,
                                      getattr(pipeline, "text_encoder_2", None))
                await self._make_room(nbytes, entry.model_id)
                model = LoadedModel(entry, pipeline, nbytes)
            else:
                base_id = self._base_to_load_over(entry)
                if base_id is None or base_id == entry.model_id:
                    raise FailedPrecondition(f"model {entry.name} names no usable base model")
                base = await self.acquire(base_id)  # held while this model is loaded
                if entry.family != base.info.family:
                    raise FailedPrecondition(
                        f"model {entry.name} is {entry.family} but its base models/{base_id} "
                        f"is {base.info.family}")
                local = await asyncio.to_thread(
                    download_store_prefix, self.store, MODELS_PREFIX + entry.model_id,
                    self.cache_dir,
                )
                model = await self._load_fine_tune(entry, base, local)
            self.loaded[entry.model_id] = model
            self.failed.discard(entry.model_id)
            self.metrics.model_loads.labels("ok").inc()
            self.metrics.model_load_seconds.observe(time.perf_counter() - start)
            self.metrics.model_cache_bytes.set(self.held_bytes())
            log.info("model loaded", extra={"model": entry.name, "kind": entry.kind,
                                            "bytes": model.nbytes,
                                            "seconds": round(time.perf_counter() - start, 3)})
            done.set_result(model)
        except BaseException as exc:
            if base is not None:
                self.release(base)
            if not (isinstance(exc, NotFound) and entry.kind == "unknown"):
                # A known model that failed to load (unknown names are not remembered,
                # so clients cannot grow this set).
                self.failed.add(model_id)
                self.metrics.model_loads.labels("error").inc()
                log.warning("model load failed",
                            extra={"model": entry.name, "error": repr(exc)[:300]})
            done.set_exception(exc)
            done.exception()  # mark retrieved: waiters re-raise it themselves
        finally:
            self._loading.pop(model_id, None)

    def _base_to_load_over(self, entry: ModelEntry) -> str | None:
        """The base a fine-tune loads over: its own, unless that is not loaded and a base
        it also fits is (a klein LoRA trained on ``base``, served on the distilled
        model, then costs no second model in memory; nor does a deployment that
        configures only the distilled one)."""
        own = entry.base_id
        if own in self.loaded or entry.manifest is None:
            return own
        for other in entry.manifest.fits_bases:
            other_id = other.removeprefix("models/")
            if other_id in self.loaded:
                return other_id
        return own

    async def _load_fine_tune(self, entry: ModelEntry, base: LoadedModel,
                              local: Path) -> LoadedModel:
        """A LoRA or full fine-tune from its mirrored folder. Weights that cannot be
        read (missing, truncated, not safetensors) are FAILED_PRECONDITION naming the
        model, with the cause in the log and no host path in the answer."""
        try:
            return await (self._load_lora(entry, base, local) if entry.kind == "lora"
                          else self._load_full(entry, base, local))
        except (AtelierError, MemoryError, torch.OutOfMemoryError):
            raise
        except Exception as exc:
            log.warning("model weights unreadable", extra={"model": entry.name,
                                                            "error": repr(exc)[:300]})
            raise FailedPrecondition(
                f"{entry.name}: its stored weights cannot be read ({type(exc).__name__}); "
                "export it again or delete it") from None

    def _load_base_pipeline(self, entry: ModelEntry):
        path = resolve_model_ref(entry.source, cache_dir=self.cache_dir, store=self.store,
                                 field="model")
        try:
            pipeline = load_pipeline(path, dtype=self.dtype, device=self.device)
        except (ValueError, KeyError) as exc:
            raise FailedPrecondition(f"{entry.name}: {exc}") from None
        if not hasattr(pipeline, "unet"):
            return pipeline
        channels = pipeline.unet.config.in_channels
        if channels not in (LATENT_CHANNELS_ONLY, INPAINTING_CHANNELS):
            raise FailedPrecondition(
                f"{entry.name}: a UNet with {channels} input channels is neither a "
                f"text-to-image ({LATENT_CHANNELS_ONLY}) nor an inpainting "
                f"({INPAINTING_CHANNELS}) UNet")
        return self._channels_last(pipeline)

    def _prepare(self, pipeline):
        """A pipeline assembled from loaded modules, made ready like a loaded one."""
        return self._channels_last(prepare(pipeline, self.device))

    def _channels_last(self, pipeline):
        if self.device == "cuda" and self.settings.channels_last and hasattr(pipeline, "unet"):
            pipeline.unet.to(memory_format=torch.channels_last)
        return pipeline

    async def _load_full(self, entry: ModelEntry, base: LoadedModel, local: Path) -> LoadedModel:
        @one_load_at_a_time
        def load():
            from diffusers import UNet2DConditionModel

            unet = UNet2DConditionModel.from_pretrained(weights_path(entry, local, "unet"),
                                                        use_safetensors=True,
                                                        dtype=self.dtype)
            components = {**base.pipeline.components, "unet": unet,
                          **self._own_text_encoders(entry, local)}
            return self._prepare(type(base.pipeline)(**components))

        pipeline = await asyncio.to_thread(load)
        own = [pipeline.unet, *(getattr(pipeline, name)
                                for name in _trained_text_encoders(entry))]
        nbytes = module_bytes(*own)
        await self._make_room(nbytes, entry.model_id)
        return LoadedModel(entry, pipeline, nbytes, base=base)

    async def _load_lora(self, entry: ModelEntry, base: LoadedModel, local: Path) -> LoadedModel:
        weights = weights_path(entry, local, "lora")
        await self._make_room(weights.stat().st_size, entry.model_id)
        denoiser = base.denoiser
        lora = await asyncio.to_thread(
            load_lora, entry.name, weights, type(base.pipeline), denoiser,
            prefix=base.family.denoiser_attribute, alpha=entry.manifest.lora_alpha,
            dtype=denoiser.dtype, device=self.device)
        nbytes = lora.nbytes
        pipeline = base.pipeline
        trained = _trained_text_encoders(entry)
        if trained:
            # Trained text encoders: this model's own, beside the shared UNet and VAE.
            def own_text_encoders():
                encoders = {name: module.to(self.device) for name, module
                            in self._own_text_encoders(entry, local).items()}
                return type(base.pipeline)(**{**base.pipeline.components, **encoders})

            pipeline = await asyncio.to_thread(own_text_encoders)
            nbytes += module_bytes(*(getattr(pipeline, name) for name in trained))
        return LoadedModel(entry, pipeline, nbytes, base=base, lora=lora)

    @one_load_at_a_time
    def _own_text_encoders(self, entry: ModelEntry, local: Path) -> dict[str, Any]:
        """The text encoders a fine-tune trained, by pipeline component name."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        classes = {"text_encoder": CLIPTextModel,
                   "text_encoder_2": CLIPTextModelWithProjection}
        return {name: classes[name].from_pretrained(weights_path(entry, local, name),
                                                    use_safetensors=True, dtype=self.dtype)
                for name in _trained_text_encoders(entry)}

    # -- eviction -------------------------------------------------------------------
    async def _make_room(self, needed: int, for_model: str) -> None:
        """Unload idle models, least recently used first and the default model last,
        until ``needed`` more bytes fit. The default model may yield: an idle model
        is only memory, and the next request for it loads it again (documented in
        docs/generation.md). A model in use is never unloaded."""
        budget = self.budget
        if needed > budget:
            raise FailedPrecondition(
                f"models/{for_model} needs {needed} bytes, more than the whole model cache "
                f"({budget} bytes, generation.model_cache_bytes)")
        while self.held_bytes() + needed > budget:
            idle = [m for m in self.loaded.values() if m.refs == 0]
            if not idle:
                raise ResourceExhausted(self._full_message(needed, for_model), retry_after=5.0)
            victim = min(idle, key=lambda m: (m.model_id == self.settings.default_model,
                                              m.last_used))
            await self.unload(victim)

    def _full_message(self, needed: int, for_model: str) -> str:
        """Why nothing can be unloaded: every loaded model and what holds it."""
        holders = []
        for m in sorted(self.loaded.values(), key=lambda m: -m.nbytes):
            children = sum(1 for other in self.loaded.values() if other.base is m)
            users = m.refs - children
            why = [f"{users} request{'s' if users != 1 else ''}"] if users else []
            if children:
                why.append(f"base of {children} loaded model{'s' if children != 1 else ''}")
            default = ", the default model" if m.model_id == self.settings.default_model else ""
            holders.append(f"{m.entry.name} ({m.nbytes} bytes{default}; held by "
                           f"{' and '.join(why)})")
        return (f"model cache is full ({self.held_bytes()} of {self.budget} bytes in use) and "
                f"every loaded model is in use, so none can be unloaded to load "
                f"models/{for_model} ({needed} bytes): {'; '.join(holders)}")

    async def unload(self, model: LoadedModel) -> None:
        """Drop a loaded, unused model (a LoRA model: its adapter's tensors)."""
        if self.loaded.get(model.model_id) is model:
            self.loaded.pop(model.model_id)
        if model.base is not None:
            self.release(model.base)
        model.pipeline = model.lora = model.compiled_unet = None
        self.metrics.model_cache_bytes.set(self.held_bytes())
        log.info("model unloaded", extra={"model": model.entry.name})


def weights_path(entry: ModelEntry, local: Path, field: str) -> Path:
    """The manifest's ``weights.<field>`` under the model's folder ``local``; a path
    that leads outside it (``..``, absolute, through a link) is FAILED_PRECONDITION
    naming the field: a manifest in the store must not make the service read any
    other local file."""
    relative = getattr(entry.manifest.weights, field)
    path = (local / relative).resolve()
    if not path.is_relative_to(local.resolve()):
        raise FailedPrecondition(f"{entry.name}: manifest weights.{field} "
                                 f"({echo(relative)}) leads outside the model's folder")
    return path


def cache_budget(settings: GenerationEngineSettings, device: str) -> int:
    """``model_cache_bytes`` when set; else ``model_cache_fraction`` of the CUDA
    device's memory, or 8 GiB elsewhere."""
    if settings.model_cache_bytes is not None:
        return settings.model_cache_bytes
    if device.startswith("cuda") and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        return int(total * settings.model_cache_fraction)
    return DEFAULT_CPU_CACHE_BYTES


def _trained_text_encoders(entry: ModelEntry) -> list[str]:
    weights = entry.manifest.weights
    return [name for name in ("text_encoder", "text_encoder_2") if getattr(weights, name)]
