"""Batch buckets and the compiled UNet: padding rows never change real rows, and a
service with ``compile_unet`` warms every bucket before SERVING and generates what
diffusers' pipeline does."""

from __future__ import annotations

import grpc
import torch

from atelier.generation.job import Job
from atelier.generation.registry import LoadedModel, ModelEntry
from atelier.generation.runner import DenoiseRunner
from atelier.generation.schedulers import scheduler_factory
from atelier.models.pipelines import load_pipeline
from atelier.v1 import generation_pb2, generation_pb2_grpc
from tests.generation.conftest import (
    assert_close,
    decode,
    reference_images,
    reference_pipeline,
    start_generation,
)
from tests.kit.test_server import sample, scrape

PROMPT = "a photo of sks dog"


def final_latents(model, runner: DenoiseRunner, jobs: list[Job]) -> list[torch.Tensor]:
    with torch.inference_mode():
        seqs = runner.start(jobs)
        ids = [s.seq_id for s in seqs]
        for _ in range(len(seqs[0].timesteps)):
            runner.step("group", ids)
    return [s.latents.clone() for s in seqs]


def test_padding_rows_do_not_change_real_rows(tiny_sd):
    """Five images, guided and unguided (8 rows), padded to a bucket of 16: every real
    row ends where it does unpadded."""
    pipe = load_pipeline(tiny_sd, dtype=torch.float32, device="cpu")
    model = LoadedModel(ModelEntry("tiny-sd", "base", str(tiny_sd)), pipe, 0)

    def jobs():
        make = scheduler_factory("euler_ancestral", pipe.scheduler.config, 4)
        return [Job(model=model, prompt=PROMPT, negative_prompt=negative, width=64,
                    height=64, num_inference_steps=4, guidance_scale=scale,
                    guidance_rescale=0.0, seeds=seeds, make_scheduler=make,
                    emit=lambda event: None)
                for negative, scale, seeds in (("blurry", 7.5, [1, 2, 3]), ("", 1.0, [4, 5]))]

    plain = DenoiseRunner(device="cpu")
    padded = DenoiseRunner(device="cpu", buckets=[4, 16])
    assert padded.bucket(8) == 16 and padded.bucket(17) == 17 and plain.bucket(8) == 8
    for a, b in zip(final_latents(model, plain, jobs()), final_latents(model, padded, jobs()),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_cuda_graph_mode_runs_and_keeps_every_row(tiny_sd):
    """``cuda_graphs`` compiles in reduce-overhead mode (on CPU without graphs, where
    it can run here): warmed at its bucket, its rows end where eager rows do."""
    pipe = load_pipeline(tiny_sd, dtype=torch.float32, device="cpu")
    model = LoadedModel(ModelEntry("tiny-sd", "base", str(tiny_sd)), pipe, 0)

    def jobs():
        make = scheduler_factory("ddim", pipe.scheduler.config, 3)
        return [Job(model=model, prompt=PROMPT, negative_prompt="", width=64, height=64,
                    num_inference_steps=3, guidance_scale=6.0, guidance_rescale=0.0,
                    seeds=[1, 2], make_scheduler=make, emit=lambda event: None)]

    graphs = DenoiseRunner(device="cpu", buckets=[4], compile_unet=True, cuda_graphs=True)
    with torch.inference_mode():  # as on the worker thread
        assert graphs.cuda_graphs and graphs.warm(model, 64, 64) == 1
    eager = DenoiseRunner(device="cpu")
    for a, b in zip(final_latents(model, eager, jobs()), final_latents(model, graphs, jobs()),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not DenoiseRunner(device="cpu", cuda_graphs=True).cuda_graphs  # needs compile


def test_compiled_service_warms_its_buckets_and_matches_diffusers(tmp_path, model_cache,
                                                                  tiny_sd):
    server = start_generation(tmp_path, model_cache, compile_unet=True, batch_buckets=[2, 4],
                              max_batch_size=2, max_images_per_request=2, ready_timeout=600)
    try:
        samples = scrape(server.server.metrics_port)
        # start_generation returned once SERVING: by then both buckets had compiled.
        assert sample(samples, "atelier_generation_unet_warm_buckets") == 2
        assert sample(samples, "atelier_generation_unet_warmup_seconds") > 0
        with grpc.insecure_channel(server.target) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            reply = stub.Generate(generation_pb2.GenerateRequest(
                prompt=PROMPT, num_images=2, num_inference_steps=6, seed=5,
                scheduler="ddim"), timeout=600)
            unguided = stub.Generate(generation_pb2.GenerateRequest(
                prompt=PROMPT, num_inference_steps=6, seed=8, guidance_scale=1.0),
                timeout=600)  # one row, padded to the bucket of 2
        pipe = reference_pipeline(tiny_sd)
        for image, ref in zip(reply.images, reference_images(
                pipe, prompt=PROMPT, seed=5, num_images=2, steps=6, scheduler="ddim"),
                strict=True):
            assert_close(decode(image), ref)
        assert_close(decode(unguided.images[0]), reference_images(
            pipe, prompt=PROMPT, seed=8, steps=6, guidance_scale=1.0)[0])
    finally:
        server.stop()
