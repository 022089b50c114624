"""SDXL, v-prediction, img2img and inpainting equal diffusers' own pipelines, alone and
batched with requests of other kinds, models and families."""

from __future__ import annotations

import threading

import grpc
import pytest

from atelier.v1 import generation_pb2, generation_pb2_grpc, model_pb2
from tests.generation.conftest import (
    assert_close,
    decode,
    mask_picture,
    png,
    reference_images,
    reference_pipeline,
    start_generation,
    start_picture,
)

PROMPT = "a photo of sks dog on the moon"
MODELS = {
    "tiny-sd": "tiny://stable-diffusion",
    "tiny-sdxl": "tiny://stable-diffusion-xl",
    "tiny-sd-inpainting": "tiny://stable-diffusion-inpainting",
    "tiny-sd-v": "tiny://stable-diffusion-v-prediction",
}


@pytest.fixture(scope="module")
def families_server(tmp_path_factory, model_cache, tiny_sd, tiny_sdxl, tiny_sd_inpainting,
                    tiny_sd_v):
    thread = start_generation(tmp_path_factory.mktemp("families"), model_cache,
                              base_models=MODELS)
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def fstub(families_server):
    with grpc.insecure_channel(families_server.target) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


def request(**fields) -> generation_pb2.GenerateRequest:
    fields.setdefault("prompt", PROMPT)
    fields.setdefault("num_inference_steps", 8)
    return generation_pb2.GenerateRequest(**fields)


def check(reply, pipe, *, one_by_one: bool = False, **reference) -> None:
    """Each image equals the pipeline's. ``one_by_one``: call the pipeline once per image
    (image i alone with seed + i, atelier's semantics), for pipelines that encode an
    init image once per call with the first image's generator."""
    prompt, steps = reference.pop("prompt", PROMPT), reference.pop("steps", 8)
    if one_by_one:
        count, seed = reference.pop("num_images", 1), reference.pop("seed")
        refs = [reference_images(pipe, prompt=prompt, steps=steps, seed=seed + i,
                                 **reference)[0] for i in range(count)]
    else:
        refs = reference_images(pipe, prompt=prompt, steps=steps, **reference)
    assert len(reply.images) == len(refs)
    for image, ref in zip(reply.images, refs, strict=True):
        assert_close(decode(image), ref)


def test_sdxl_text_to_image(fstub, tiny_sdxl):
    pipe = reference_pipeline(tiny_sdxl, "StableDiffusionXLPipeline")
    cases = [
        dict(seed=5, num_images=2, guidance_scale=6.0),
        dict(seed=6, negative_prompt="blurry, snow", guidance_scale=8.0, guidance_rescale=0.6),
        dict(seed=7, width=96, height=64, guidance_scale=5.0, scheduler="dpmpp_2m"),
        dict(seed=8, guidance_scale=1.0),  # unguided
    ]
    for case in cases:
        reply = fstub.Generate(request(model="models/tiny-sdxl", **case), timeout=120)
        check(reply, pipe, **case)


def test_v_prediction_model(fstub, tiny_sd_v):
    pipe = reference_pipeline(tiny_sd_v)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    for case in (dict(seed=3, guidance_scale=7.0, guidance_rescale=0.7),
                 dict(seed=4, scheduler="euler", guidance_scale=4.0)):
        reply = fstub.Generate(request(model="tiny-sd-v", **case), timeout=120)
        check(reply, pipe, **case)


@pytest.mark.parametrize("strength", [0.3, 0.6, 1.0])
def test_sd_img2img(fstub, tiny_sd, strength):
    pipe = reference_pipeline(tiny_sd, "StableDiffusionImg2ImgPipeline")
    picture = start_picture()
    reply = fstub.Generate(request(model="tiny-sd", init_image=png(picture), strength=strength,
                                   seed=21, num_images=2, scheduler="euler_ancestral",
                                   num_inference_steps=10), timeout=120)
    check(reply, pipe, seed=21, num_images=2, scheduler="euler_ancestral", steps=10,
          image=picture, strength=strength)


@pytest.mark.parametrize("strength", [0.5, 0.8])
def test_sdxl_img2img(fstub, tiny_sdxl, strength):
    pipe = reference_pipeline(tiny_sdxl, "StableDiffusionXLImg2ImgPipeline")
    picture = start_picture(96, 64)
    reply = fstub.Generate(request(model="tiny-sdxl", init_image=png(picture),
                                   strength=strength, seed=31, negative_prompt="rain",
                                   num_inference_steps=10), timeout=120)
    assert (reply.images[0].width, reply.images[0].height) == (96, 64)
    check(reply, pipe, seed=31, negative_prompt="rain", steps=10, image=picture,
          strength=strength)


