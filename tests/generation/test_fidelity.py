"""Images equal diffusers' StableDiffusionPipeline, alone or batched with others."""

from __future__ import annotations

import threading
import time

import pytest

from atelier.generation.schedulers import SCHEDULERS
from atelier.v1 import generation_pb2
from tests.generation.conftest import (
    assert_close,
    decode,
    reference_images,
    reference_pipeline,
)


def request(**fields):
    fields.setdefault("prompt", "a photo of sks dog on the moon")
    fields.setdefault("num_inference_steps", 8)
    return generation_pb2.GenerateRequest(**fields)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_each_scheduler_matches_the_pipeline(stub, tiny_sd, scheduler):
    reply = stub.Generate(request(scheduler=scheduler, seed=11, num_images=2,
                                  guidance_scale=6.5), timeout=120)
    assert list(reply.seeds) == [11, 12]
    reference = reference_images(reference_pipeline(tiny_sd), prompt=request().prompt, seed=11,
                                 num_images=2, steps=8, guidance_scale=6.5, scheduler=scheduler)
    for image, ref in zip(reply.images, reference, strict=True):
        assert_close(decode(image), ref)


def test_negative_prompt_rescale_no_guidance_and_size(stub, tiny_sd):
    pipe = reference_pipeline(tiny_sd)
    cases = [
        dict(negative_prompt="blurry, red", guidance_scale=9.0, guidance_rescale=0.7),
        dict(guidance_scale=1.0),  # no classifier-free guidance: no unconditional half
        dict(width=96, height=64, guidance_scale=4.0, scheduler="euler_ancestral"),
    ]
    for case in cases:
        reply = stub.Generate(request(seed=3, **case), timeout=120)
        ref = reference_images(pipe, prompt=request().prompt, seed=3, steps=8, **case)[0]
        assert_close(decode(reply.images[0]), ref)


def test_join_midway_and_mixed_guidance_in_one_batch(stub, tiny_sd):
    """A long request is running; others, with other schedulers and guidance scales,
    join it mid-way. Every image still equals its own pipeline run."""
    long_req = request(seed=100, num_inference_steps=40, scheduler="dpmpp_2m",
                       guidance_scale=8.0)
    joiners = [
        request(seed=200, scheduler="ddim", guidance_scale=3.0, prompt="a red toy robot"),
        request(seed=300, scheduler="unipc", guidance_scale=12.0, negative_prompt="snow"),
        request(seed=400, scheduler="euler", guidance_scale=1.0),
    ]
    results: dict[int, object] = {}
    batch_sizes: list[int] = []
    started = threading.Event()

    def run_long():
        for event in stub.GenerateStream(generation_pb2.GenerateStreamRequest(request=long_req),
                                         timeout=300):
            if event.HasField("progress"):
                batch_sizes.append(event.progress.batch_size)
                if event.progress.step == 5:
                    started.set()
            else:
                results[-1] = event.result

    def run(i, req):
        results[i] = stub.Generate(req, timeout=300)

    long_thread = threading.Thread(target=run_long)
    long_thread.start()
    assert started.wait(120)
    threads = [threading.Thread(target=run, args=(i, r)) for i, r in enumerate(joiners)]
    for t in threads:
        t.start()
    for t in [long_thread, *threads]:
        t.join(300)
    assert max(batch_sizes) >= 2, "the joiners never shared a step with the long request"
    assert batch_sizes[0] == 1  # it started alone

    pipe = reference_pipeline(tiny_sd)
    ref = reference_images(pipe, prompt=long_req.prompt, seed=100, steps=40,
                           scheduler="dpmpp_2m", guidance_scale=8.0)[0]
    assert_close(decode(results[-1].images[0]), ref)
    for i, req in enumerate(joiners):
        ref = reference_images(pipe, prompt=req.prompt, seed=req.seed, steps=8,
                               scheduler=req.scheduler, guidance_scale=req.guidance_scale,
                               negative_prompt=req.negative_prompt)[0]
        assert_close(decode(results[i].images[0]), ref)


def test_concurrent_requests_share_steps(stub, tiny_sd):
    """Several requests sent together, each with its own guidance, are batched."""
    reqs = [request(seed=50 + i, guidance_scale=2.0 + 3 * i, num_inference_steps=12)
            for i in range(4)]
    results = {}
    sizes = []

    def run(i):
        for event in stub.GenerateStream(
                generation_pb2.GenerateStreamRequest(request=reqs[i]), timeout=300):
            if event.HasField("progress"):
                sizes.append(event.progress.batch_size)
            else:
                results[i] = event.result

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.01)
    for t in threads:
        t.join(300)
    assert max(sizes) >= 3
    pipe = reference_pipeline(tiny_sd)
    for i, req in enumerate(reqs):
        ref = reference_images(pipe, prompt=req.prompt, seed=req.seed, steps=12,
                               guidance_scale=req.guidance_scale)[0]
        assert_close(decode(results[i].images[0]), ref)
