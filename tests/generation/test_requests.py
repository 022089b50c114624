"""Input checks, the bounded queue, cancellation and deadlines, streaming, metrics."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from atelier.generation.schedulers import SCHEDULERS, scheduler_factory
from atelier.kit.errors import InvalidArgument
from atelier.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from tests.conftest import wait_until
from tests.generation.conftest import decode, start_generation
from tests.kit.test_server import sample, scrape


def violations(err: grpc.RpcError) -> dict[str, str]:
    status = rpc_status.from_call(err)
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Is(bad.DESCRIPTOR):
            detail.Unpack(bad)
            return {v.field: v.description for v in bad.field_violations}
    return {}


BAD_FIELDS = [
    (dict(prompt=""), "prompt"),
    (dict(prompt="   "), "prompt"),
    (dict(prompt="dog " * 100), "prompt"),  # over the 77-token limit
    (dict(negative_prompt="cat " * 100), "negative_prompt"),
    (dict(num_images=9), "num_images"),
    (dict(num_images=-1), "num_images"),
    (dict(width=100), "width"),
    (dict(height=32), "height"),
    (dict(width=4096), "width"),
    (dict(num_inference_steps=151), "num_inference_steps"),
    (dict(num_inference_steps=-2), "num_inference_steps"),
    (dict(guidance_scale=31.0), "guidance_scale"),
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(guidance_rescale=1.5), "guidance_rescale"),
    (dict(seed=-5), "seed"),
    (dict(output_format=42), "output_format"),
    (dict(quality=101), "quality"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_FIELDS)
def test_bad_input_is_invalid_argument_with_field(stub, fields, field):
    fields = {"prompt": "a dog", **fields}
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(generation_pb2.GenerateRequest(**fields), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in violations(err.value), violations(err.value)


def test_several_bad_fields_are_reported_together(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(generation_pb2.GenerateRequest(prompt="", width=7, num_images=100),
                      timeout=30)
    assert {"prompt", "width", "num_images"} <= violations(err.value).keys()


def test_unknown_model_or_scheduler_is_not_found(stub):
    for fields in (dict(model="models/nope"), dict(model="nope"), dict(scheduler="lms")):
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(generation_pb2.GenerateRequest(prompt="a dog", **fields), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_output_formats(stub):
    for fmt, magic in ((common_pb2.IMAGE_FORMAT_PNG, b"\x89PNG"),
                       (common_pb2.IMAGE_FORMAT_JPEG, b"\xff\xd8"),
                       (common_pb2.IMAGE_FORMAT_WEBP, b"RIFF")):
        reply = stub.Generate(generation_pb2.GenerateRequest(
            prompt="a dog", num_inference_steps=2, output_format=fmt, seed=1), timeout=60)
        assert reply.images[0].data.startswith(magic)
        assert reply.images[0].format == fmt
        assert decode(reply.images[0]).shape == (128, 128, 3)
        assert reply.model == "models/tiny-sd"
        assert reply.timings.total.ToNanoseconds() > 0


def test_random_seed_is_returned_and_reproduces(stub):
    first = stub.Generate(generation_pb2.GenerateRequest(prompt="a cat", num_inference_steps=3),
                          timeout=60)
    again = stub.Generate(generation_pb2.GenerateRequest(
        prompt="a cat", num_inference_steps=3, seed=first.seeds[0]), timeout=60)
    assert (decode(first.images[0]) == decode(again.images[0])).all()


def test_stream_progress_previews_then_result(stub):
    events = list(stub.GenerateStream(generation_pb2.GenerateStreamRequest(
        request=generation_pb2.GenerateRequest(prompt="a dog", num_inference_steps=6, seed=2,
                                               num_images=2, scheduler="ddim"),
        preview_interval_steps=2), timeout=60))
    progress = [e.progress.step for e in events if e.HasField("progress")]
    previews = [e.preview for e in events if e.HasField("preview")]
    assert progress == [1, 2, 3, 4, 5, 6]
    assert {e.progress.total_steps for e in events if e.HasField("progress")} == {6}
    assert [p.step for p in previews] == [2, 4]
    assert all(len(p.images) == 2 and p.images[0].width == 16 for p in previews)
    assert events[-1].HasField("result") and len(events[-1].result.images) == 2


#: A request that denoises for a long while (500 DDIM steps at 256 px).
SLOW = generation_pb2.GenerateRequest(prompt="a dog", num_inference_steps=500, width=256,
                                      height=256, scheduler="ddim")


def hold_the_batch(stub):
    """Start SLOW as a stream; the caller reads its first event, then cancels it."""
    return stub.GenerateStream(generation_pb2.GenerateStreamRequest(request=SLOW), timeout=120)


def test_queue_full_is_resource_exhausted_at_once(tmp_path, model_cache):
    server = start_generation(tmp_path, model_cache, max_batch_size=1, max_queue_length=1,
                              max_images_per_request=1, max_steps=1000)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            slow = SLOW
            running = hold_the_batch(stub)
            next(running)  # it is denoising
            waiting = stub.Generate.future(slow, timeout=120)  # fills the queue
            wait_until(lambda: sample(scrape(server.server.metrics_port),
                                       "atelier_generation_queue_depth") == 1)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(slow, timeout=60)
            assert time.monotonic() - started < 5  # refused at once, not after waiting
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            retry = error_details_pb2.RetryInfo()
            detail = next(d for d in rpc_status.from_call(err.value).details
                          if d.Is(retry.DESCRIPTOR))
            detail.Unpack(retry)
            assert retry.retry_delay.ToMilliseconds() >= 500
            running.cancel()
            waiting.cancel()
        samples = scrape(server.server.metrics_port)
        assert sample(samples, "atelier_generation_requests_rejected_total",
                      reason="queue_full") == 1
    finally:
        server.stop()


def test_expired_and_cancelled_requests_free_their_queue_slots_at_once(tmp_path, model_cache):
    server = start_generation(tmp_path, model_cache, max_batch_size=1, max_queue_length=3,
                              max_images_per_request=1, max_steps=1000)

    def depth():
        return sample(scrape(server.server.metrics_port), "atelier_generation_queue_depth")

    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            slow = SLOW
            running = hold_the_batch(stub)
            next(running)  # it holds the only batch slot
            live = [stub.Generate.future(slow, timeout=120)]  # waits at the head
            wait_until(lambda: depth() == 1)
            expiring = stub.Generate.future(slow, timeout=1.5)
            cancelled = stub.Generate.future(slow, timeout=120)
            wait_until(lambda: depth() == 3)
            cancelled.cancel()
            with pytest.raises(grpc.RpcError):
                expiring.result()
            # Both dead requests left the queue behind the live one, which still waits.
            wait_until(lambda: depth() == 1)
            live += [stub.Generate.future(slow, timeout=120) for _ in range(2)]
            wait_until(lambda: depth() == 3)
            running.cancel()
            for call in live:
                call.cancel()
        samples = scrape(server.server.metrics_port)
        assert not sample(samples, "atelier_generation_requests_rejected_total",
                          reason="queue_full")
    finally:
        server.stop()


def _active(server) -> int:
    return int(sample(scrape(server.server.metrics_port),
                      "atelier_generation_active_sequences") or 0)


def test_cancel_and_deadline_remove_sequences(tmp_path, model_cache):
    server = start_generation(tmp_path, model_cache)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            slow = generation_pb2.GenerateRequest(prompt="a dog", num_inference_steps=150,
                                                  num_images=3)
            call = stub.GenerateStream(generation_pb2.GenerateStreamRequest(request=slow),
                                       timeout=120)
            for event in call:
                if event.progress.step == 3:
                    break
            assert _active(server) == 3
            call.cancel()
            wait_until(lambda: _active(server) == 0)

            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(slow, timeout=1.0)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_until(lambda: _active(server) == 0)
            # The engine keeps serving after both.
            reply = stub.Generate(generation_pb2.GenerateRequest(prompt="a dog",
                                                                 num_inference_steps=2),
                                  timeout=60)
            assert len(reply.images) == 1
    finally:
        server.stop()


def test_metrics_after_traffic(generation_server, stub):
    before = scrape(generation_server.server.metrics_port)
    threads = [threading.Thread(target=lambda s=s: stub.Generate(generation_pb2.GenerateRequest(
        prompt="a dog", num_inference_steps=4, seed=s), timeout=60)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    samples = scrape(generation_server.server.metrics_port)
    assert sample(samples, "atelier_generation_images_total", model="tiny-sd",
                  mode="text-to-image") >= 3
    assert sample(samples, "atelier_generation_unet_step_seconds_count") >= 4
    assert sample(samples, "atelier_generation_batch_size_count") >= 4
    assert sample(samples, "atelier_generation_request_seconds_count", phase="queue_wait") >= 3
    assert sample(samples, "atelier_generation_request_seconds_count", phase="compute") >= 3
    assert sample(samples, "atelier_generation_model_loads_total", result="ok") >= 1
    assert sample(samples, "atelier_generation_model_cache_bytes") > 0
    assert sample(samples, "atelier_generation_model_cache_budget_bytes") == 8 * 1024**3
    assert sample(samples, "atelier_generation_queue_depth") == 0
    # Where the worker's time went during this traffic: every phase it ran is counted
    # (text requests: no VAE encoder), and the rows per forward count each guided
    # image twice.
    def grew(name, **labels):
        return sample(samples, name, **labels) - (sample(before, name, **labels) or 0.0)

    seconds = {phase: grew("atelier_generation_worker_seconds_total", phase=phase)
               for phase in ("denoise", "scheduler", "vae_decode", "text_encode", "other")}
    assert all(value > 0 for value in seconds.values()), seconds
    assert grew("atelier_generation_worker_seconds_total", phase="vae_encode") == 0
    assert sample(samples, "atelier_generation_worker_seconds_total", phase="idle") > 0
    forwards = grew("atelier_generation_forward_rows_count")
    assert forwards >= 4
    assert grew("atelier_generation_forward_rows_sum") == \
        2 * grew("atelier_generation_batch_size_sum")  # every request guided (7.5)


def test_step_counts_a_scheduler_cannot_run_are_invalid_argument(tmp_path, model_cache):
    """DDIM and PNDM (with the model's steps_offset) index past the trained timesteps
    at 1000 steps, and the multistep solvers divide by zero at 999 and 1000 (two equal
    sigmas); that is refused up front, not a failure mid-denoise or a NaN image, and
    runnable counts on the same schedulers still pass the check."""
    server = start_generation(tmp_path, model_cache, max_steps=1000)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            for scheduler in ("ddim", "pndm", "dpmpp_2m", "unipc"):
                with pytest.raises(grpc.RpcError) as err:
                    stub.Generate(generation_pb2.GenerateRequest(
                        prompt="a dog", num_inference_steps=1000, scheduler=scheduler),
                        timeout=60)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, scheduler
                assert "num_inference_steps" in violations(err.value)
    finally:
        server.stop()
    config = json.loads(next(Path(model_cache).glob(
        "tiny/stable-diffusion-*/scheduler/scheduler_config.json")).read_text())
    for name in SCHEDULERS:
        scheduler_factory(name, config, 998)
    scheduler_factory("ddim", config, 999)
    scheduler_factory("euler", config, 1000)
    with pytest.raises(InvalidArgument):
        scheduler_factory("unipc", config, 999)


def test_image_requests_share_the_decode_budget(tmp_path, model_cache):
    """Image requests decode within max_decode_bytes: four 768 px init images against a
    budget for two at a time all complete (the others wait their turn); settings that
    could not hold one image and its mask are refused at start."""
    from atelier.generation.config import GenerationEngineSettings
    from tests.generation.conftest import png, start_picture

    with pytest.raises(ValueError, match="max_decode_bytes"):
        GenerationEngineSettings(max_input_image_side=4096, max_decode_bytes=2**30 // 4)
    server = start_generation(tmp_path, model_cache, max_input_image_side=768,
                              max_decode_bytes=20 * 2**20)
    try:
        picture = png(start_picture(768, 768))
        with grpc.insecure_channel(server.target) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            calls = [stub.Generate.future(generation_pb2.GenerateRequest(
                prompt="a dog", init_image=picture, strength=1.0, num_inference_steps=1,
                width=64, height=64, seed=i), timeout=120) for i in range(4)]
            assert [len(c.result().images) for c in calls] == [1, 1, 1, 1]
            too_big = png(start_picture(800, 64))
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(generation_pb2.GenerateRequest(prompt="a dog",
                                                             init_image=too_big), timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "init_image" in violations(err.value)
    finally:
        server.stop()


def test_images_resized_in_helpers_make_the_same_tensors(tiny_sd):
    """Helper threads only decode and resize (PIL); the worker makes the tensors. The
    split gives exactly the tensors the pipelines' processors make from the original
    (a 200x136 picture and mask, to 96x64)."""
    import torch

    from atelier.generation import image_inputs
    from atelier.models.pipelines import load_pipeline
    from tests.generation.conftest import mask_picture, start_picture

    pipe = load_pipeline(tiny_sd, dtype=torch.float32, device="cpu")
    image, mask = start_picture(200, 136), mask_picture(200, 136)
    resized = image_inputs.resize_inputs(pipe, image, mask, 0.7, 96, 64)
    assert resized.image.size == resized.mask.size == (96, 64)
    assert all(not isinstance(v, torch.Tensor) for v in vars(resized).values())
    split = image_inputs.preprocess(pipe, resized.image, resized.mask, 0.7, 96, 64)
    direct = image_inputs.preprocess(pipe, image, mask, 0.7, 96, 64)
    for a, b in ((split.image, direct.image), (split.mask, direct.mask),
                 (split.masked_image, direct.masked_image)):
        assert torch.equal(a, b)
