"""FLUX.2 [klein] equals diffusers' ``Flux2KleinPipeline``: base (true CFG, with and
without a negative prompt), distilled, 1 and 2 reference images, non-square sizes,
and ``Flux2KleinInpaintPipeline``; alone, and all at once in one iteration beside an
SD request. Mixed klein LoRAs equal the pipeline with each loaded."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import torch

from atelier.v1 import generation_pb2, generation_pb2_grpc, model_pb2
from tests.generation.conftest import (
    assert_close,
    decode,
    mask_picture,
    png,
    start_generation,
    start_picture,
)

PROMPT = "a photo of sks dog on the moon"
MODELS = {"tiny-klein-base": "tiny://flux2-klein-base", "tiny-klein": "tiny://flux2-klein",
          "tiny-sd": "tiny://stable-diffusion"}


@pytest.fixture(scope="module")
def klein_server(tmp_path_factory, model_cache, tiny_klein_base, tiny_klein, tiny_sd):
    thread = start_generation(tmp_path_factory.mktemp("klein"), model_cache,
                              base_models=MODELS, default_model="tiny-sd")
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def kstub(klein_server):
    with grpc.insecure_channel(klein_server.target) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


_pipes: dict = {}


def klein_pipeline(path):
    from diffusers import Flux2KleinPipeline

    if str(path) not in _pipes:
        pipe = Flux2KleinPipeline.from_pretrained(path, use_safetensors=True)
        pipe.set_progress_bar_config(disable=True)
        _pipes[str(path)] = pipe
    return _pipes[str(path)]


def pictures(*sizes):
    return [start_picture(w, h).rotate(30 * i) for i, (w, h) in enumerate(sizes)]


def klein_reference(pipe, *, seed, steps, width=None, height=None, guidance=4.0,
                    negative="", refs=(), prompt=PROMPT, num_images=1) -> list[np.ndarray]:
    """The pipeline's images, image i drawn with seed + i (atelier's semantics)."""
    extra = {}
    if negative:
        extra["negative_prompt_embeds"] = pipe.encode_prompt(negative, device="cpu")[0]
    out = []
    for i in range(num_images):
        images = pipe(image=list(refs) or None, prompt=prompt, height=height, width=width,
                      num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                      generator=torch.Generator().manual_seed(seed + i), **extra).images
        out.append((images[0] * 255).round().astype(np.uint8))
    return out


CASES = {  # name: (model, request fields, reference pictures)
    "base": ("tiny-klein-base", dict(seed=3, num_images=2, guidance_scale=4.0), ()),
    "negative": ("tiny-klein-base", dict(seed=4, negative_prompt="blurry, snow",
                                         guidance_scale=3.0, num_inference_steps=5), ()),
    "unguided": ("tiny-klein-base", dict(seed=5, guidance_scale=1.0), ()),
    "wide": ("tiny-klein-base", dict(seed=6, width=96, height=64, guidance_scale=5.0), ()),
    "distilled": ("tiny-klein", dict(seed=7, num_inference_steps=4), ()),
    "one-reference": ("tiny-klein-base", dict(seed=8, guidance_scale=4.0), ((96, 64),)),
    "two-references": ("tiny-klein", dict(seed=9, width=64, height=96),
                       ((64, 64), (80, 112))),
}


#: Inpainting cases: (model, request fields, (width, height) of the init image, references)
INPAINT = {
    "inpaint": ("tiny-klein-base", dict(seed=12, strength=0.7, guidance_scale=4.0),
                (128, 96), ()),
    "inpaint-distilled-with-reference": ("tiny-klein", dict(seed=13, strength=1.0),
                                         (96, 96), ((64, 80),)),
}


def inpaint_request(name):
    model, fields, (w, h), sizes = INPAINT[name]
    refs = pictures(*sizes)
    return generation_pb2.GenerateRequest(
        model=f"models/{model}", prompt=PROMPT, num_inference_steps=6,
        init_image=png(start_picture(w, h)), mask_image=png(mask_picture(w, h)),
        reference_images=[png(r) for r in refs], **fields), refs


def check_inpaint(name, reply, paths):
    from diffusers import Flux2KleinInpaintPipeline

    model, fields, (w, h), _ = INPAINT[name]
    _, refs = inpaint_request(name)
    key = ("inpaint", str(paths[model]))
    if key not in _pipes:
        _pipes[key] = Flux2KleinInpaintPipeline.from_pretrained(paths[model])
        _pipes[key].set_progress_bar_config(disable=True)
    extra = {"image_reference": refs[0]} if refs else {}
    expected = _pipes[key](
        prompt=PROMPT, image=start_picture(w, h), mask_image=mask_picture(w, h),
        strength=fields["strength"], num_inference_steps=6,
        guidance_scale=fields.get("guidance_scale", 4.0), output_type="np",
        generator=torch.Generator().manual_seed(fields["seed"]), **extra).images[0]
    assert_close(decode(reply.images[0]), (expected * 255).round().astype(np.uint8))


@pytest.mark.parametrize("name", list(INPAINT))
def test_inpainting_equals_the_inpainting_pipeline(kstub, paths, name):
    check_inpaint(name, kstub.Generate(inpaint_request(name)[0], timeout=120), paths)


def request_for(name):
    model, fields, sizes = CASES[name]
    fields = {"num_inference_steps": 6, **fields}
    refs = pictures(*sizes)
    return generation_pb2.GenerateRequest(
        model=f"models/{model}", prompt=PROMPT, reference_images=[png(r) for r in refs],
        **fields), refs


def check(name, reply, paths):
    model, fields, _ = CASES[name]
    request, refs = request_for(name)
    default_steps = 4 if model == "tiny-klein" else 50
    reference = klein_reference(
        klein_pipeline(paths[model]), seed=fields["seed"],
        steps=request.num_inference_steps or default_steps,
        # The tiny model's native size is 128 px; with references, the first one's.
        width=fields.get("width", None if refs else 128),
        height=fields.get("height", None if refs else 128),
        guidance=fields.get("guidance_scale", 4.0), negative=fields.get("negative_prompt", ""),
        refs=refs, num_images=fields.get("num_images", 1))
    assert len(reply.images) == len(reference), name
    for image, expected in zip(reply.images, reference, strict=True):
        assert_close(decode(image), expected)


@pytest.fixture(scope="module")
def paths(tiny_klein_base, tiny_klein):
    return {"tiny-klein-base": tiny_klein_base, "tiny-klein": tiny_klein}


@pytest.mark.parametrize("name", list(CASES))
def test_alone_equals_the_pipeline(kstub, paths, name):
    reply = kstub.Generate(request_for(name)[0], timeout=120)
    check(name, reply, paths)


def test_all_at_once_beside_an_sd_request(kstub, paths, tiny_sd):
    """Every case and an SD request submitted together: mixed guidance scales, step
    counts, seeds, sizes, reference counts and families in the same iterations."""
    from tests.generation.conftest import reference_images, reference_pipeline

    replies: dict = {}

    def run(name, request):
        replies[name] = kstub.Generate(request, timeout=300)

    sd = generation_pb2.GenerateRequest(model="models/tiny-sd", prompt=PROMPT, seed=11,
                                        num_inference_steps=7, guidance_scale=6.0)
    threads = [threading.Thread(target=run, args=(name, request_for(name)[0]))
               for name in CASES]
    threads += [threading.Thread(target=run, args=(name, inpaint_request(name)[0]))
                for name in INPAINT]
    threads.append(threading.Thread(target=run, args=("sd", sd)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in CASES:
        check(name, replies[name], paths)
    for name in INPAINT:
        check_inpaint(name, replies[name], paths)
    expected = reference_images(reference_pipeline(tiny_sd), prompt=PROMPT, seed=11, steps=7,
                                guidance_scale=6.0)
    assert_close(decode(replies["sd"].images[0]), expected[0])


def test_the_model_describes_its_family(kstub):
    for name in ("tiny-klein-base", "tiny-klein"):  # loaded, so their family is known
        kstub.Generate(generation_pb2.GenerateRequest(model=f"models/{name}", prompt=PROMPT,
                                                      num_inference_steps=1), timeout=60)
    base = kstub.GetModel(generation_pb2.GetModelRequest(name="models/tiny-klein-base")).model
    distilled = kstub.GetModel(generation_pb2.GetModelRequest(name="models/tiny-klein")).model
    assert base.family == model_pb2.MODEL_FAMILY_FLUX2_KLEIN
    assert (base.default_steps, base.default_guidance_scale, base.guided) == (50, 4.0, True)
    assert (distilled.default_steps, distilled.guided) == (4, False)
    assert base.takes_reference_images and base.size_multiple == 16


BAD = {  # request fields on top of a valid klein request -> the field refused
    "guidance on distilled": (dict(model="models/tiny-klein", guidance_scale=3.0),
                              "guidance_scale"),
    "negative on distilled": (dict(model="models/tiny-klein", negative_prompt="x"),
                              "negative_prompt"),
    "off the patch grid": (dict(width=72), "width"),
    "named scheduler": (dict(scheduler="ddim"), "scheduler"),
    "init image without a mask": (dict(init_image=png(start_picture(64, 64))),
                                  "init_image"),
    "mask of another size": (dict(init_image=png(start_picture(64, 64)),
                                  mask_image=png(mask_picture(64, 80))), "mask_image"),
    "too many references": (dict(reference_images=[b"x"] * 5), "reference_images"),
    "undecodable reference": (dict(reference_images=[b"not an image"]),
                              "reference_images[0]"),
    "tiny reference": (dict(reference_images=[png(start_picture(32, 32))]),
                       "reference_images[0]"),
    "reference over the side limit": (dict(reference_images=[png(start_picture(64, 64)),
                                                             png(start_picture(4200, 64))]),
                                      "reference_images[1]"),
    "references on SD": (dict(model="models/tiny-sd",
                              reference_images=[png(start_picture(64, 64))]),
                         "reference_images"),
    "prompt too long": (dict(prompt="dog " * 600), "prompt"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_invalid_argument_naming_the_field(kstub, case):
    from tests.generation.test_requests import violations

    fields, field = BAD[case]
    request = generation_pb2.GenerateRequest(**{"model": "models/tiny-klein-base",
                                                "prompt": PROMPT, "num_inference_steps": 2,
                                                **fields})
    with pytest.raises(grpc.RpcError) as caught:
        kstub.Generate(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert field in violations(caught.value), caught.value.details()


# -- klein LoRAs: mixed in one transformer forward, served on base and distilled ------
KLEIN_LORAS = {"k-dog": (4, 8.0, 21), "k-cat": (2, 2.0, 22), "k-fox": (8, 4.0, 23)}


def klein_lora_weights(path, rank, alpha, seed):
    from diffusers import Flux2Transformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from atelier.models.families.flux2_klein import LORA_TARGETS

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel.from_pretrained(path, subfolder="transformer")
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False,
                                       target_modules=LORA_TARGETS))
    return {k: v * 2.0 for k, v in get_peft_model_state_dict(transformer).items()}


@pytest.fixture(scope="module")
def klein_loras(klein_server, tiny_klein_base):
    """Three klein LoRAs in the server's store, trained (so to speak) on the base and
    fitting the distilled model too."""
    from atelier.models.export import export_lora_model
    from atelier.models.manifest import ManifestWeights, ModelManifest, model_key
    from atelier.storage import open_store

    store = open_store(klein_server.server.settings.storage)
    for name, (rank, alpha, seed) in KLEIN_LORAS.items():
        photos = [f"subject/{i}.png" for i in range(2)] if name == "k-dog" else []
        for i, path in enumerate(photos):  # best of N ranks by likeness to these
            store.put_bytes(model_key(name, path), png(start_picture(64 + 16 * i, 64)),
                            "image/png")
        manifest = ModelManifest(
            model_id=name, kind="lora", family="flux2-klein",
            base_model="models/tiny-klein-base", fits_bases=["models/tiny-klein"],
            base_model_source="tiny://flux2-klein-base", identifier_token="sks",
            lora_rank=rank, lora_alpha=alpha, subject_images=photos,
            weights=ManifestWeights(lora="x.safetensors"))
        export_lora_model(store, manifest, klein_lora_weights(tiny_klein_base, rank, alpha,
                                                              seed))
    return store


def lora_reference(store, path, adapters: dict, tmp_path, **kw):
    """The pipeline with the exported files loaded by diffusers' own loader."""
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(path, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    for name in adapters:
        folder = tmp_path / name
        store.download_prefix(f"models/{name}/", folder)
        pipe.load_lora_weights(str(folder), weight_name="pytorch_lora_weights.safetensors",
                               adapter_name=name)
    if adapters:
        pipe.set_adapters(list(adapters), list(adapters.values()))
    return klein_reference(pipe, **kw)


def test_mixed_klein_loras_in_one_forward_equal_the_pipeline_with_each_loaded(
        kstub, klein_loras, tiny_klein_base, tiny_klein, tmp_path):
    cases = {  # name: (base, adapters and scales, seed, guidance)
        "dog": ("tiny-klein-base", {"k-dog": 1.0}, 31, 4.0),
        "cat+fox": ("tiny-klein-base", {"k-cat": 0.6, "k-fox": 1.3}, 32, 3.0),
        "plain": ("tiny-klein-base", {}, 33, 4.0),
        "fox on distilled": ("tiny-klein", {"k-fox": 0.8}, 34, 1.0),
    }

    def request(base, adapters, seed, guidance):
        return generation_pb2.GenerateRequest(
            model=f"models/{base}", prompt=PROMPT, seed=seed, num_inference_steps=4,
            guidance_scale=guidance,
            adapters=[generation_pb2.AdapterRef(model=f"models/{n}", scale=s)
                      for n, s in adapters.items()])

    for case in cases.values():  # every adapter loaded, so the batch mixes them
        kstub.Generate(request(*case), timeout=120)
    replies: dict = {}
    threads = [threading.Thread(target=lambda k=k: replies.__setitem__(
        k, kstub.Generate(request(*cases[k]), timeout=300))) for k in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    paths = {"tiny-klein-base": tiny_klein_base, "tiny-klein": tiny_klein}
    for key, (base, adapters, seed, guidance) in cases.items():
        expected = lora_reference(klein_loras, paths[base], adapters, tmp_path / key,
                                  seed=seed, steps=4, width=128, height=128, guidance=guidance)
        assert_close(decode(replies[key].images[0]), expected[0])


def test_a_klein_lora_named_as_the_model_runs_on_its_base(kstub, klein_loras):
    reply = kstub.Generate(generation_pb2.GenerateRequest(
        model="models/k-dog", prompt=PROMPT, seed=1, num_inference_steps=2), timeout=120)
    assert reply.model == "models/k-dog" and len(reply.images) == 1


def test_best_of_n_ranks_klein_candidates_by_likeness(kstub, klein_loras):
    """num_candidates on a klein LoRA model: the kept image is the candidate most like
    the subject's photos, and it is the image its seed gives alone (to the pixel
    tolerance: three candidates share a forward where the single request does not)."""
    fields = dict(model="models/k-dog", prompt=PROMPT, seed=40, num_inference_steps=2)
    best = kstub.Generate(generation_pb2.GenerateRequest(num_images=1, num_candidates=3,
                                                         **fields), timeout=120)
    scores = [c.subject_similarity for c in best.candidates]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert best.seeds[0] == best.candidates[0].seed
    alone = kstub.Generate(generation_pb2.GenerateRequest(
        **{**fields, "seed": best.seeds[0]}), timeout=120)
    assert_close(decode(best.images[0]), decode(alone.images[0]))


def test_a_klein_lora_serves_where_only_the_distilled_model_is(tmp_path, model_cache,
                                                                tiny_klein, tiny_klein_base):
    """A deployment with the distilled model alone serves LoRAs trained on ``base``
    (fits_bases): the LoRA loads over the distilled model, and ``base`` is never
    loaded (here it is not even configured)."""
    from atelier.models.export import export_lora_model
    from atelier.models.manifest import ManifestWeights, ModelManifest
    from atelier.storage import open_store

    server = start_generation(tmp_path, model_cache, base_models={
        "tiny-klein": "tiny://flux2-klein"}, default_model="tiny-klein")
    try:
        rank, alpha, seed = KLEIN_LORAS["k-cat"]
        export_lora_model(open_store(server.server.settings.storage), ModelManifest(
            model_id="k-cat", kind="lora", family="flux2-klein",
            base_model="models/tiny-klein-base", fits_bases=["models/tiny-klein"],
            base_model_source="tiny://flux2-klein-base", identifier_token="sks",
            lora_rank=rank, lora_alpha=alpha, weights=ManifestWeights(lora="x.safetensors")),
            klein_lora_weights(tiny_klein_base, rank, alpha, seed))
        with grpc.insecure_channel(server.target) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            reply = stub.Generate(generation_pb2.GenerateRequest(
                model="models/tiny-klein", prompt=PROMPT, seed=3, num_inference_steps=2,
                adapters=[generation_pb2.AdapterRef(model="models/k-cat", scale=0.7)]),
                timeout=120)
            assert reply.model == "models/tiny-klein" and len(reply.images) == 1
    finally:
        server.stop()


def test_klein_streams_progress_and_token_grid_previews(kstub):
    """Previews of a klein request are its token grid (1/16 of the image a side)."""
    events = list(kstub.GenerateStream(generation_pb2.GenerateStreamRequest(
        request=generation_pb2.GenerateRequest(
            model="models/tiny-klein-base", prompt=PROMPT, num_inference_steps=4, seed=2,
            width=96, height=64),
        preview_interval_steps=2), timeout=60))
    assert [e.progress.step for e in events if e.HasField("progress")] == [1, 2, 3, 4]
    previews = [e.preview for e in events if e.HasField("preview")]
    assert [p.step for p in previews] == [2]
    assert (previews[0].images[0].width, previews[0].images[0].height) == (6, 4)
    assert events[-1].HasField("result")
