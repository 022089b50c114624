"""make bench-training: atelier's DreamBooth loops against plain reference loops.

CPU mode (default): the tiny models, batch 2 instance + 2 class examples (prior
preservation), LoRA rank 4, 30 steps, 1 worker. Three comparisons, each loop in
its own child process so that its peak RSS is its own:

- ``ratio``: the service loop (the loop Ray Train workers run,
  atelier.training.loop, from a job stored the way CreateTrainingJob stores it)
  against a plain loop in the style of diffusers' train_dreambooth_lora.py,
  written here; tiny SD at 128 px, text encoder trained.
- ``cached_ratio``: the same two loops at 256 px, the service loop with
  ``cache_latents`` on (no per-step crops, flips or VAE encoder passes); text
  encoder trained.
- ``sdxl_ratio``: the service loop on the tiny SDXL against a plain loop of
  train_dreambooth_lora_sdxl.py's semantics (UNet LoRA, frozen text encoders
  whose embeddings are computed once, VAE encoded every step in fp32,
  add_time_ids per example); 128 px.
- ``flux_ratio``: the service loop on the tiny FLUX.2 [klein] base against a plain
  loop of diffusers' klein DreamBooth LoRA script's semantics (transformer LoRA,
  prompt states computed once, VAE encoded every step, logit-normal sigmas, the
  velocity target); 128 px. ``flux_peak_rss_mib`` beside the reference's peak.
- ``flux_cached_ratio``: the same at 256 px with ``cache_latents`` on.
- a 2-worker Ray run: the whole job through Ray Train with 2 CPU workers, and
  its overhead over the loop's own time.

Each comparison runs in interleaved rounds (service, reference, service, ...,
after a warm-up of each; ``--rounds``, default 3), every loop in a fresh child
process; a ratio is the median of the per-round ratios, printed with its spread
(``<key>_spread=min-max``). 60 steps a loop by default, so that the rounds of a
quiet machine agree.

GPU mode (--gpu): SD-1.5-size, SDXL-size and klein-4B-size models with random
weights in bf16 (512 px, cached at 512 px, SDXL and klein at 1024 px, klein with
gradient checkpointing), 1 worker, no Ray; peak GPU memory of both loops too. Prints each
figure and the ratio as it comes; the last line is a key=value summary.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from service_process import interleaved, ratio, ratio_keys

REPO = Path(__file__).resolve().parent.parent


def make_photos(count: int, size: int) -> list[bytes]:
    import io

    from PIL import Image, ImageDraw

    out = []
    for pose in range(count):
        image = Image.new("RGB", (size, size), (230, 230, 220))
        draw = ImageDraw.Draw(image)
        dx = (pose - 1.5) * size / 10
        draw.ellipse((size * .3 + dx, size * .4, size * .7 + dx, size * .8), fill=(200, 60, 40))
        draw.ellipse((size * .4 + dx, size * .15, size * .6 + dx, size * .35),
                     fill=(240, 190, 60))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


@dataclass(frozen=True)
class Case:
    """One comparison: model, size, whether the text encoder trains, caching."""

    name: str
    model_path: str
    family: str
    size: int
    train_text_encoder: bool
    cache_latents: bool = False
    gradient_checkpointing: bool = False

    @property
    def klein(self) -> bool:
        return self.family == "flux2-klein"


def job_spec(args, case: Case, workers: int):
    from atelier.v1 import common_pb2
    from atelier.v1 import training_pb2 as S

    return S.TrainingJobSpec(
        instance_images=[common_pb2.ImageInput(data=d) for d in make_photos(4, case.size)],
        identifier_token="sks", instance_prompt="a photo of sks toy",
        class_prompt="a photo of a toy",
        prior_preservation=S.PriorPreservation(enabled=True, num_class_images=8,
                                               class_image_steps=2),
        text_encoder=S.TextEncoderTraining(enabled=case.train_text_encoder),
        method=S.FINE_TUNE_METHOD_LORA, lora=S.LoraConfig(rank=4),
        resolution=case.size, max_train_steps=args.steps, train_batch_size=2, seed=1,
        learning_rate=1e-4,
        mixed_precision=S.MIXED_PRECISION_BF16 if args.gpu else S.MIXED_PRECISION_NO,
        resources=S.TrainingResources(num_workers=workers, gpus_per_worker=int(args.gpu)),
        checkpointing=S.CheckpointPolicy(every_n_steps=0, keep_last=1),
        options=S.TrainingOptions(cache_latents=case.cache_latents,
                                  gradient_checkpointing=case.gradient_checkpointing),
        # The loops compared are the training step's; subject scores would add renders
        # the reference loop does not make.
        evaluation=S.SubjectEvaluation(enabled=False),
    )


def prepare_job(args, case: Case, root: Path, workers: int, job_id: str):
    """Store the job as the service would, with its class priors; return the loop config."""
    from atelier.kit.settings import StorageSettings
    from atelier.storage import open_store
    from atelier.training import priors
    from atelier.training.bases import describe_base
    from atelier.training.config import TrainingEngineSettings
    from atelier.training.jobs import JobStore
    from atelier.training.submission import submit_job
    from atelier.training.train_config import TrainConfig
    from atelier.training.worker_config import WorkerConfig

    storage = StorageSettings(local_root=root / "store", bucket="bench")
    store = open_store(storage)
    config = TrainingEngineSettings(base_models={"bench": case.model_path},
                                    default_base_model="bench")
    job, _ = submit_job(JobStore(store), config, "", job_id, job_spec(args, case, workers),
                        base=describe_base(case.model_path))
    pp = job.spec.prior_preservation
    key = priors.cache_key(case.model_path, "bench", job.spec.class_prompt, case.size,
                           pp.class_image_steps, pp.class_image_guidance_scale, job.spec.seed)
    storage_dict = {**storage.model_dump(mode="python"), "local_root": str(root / "store"),
                    "access_key": "", "secret_key": ""}
    if priors.cached_count(store, key) < pp.num_class_images:
        priors.generate_slice(case.model_path, job.spec.class_prompt, case.size,
                              pp.class_image_steps, pp.class_image_guidance_scale,
                              job.spec.seed, list(range(pp.num_class_images)), storage_dict,
                              key)
        store.put_json(f"{priors.PRIORS}{key}/manifest.json", {"count": pp.num_class_images})
    loop_config = WorkerConfig(
        job_id=job_id, train=TrainConfig.from_spec(job.spec, case.family),
        storage=storage_dict, cache_dir=str(root / "models"), base_ref=case.model_path,
        class_keys={0: [priors.image_key(key, i) for i in range(pp.num_class_images)]})
    return storage, config, loop_config


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def service_loop(loop_config, queue) -> None:
    import torch

    torch.manual_seed(0)
    from atelier.kit.settings import StorageSettings
    from atelier.storage import open_store
    from atelier.training.jobs import OUTCOME, JobStore
    from atelier.training.loop import Worker

    Worker(loop_config).train()
    outcome = JobStore(open_store(StorageSettings(**loop_config.storage))).read_mark(
        loop_config.job_id, OUTCOME)
    steps = loop_config.train.max_train_steps
    queue.put({"steps_per_s": steps / outcome["seconds"], "rss_mib": _peak_rss_mib(),
               **_gpu_peak()})


def reference_images(case: Case, loop_config):
    """The job's instance and class images as [-1, 1] CHW tensors at the case's size."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from atelier.kit.settings import StorageSettings
    from atelier.storage import open_store

    store = open_store(StorageSettings(**loop_config.storage))

    def tensor(key):
        image = Image.open(io.BytesIO(store.get_bytes(key))).convert("RGB").resize(
            (case.size, case.size))
        return torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)

    return ([tensor(e.key) for e in loop_config.train.concepts[0].images],
            [tensor(k) for k in loop_config.class_keys[0]])