@pytest.mark.parametrize(("model", "path_fixture", "cls", "strength"), [
    ("tiny-sd", "tiny_sd", "StableDiffusionInpaintPipeline", 1.0),  # latent blending
    ("tiny-sd", "tiny_sd", "StableDiffusionInpaintPipeline", 0.7),
    ("tiny-sd-inpainting", "tiny_sd_inpainting", "StableDiffusionInpaintPipeline", 1.0),
    ("tiny-sd-inpainting", "tiny_sd_inpainting", "StableDiffusionInpaintPipeline", 0.6),
    ("tiny-sdxl", "tiny_sdxl", "StableDiffusionXLInpaintPipeline", 1.0),
    ("tiny-sdxl", "tiny_sdxl", "StableDiffusionXLInpaintPipeline", 0.75),
])
def test_inpainting(fstub, request_fixture, model, path_fixture, cls, strength):
    pipe = reference_pipeline(request_fixture(path_fixture), cls)
    picture, mask = start_picture(), mask_picture()
    reply = fstub.Generate(request(model=model, init_image=png(picture), mask_image=png(mask),
                                   strength=strength, seed=41, num_images=2,
                                   scheduler="ddim", guidance_scale=6.0), timeout=120)
    check(reply, pipe, one_by_one=True, seed=41, num_images=2, scheduler="ddim",
          guidance_scale=6.0, image=picture, mask_image=mask, strength=strength)


@pytest.fixture
def request_fixture(request):
    return request.getfixturevalue


def test_every_kind_in_one_iteration(fstub, tiny_sd, tiny_sdxl):
    """SDXL img2img, SD text to image, SD img2img and SD inpainting at once. The three
    SD requests share UNet forwards (one model, one size), the SDXL one runs in its own
    group beside them, and every image equals its own pipeline's."""
    picture, mask = start_picture(), mask_picture()
    reqs = {
        "sdxl_img2img": request(model="tiny-sdxl", init_image=png(picture), strength=0.7,
                                seed=51, num_inference_steps=14),
        # the longest, so the others join it however late they are prepared
        "sd_t2i": request(model="tiny-sd", seed=52, guidance_scale=9.0, scheduler="unipc",
                          num_inference_steps=30),
        "sd_img2img": request(model="tiny-sd", init_image=png(picture), strength=0.9,
                              seed=53, guidance_scale=3.0, num_inference_steps=14),
        "sd_inpaint": request(model="tiny-sd", init_image=png(picture), mask_image=png(mask),
                              seed=54, scheduler="euler", num_inference_steps=14),
    }
    results, sizes = {}, {name: [] for name in reqs}
    barrier = threading.Barrier(len(reqs))

    def run(name):
        barrier.wait()
        stream = fstub.GenerateStream(
            generation_pb2.GenerateStreamRequest(request=reqs[name]), timeout=300)
        for event in stream:
            if event.HasField("progress"):
                sizes[name].append(event.progress.batch_size)
            else:
                results[name] = event.result

    threads = [threading.Thread(target=run, args=(name,)) for name in reqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert max(sizes["sd_t2i"]) == 3, sizes  # the three SD requests in one forward
    assert max(sizes["sdxl_img2img"]) == 1, sizes  # its own group, same iterations

    sd = dict(steps=14)
    check(results["sdxl_img2img"], reference_pipeline(tiny_sdxl,
                                                      "StableDiffusionXLImg2ImgPipeline"),
          seed=51, image=picture, strength=0.7, **sd)
    check(results["sd_t2i"], reference_pipeline(tiny_sd), seed=52, guidance_scale=9.0,
          scheduler="unipc", steps=30)
    check(results["sd_img2img"], reference_pipeline(tiny_sd, "StableDiffusionImg2ImgPipeline"),
          seed=53, guidance_scale=3.0, image=picture, strength=0.9, **sd)
    check(results["sd_inpaint"], reference_pipeline(tiny_sd, "StableDiffusionInpaintPipeline"),
          seed=54, scheduler="euler", image=picture, mask_image=mask, **sd)


def test_models_report_family_and_modes(fstub):
    fstub.Generate(request(model="tiny-sd-inpainting", init_image=png(start_picture()),
                           mask_image=png(mask_picture()), num_inference_steps=2), timeout=120)
    fstub.Generate(request(model="tiny-sdxl", num_inference_steps=2), timeout=120)
    models = {m.name: m for m in fstub.ListModels(generation_pb2.ListModelsRequest()).models}
    sdxl, inpainting = models["models/tiny-sdxl"], models["models/tiny-sd-inpainting"]
    assert sdxl.family == model_pb2.MODEL_FAMILY_STABLE_DIFFUSION_XL
    assert sdxl.default_resolution == 128
    assert list(sdxl.modes) == [model_pb2.GENERATION_MODE_TEXT_TO_IMAGE,
                                model_pb2.GENERATION_MODE_IMAGE_TO_IMAGE,
                                model_pb2.GENERATION_MODE_INPAINT]
    assert inpainting.family == model_pb2.MODEL_FAMILY_STABLE_DIFFUSION
    assert list(inpainting.modes) == [model_pb2.GENERATION_MODE_INPAINT]


def _bad_inputs():
    picture = png(start_picture())
    mask = png(mask_picture())
    small_mask = png(mask_picture(64, 64))
    return [
        (dict(init_image=b"not an image"), "init_image"),
        (dict(init_image=picture, mask_image=b"\x89PNG\r\n\x1a\n broken"), "mask_image"),
        (dict(init_image=picture, mask_image=small_mask), "mask_image"),
        (dict(mask_image=mask), "mask_image"),  # a mask needs the image it masks
        (dict(init_image=picture, strength=0.0), "strength"),
        (dict(init_image=picture, strength=1.5), "strength"),
        (dict(init_image=picture, strength=-0.2), "strength"),
        (dict(strength=0.5), "strength"),  # strength without init_image
        (dict(init_image=picture, strength=0.05, num_inference_steps=8), "strength"),
        (dict(init_image=png(start_picture(40, 40))), "width"),  # too small an image
        (dict(model="tiny-sd-inpainting"), "mask_image"),  # text to image, inpainting UNet
        (dict(model="tiny-sd-inpainting", init_image=picture), "mask_image"),
    ]


@pytest.mark.parametrize(("fields", "field"), _bad_inputs())
def test_bad_image_inputs_are_invalid_argument_with_field(fstub, fields, field):
    from tests.generation.test_requests import violations

    with pytest.raises(grpc.RpcError) as err:
        fstub.Generate(request(**fields), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert field in violations(err.value), violations(err.value)


def test_an_image_bomb_is_refused_from_its_header(fstub):
    """A PNG that claims 20000x20000 px is refused before any pixel is decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    with pytest.raises(grpc.RpcError) as err:
        fstub.Generate(request(init_image=bomb), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "20000x20000" in err.value.details()


def test_requests_of_one_model_at_different_sizes_start_together(tiny_sd):
    """Admitted together, an img2img at 128 px and an inpaint at 96x64 px on one model
    start in one call (one VAE pass per size) with the latents each gets alone."""
    import torch

    from atelier.generation.image_inputs import preprocess
    from atelier.generation.job import Job
    from atelier.generation.runner import DenoiseRunner
    from atelier.generation.schedulers import scheduler_factory
    from atelier.models.families import family_of

    pipe = reference_pipeline(tiny_sd)

    class Loaded:  # what the runner uses of the registry's LoadedModel
        pipeline = pipe
        family = family_of(pipe)

        def activate(self):
            pass

    model = Loaded()

    def job(width, height, mask):
        picture = start_picture(width, height)
        condition = preprocess(pipe, picture, mask_picture(width, height) if mask else None,
                               0.7, width, height)
        return Job(model=model, prompt=PROMPT, negative_prompt="", width=width, height=height,
                   num_inference_steps=8, guidance_scale=5.0, guidance_rescale=0.0,
                   seeds=[3], make_scheduler=scheduler_factory("", pipe.scheduler.config),
                   condition=condition, emit=lambda event: None)

    def latents(jobs):
        runner = DenoiseRunner(device="cpu")
        with torch.inference_mode():
            return [s.latents for s in runner.start(jobs)]

    big, small = job(128, 128, mask=False), job(96, 64, mask=True)
    together = latents([big, small])
    assert [tuple(t.shape) for t in together] == [(1, 4, 16, 16), (1, 4, 8, 12)]
    for alone, joint in zip(latents([big]) + latents([small]), together, strict=True):
        torch.testing.assert_close(alone, joint, rtol=1e-4, atol=1e-5)