def step_pixels(instance: list, classes: list, step: int):
    """A reference step's batch: 2 instance then 2 class images, in turn."""
    import torch

    return torch.stack([instance[(2 * step) % len(instance)],
                        instance[(2 * step + 1) % len(instance)],
                        classes[(2 * step) % len(classes)],
                        classes[(2 * step + 1) % len(classes)]])


def reference_loop(case: Case, loop_config, args_dict: dict, queue) -> None:
    """A plain DreamBooth-LoRA loop with prior preservation and AdamW: SD in the style of
    train_dreambooth_lora.py (text-encoder LoRA when the case trains it), or SDXL in the
    style of train_dreambooth_lora_sdxl.py (embeddings of the frozen encoders computed
    once, fp32 VAE, add_time_ids)."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    device = "cuda" if args_dict["gpu"] else "cpu"
    size, path, sdxl = case.size, case.model_path, case.family == "stable-diffusion-xl"
    instance, classes = reference_images(case, loop_config)
    subfolders = [("tokenizer", "text_encoder", CLIPTextModel)]
    if sdxl:
        subfolders.append(("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection))
    tokenizers = [AutoTokenizer.from_pretrained(path, subfolder=t) for t, _, _ in subfolders]
    encoders = [cls.from_pretrained(path, subfolder=e) for _, e, cls in subfolders]
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae").to(device)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    for module in (vae, unet, *encoders):
        module.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    if case.train_text_encoder:
        encoders[0] = inject_adapter_in_model(
            LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                       target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), encoders[0])
    unet.to(device).train()
    for encoder in encoders:
        encoder.to(device).train(case.train_text_encoder)
    params = [p for p in [*unet.parameters(), *encoders[0].parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    prompts = ["a photo of sks toy"] * 2 + ["a photo of a toy"] * 2
    ids = [t(prompts, padding="max_length", max_length=77, truncation=True,
             return_tensors="pt").input_ids.to(device) for t in tokenizers]

    def encode():
        if not sdxl:
            return encoders[0](ids[0])[0], None
        states, pooled = [], None
        for encoder, token_ids in zip(encoders, ids, strict=True):
            out = encoder(token_ids, output_hidden_states=True, return_dict=False)
            pooled, states = out[0], [*states, out[-1][-2]]
        return torch.cat(states, dim=-1), pooled

    dtype = torch.bfloat16 if args_dict["gpu"] else None
    cached = None
    if not case.train_text_encoder:
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            cached = encode()
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 4, device=device)
    start = time.perf_counter()
    for step in range(args_dict["steps"]):
        pixels = step_pixels(instance, classes, step).to(device)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (4,), device=device)
            hidden, pooled = cached or encode()
            extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}} \
                if sdxl else {}
            pred = unet(scheduler.add_noise(latents, noise, t), t, hidden, **extra).sample
            pred, pred_prior = pred.chunk(2)
            target, target_prior = noise.chunk(2)
            loss = F.mse_loss(pred.float(), target.float()) + \
                F.mse_loss(pred_prior.float(), target_prior.float())
        optimizer_step(loss, params, optimizer)
    queue.put(loop_figures(args_dict["steps"], start, device))


def klein_reference_loop(case: Case, loop_config, args_dict: dict, queue) -> None:
    """A plain klein DreamBooth-LoRA loop with the semantics of diffusers' FLUX.2 [klein]
    LoRA script: LoRA on the transformer's attention and MLP linears, the Qwen3 prompt
    states computed once, the VAE encoded every step (posterior mode, patchified,
    batch-norm normalised), logit-normal u picking the scheduler's sigma, the velocity
    target, no loss weighting, prior preservation by halves; AdamW."""

    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from diffusers.training_utils import (
        compute_density_for_timestep_sampling,
        compute_loss_weighting_for_sd3,
    )
    from peft import LoraConfig
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from atelier.models.families.flux2_klein import LORA_TARGETS

    torch.manual_seed(0)
    device = "cuda" if args_dict["gpu"] else "cpu"
    path = case.model_path
    instance, classes = reference_images(case, loop_config)
    dtype = torch.bfloat16 if args_dict["gpu"] else None
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
    vae = AutoencoderKLFlux2.from_pretrained(path, subfolder="vae").to(device)
    transformer = Flux2Transformer2DModel.from_pretrained(path, subfolder="transformer")
    pipe = Flux2KleinPipeline(
        scheduler=scheduler, vae=vae, transformer=transformer, is_distilled=False,
        tokenizer=AutoTokenizer.from_pretrained(path, subfolder="tokenizer"),
        text_encoder=Qwen3ForCausalLM.from_pretrained(path, subfolder="text_encoder").to(device))
    with torch.no_grad():  # the script's pre-computed prompt states
        hidden = pipe.encode_prompt(["a photo of sks toy"] * 2 + ["a photo of a toy"] * 2,
                                    device=device)[0]
    pipe.text_encoder = None  # released, as the script does after encoding
    vae.requires_grad_(False)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGETS))
    if case.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.to(device).train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    text_ids = Flux2KleinPipeline._prepare_text_ids(hidden).to(device)
    start = time.perf_counter()
    for step in range(args_dict["steps"]):
        pixels = step_pixels(instance, classes, step).to(device)
        with torch.no_grad():
            x0 = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
            x0 = (Flux2KleinPipeline._patchify_latents(x0) - mean) / std
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            noise = torch.randn_like(x0)
            u = compute_density_for_timestep_sampling("logit_normal", 4, logit_mean=0.0,
                                                      logit_std=1.0, device=device)
            indices = (u * scheduler.config.num_train_timesteps).long().cpu()
            sigmas = scheduler.sigmas[indices].to(device).view(-1, 1, 1, 1)
            timesteps = scheduler.timesteps[indices].to(device)
            noisy = (1.0 - sigmas) * x0 + sigmas * noise
            ids = Flux2KleinPipeline._prepare_latent_ids(noisy).to(device)
            pred = transformer(hidden_states=Flux2KleinPipeline._pack_latents(noisy),
                               timestep=timesteps / 1000, guidance=None,
                               encoder_hidden_states=hidden, txt_ids=text_ids, img_ids=ids,
                               return_dict=False)[0]
            pred = Flux2KleinPipeline._unpack_latents_with_ids(pred, ids)
            weighting = compute_loss_weighting_for_sd3("none", sigmas)
            error = (weighting.float() * (pred.float() - (noise - x0).float()) ** 2)
            per_row = error.reshape(4, -1).mean(1)
            loss = per_row[:2].mean() + per_row[2:].mean()
        optimizer_step(loss, params, optimizer)
    queue.put(loop_figures(args_dict["steps"], start, device))


def optimizer_step(loss, params, optimizer) -> None:
    """A reference step's backward pass, clipping and AdamW update."""
    import torch

    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def loop_figures(steps: int, start: float, device: str) -> dict:
    """A finished loop's steps per second and peak memory."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    return {"steps_per_s": steps / (time.perf_counter() - start), "rss_mib": _peak_rss_mib(),
            **_gpu_peak()}


def _gpu_peak() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"gpu_peak_mib": torch.cuda.max_memory_allocated() / 2**20}


def in_child(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get(timeout=3600)
    process.join()
    return result


def ray_run(args, case: Case, root: Path) -> dict:
    from atelier.storage import open_store
    from atelier.training.jobs import OUTCOME, JobStore
    from atelier.training.runner import run_job

    storage, config, _ = prepare_job(args, case, root, 2, "bench-ray")
    config = config.model_copy(update={"local_ray_cpus": 2})
    start = time.perf_counter()
    state = run_job(open_store(storage), storage, config, root / "models", "bench-ray")
    wall = time.perf_counter() - start
    outcome = JobStore(open_store(storage)).read_mark("bench-ray", OUTCOME) or {}
    return {"state": state.value, "wall_s": wall, "loop_s": outcome.get("seconds", float("nan"))}


def compare(args, case: Case, root: Path) -> tuple[dict, dict]:
    """(service loop, reference loop) figures of one case, each printed: interleaved
    rounds (service, reference, service, ...) after a warm-up of each, every loop in a
    fresh child process and every service run a fresh job. Steps per second are
    medians, the ratio the median of per-round ratios; RSS the highest peak."""
    rounds = itertools.count()
    job_name = f"bench-{case.name.replace('_', '-')}"
    _, _, first = prepare_job(args, case, root, 1, f"{job_name}-0")

    def ours() -> dict:
        n = next(rounds)
        config = first if n == 0 else prepare_job(args, case, root, 1, f"{job_name}-{n}")[2]
        return in_child(service_loop, config)

    def ref() -> dict:
        loop = klein_reference_loop if case.klein else reference_loop
        return in_child(loop, case, first, {"gpu": args.gpu, "steps": args.steps})

    runs = interleaved(args.rounds, {"service": ours, "reference": ref})
    speed = {name: [r["steps_per_s"] for r in results] for name, results in runs.items()}
    figures = ratio(speed["service"], speed["reference"])
    mine = {"steps_per_s": statistics.median(speed["service"]),
            "rss_mib": max(r["rss_mib"] for r in runs["service"]), "ratio": figures,
            "gpu_peak_mib": max(r.get("gpu_peak_mib", 0) for r in runs["service"])}
    theirs = {"steps_per_s": statistics.median(speed["reference"]),
              "rss_mib": max(r["rss_mib"] for r in runs["reference"]),
              "gpu_peak_mib": max(r.get("gpu_peak_mib", 0) for r in runs["reference"])}
    print(f"[{case.name}] {case.family} {case.size} px, text encoder "
          f"{'trained' if case.train_text_encoder else 'frozen'}"
          f"{', latents cached' if case.cache_latents else ''}; {args.rounds} rounds of "
          f"{args.steps} steps", flush=True)
    print(f"  reference loop {theirs['steps_per_s']:7.2f} steps/s   peak RSS "
          f"{theirs['rss_mib']:8.0f} MiB   rounds "
          + " ".join(f"{v:.2f}" for v in speed["reference"]), flush=True)
    print(f"  service loop   {mine['steps_per_s']:7.2f} steps/s   peak RSS "
          f"{mine['rss_mib']:8.0f} MiB   rounds "
          + " ".join(f"{v:.2f}" for v in speed["service"]), flush=True)
    print(f"  ratio          {figures[0]:7.2f}x steps/s ({figures[1]:.2f}-{figures[2]:.2f})   "
          f"{mine['rss_mib'] / theirs['rss_mib']:6.2f}x RSS", flush=True)
    if mine["gpu_peak_mib"]:
        print(f"  peak GPU memory  service {mine['gpu_peak_mib']:.0f} MiB   reference "
              f"{theirs['gpu_peak_mib']:.0f} MiB", flush=True)
    return mine, theirs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--steps", type=int, default=60,
                        help="training steps of each loop (long enough that rounds agree)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measured rounds of each comparison, after a warm-up")
    parser.add_argument("--no-ray", action="store_true", help="skip the 2-worker Ray run")
    parser.add_argument("--only", default="",
                        help="comma-separated comparisons of base, cached, sdxl, flux, "
                             "flux_cached, ray (default: all)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="atelier-train-bench-"))
    chosen = [w.strip() for w in args.only.split(",") if w.strip()] or \
        ["base", "cached", "sdxl", "flux", "flux_cached", "ray"]
    if args.gpu:
        import torch

        from atelier.tiny_models.flux2_klein import build_random_klein_4b
        from atelier.tiny_models.stable_diffusion import build_random_sd15, build_random_sdxl

        sd = str(build_random_sd15(root / "sd15-random", dtype=torch.bfloat16, device="cuda"))
        sdxl = str(build_random_sdxl(root / "sdxl-random", device="cuda"))
        klein = str(build_random_klein_4b(root / "klein-4b-random", device="cuda")) \
            if any(c.startswith("flux") for c in chosen) else ""
        sizes = {"base": 512, "cached": 512, "sdxl": 1024, "flux": 1024, "flux_cached": 1024}
    else:
        from atelier.tiny_models.cache import ensure_tiny_model

        cache = REPO / ".cache/atelier/models"
        sd, sdxl = str(ensure_tiny_model("stable-diffusion", cache)), \
            str(ensure_tiny_model("stable-diffusion-xl", cache))
        klein = str(ensure_tiny_model("flux2-klein-base", cache))
        sizes = {"base": 128, "cached": 256, "sdxl": 128, "flux": 128, "flux_cached": 256}
    print(f"{args.steps} steps  batch 2 + 2 class  LoRA r4  "
          f"{'cuda bf16' if args.gpu else 'cpu fp32'}", flush=True)
    cases = [Case("base", sd, "stable-diffusion", sizes["base"], True),
             Case("cached", sd, "stable-diffusion", sizes["cached"], True, cache_latents=True),
             Case("sdxl", sdxl, "stable-diffusion-xl", sizes["sdxl"], False),
             Case("flux", klein, "flux2-klein", sizes["flux"], False,
                  gradient_checkpointing=args.gpu),
             Case("flux_cached", klein, "flux2-klein", sizes["flux_cached"], False,
                  cache_latents=True, gradient_checkpointing=args.gpu)]
    parts = []
    for case in cases:
        if case.name not in chosen:
            continue
        ours, ref = compare(args, case, root)
        if case.name == "base":
            parts.append(f"service_steps_per_s={ours['steps_per_s']:.3f} "
                         f"reference_steps_per_s={ref['steps_per_s']:.3f} "
                         f"{ratio_keys('ratio', ours['ratio'])} "
                         f"service_rss_mib={ours['rss_mib']:.0f} "
                         f"reference_rss_mib={ref['rss_mib']:.0f}")
        elif case.name == "flux":
            parts.append(f"{ratio_keys('flux_ratio', ours['ratio'])} "
                         f"flux_peak_rss_mib={ours['rss_mib']:.0f} "
                         f"flux_reference_peak_rss_mib={ref['rss_mib']:.0f}")
        else:
            parts.append(f"{ratio_keys(f'{case.name}_ratio', ours['ratio'])} "
                         f"{case.name}_rss_mib={ours['rss_mib']:.0f} "
                         f"{case.name}_reference_rss_mib={ref['rss_mib']:.0f}")
        if ours["gpu_peak_mib"]:
            parts.append(f"{case.name}_gpu_peak_mib={ours['gpu_peak_mib']:.0f} "
                         f"{case.name}_reference_gpu_peak_mib={ref['gpu_peak_mib']:.0f}")
    summary = " ".join(parts)
    if "ray" in chosen and not args.no_ray and not args.gpu:
        ray = ray_run(args, cases[0], root)
        print(f"ray 2 workers    {args.steps / ray['loop_s']:7.2f} steps/s in the loop; job "
              f"{ray['wall_s']:.1f} s wall for {ray['loop_s']:.1f} s of training "
              f"(overhead {ray['wall_s'] - ray['loop_s']:.1f} s: Ray start, workers, priors, "
              f"export)   {ray['state']}")
        summary += (f" ray2_steps_per_s={args.steps / ray['loop_s']:.3f} "
                    f"ray2_wall_s={ray['wall_s']:.1f} ray2_overhead_s="
                    f"{ray['wall_s'] - ray['loop_s']:.1f}")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
