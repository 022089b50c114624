"""Different LoRA models in one UNet forward: every image of a mixed batch equals its
request run alone through diffusers' pipeline with those adapters loaded at those
scales; per-request adapter lists over gRPC; their bad input."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch

from atelier.models.export import export_lora_model
from atelier.models.manifest import ManifestWeights, ModelManifest
from atelier.storage import open_store
from atelier.v1 import generation_pb2, generation_pb2_grpc, model_pb2
from tests.generation.conftest import assert_close, decode, reference_images, start_generation
from tests.kit.test_request_hygiene import violations
from tests.kit.test_server import sample, scrape

PROMPT = "a photo of sks dog"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
SD_LORAS = {"dog": (4, 4.0, 2), "cat": (4, 8.0, 3), "fox": (8, 8.0, 4), "owl": (2, 2.0, 5)}
XL_LORAS = {"xl-dog": (4, 4.0, 6), "xl-cat": (4, 8.0, 7)}  # name: (rank, alpha, seed)


def lora_manifest(model_id: str, rank: int, alpha: float, base: str) -> ModelManifest:
    family = "stable-diffusion-xl" if "xl" in base else "stable-diffusion"
    return ModelManifest(model_id=model_id, kind="lora", family=family,
                         base_model=f"models/{base}", base_model_source=f"tiny://{family}",
                         identifier_token="sks", class_prompt="a photo of a dog",
                         lora_rank=rank, lora_alpha=alpha,
                         weights=ManifestWeights(lora="x.safetensors"))


def lora_weights(path, rank: int, alpha: float, seed: int) -> dict[str, torch.Tensor]:
    """A trained-looking adapter: random A and B (peft layout)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False,
                                target_modules=TARGETS))
    return {k: v * 0.5 for k, v in get_peft_model_state_dict(unet).items()}


def perturbed_text_encoder(path, seed: int):
    from transformers import CLIPTextModel

    encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return encoder


class Reference:
    """diffusers' pipeline whose UNet holds every adapter under its own name (peft's
    LoRA layers, as the training job configured them: rank and alpha)."""

    def __init__(self, path, cls_name: str, loras: dict, weights: dict) -> None:
        import diffusers
        from peft import LoraConfig
        from peft.utils import set_peft_model_state_dict

        extra = {} if "XL" in cls_name else {"safety_checker": None,
                                             "requires_safety_checker": False}
        self.pipe = getattr(diffusers, cls_name).from_pretrained(path, use_safetensors=True,
                                                                 **extra)
        self.pipe.set_progress_bar_config(disable=True)
        self.base_encoder = self.pipe.text_encoder
        for name, (rank, alpha, _) in loras.items():
            self.pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS),
                                       adapter_name=name)
            set_peft_model_state_dict(self.pipe.unet, weights[name], adapter_name=name)

    def images(self, adapters: dict[str, float], text_encoder=None, **kw):
        unet = self.pipe.unet
        if adapters:
            unet.enable_adapters()
            unet.set_adapters(list(adapters), weights=list(adapters.values()))
        else:
            unet.disable_adapters()
        self.pipe.text_encoder = text_encoder or self.base_encoder
        try:
            return reference_images(self.pipe, prompt=PROMPT, **kw)
        finally:
            self.pipe.text_encoder = self.base_encoder


@pytest.fixture(scope="module")
def mixed_server(tmp_path_factory, model_cache, tiny_sd, tiny_sdxl):
    server = start_generation(tmp_path_factory.mktemp("mix"), model_cache, base_models={
        "tiny-sd": "tiny://stable-diffusion", "tiny-sdxl": "tiny://stable-diffusion-xl"})
    store = open_store(server.server.settings.storage)
    weights = {}
    for loras, base, path in ((SD_LORAS, "tiny-sd", tiny_sd),
                              (XL_LORAS, "tiny-sdxl", tiny_sdxl)):
        for name, (rank, alpha, seed) in loras.items():
            weights[name] = lora_weights(path, rank, alpha, seed)
            export_lora_model(store, lora_manifest(name, rank, alpha, base), weights[name])
    encoder = perturbed_text_encoder(tiny_sd, 11)
    weights["dog-te"] = weights["dog"]
    export_lora_model(store, lora_manifest("dog-te", 4, 4.0, "tiny-sd"), weights["dog"],
                      text_encoder=encoder)
    yield server, weights, encoder
    server.stop()


@pytest.fixture(scope="module")
def mix_stub(mixed_server):
    with grpc.insecure_channel(mixed_server[0].target) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


def adapters(**scales) -> list[generation_pb2.AdapterRef]:
    return [generation_pb2.AdapterRef(model=name.replace("_", "-"), scale=scale)
            for name, scale in scales.items()]


def run_together(stub, requests: dict) -> dict:
    """Send every request at once (each model loaded beforehand, so they meet in the
    batch); returns the replies by key."""
    replies, errors = {}, []

    def run(key):
        try:
            replies[key] = stub.Generate(requests[key], timeout=300)
        except grpc.RpcError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return replies


def warm(stub, requests) -> None:
    for request in requests:
        stub.Generate(generation_pb2.GenerateRequest(
            model=request.model, adapters=request.adapters, prompt=PROMPT,
            num_inference_steps=1, guidance_scale=1.0), timeout=120)


def forwards_with_adapters(server, at_least: int) -> float:
    samples = scrape(server.server.metrics_port)
    total = sample(samples, "atelier_generation_forward_adapters_count")
    below = sample(samples, "atelier_generation_forward_adapters_bucket",
                   le=f"{float(at_least - 1)}" if at_least > 1 else "0.0")
    return total - below


def test_mixed_sd_batch_each_image_equals_its_pipeline(mixed_server, mix_stub, tiny_sd):
    """Base, four LoRA models (different ranks and alphas) at different scales, a
    subject plus a style, and a LoRA model with its own text encoder: one forward,
    every image its own pipeline's."""
    server, weights, encoder = mixed_server
    common = dict(prompt=PROMPT, num_inference_steps=8, scheduler="euler")
    requests = {
        "base": generation_pb2.GenerateRequest(seed=30, **common),
        "dog": generation_pb2.GenerateRequest(model="models/dog", seed=31, **common),
        "cat": generation_pb2.GenerateRequest(adapters=adapters(cat=0.6), seed=32,
                                              num_images=2, **common),
        "fox": generation_pb2.GenerateRequest(model="tiny-sd", adapters=adapters(fox=1.7),
                                              seed=33, guidance_scale=1.0, **common),
        "owl+cat": generation_pb2.GenerateRequest(adapters=adapters(owl=1.0, cat=0.4),
                                                  seed=34, **common),
        "dog-te": generation_pb2.GenerateRequest(adapters=adapters(dog_te=0.8, fox=0.5),
                                                 seed=35, **common),
    }
    warm(mix_stub, requests.values())
    before = forwards_with_adapters(server, 5)
    replies = run_together(mix_stub, requests)
    assert forwards_with_adapters(server, 5) > before  # they did share forwards

    ref = Reference(tiny_sd, "StableDiffusionPipeline",
                    {**SD_LORAS, "dog-te": SD_LORAS["dog"]}, weights)
    expected = {
        "base": ref.images({}, seed=30, steps=8, scheduler="euler"),
        "dog": ref.images({"dog": 1.0}, seed=31, steps=8, scheduler="euler"),
        "cat": ref.images({"cat": 0.6}, seed=32, num_images=2, steps=8, scheduler="euler"),
        "fox": ref.images({"fox": 1.7}, seed=33, guidance_scale=1.0, steps=8,
                          scheduler="euler"),
        "owl+cat": ref.images({"owl": 1.0, "cat": 0.4}, seed=34, steps=8, scheduler="euler"),
        "dog-te": ref.images({"dog-te": 0.8, "fox": 0.5}, text_encoder=encoder, seed=35,
                             steps=8, scheduler="euler"),
    }
    for key, reply in replies.items():
        assert len(reply.images) == len(expected[key])
        for image, ref_image in zip(reply.images, expected[key], strict=True):
            assert_close(decode(image), ref_image)
    assert replies["dog"].model == "models/dog"
    assert replies["cat"].model == "models/tiny-sd"
    # The adapters do change the images (else the comparison proves nothing).
    base_as_cat = ref.images({}, seed=32, steps=8, scheduler="euler")[0]
    assert abs(decode(replies["cat"].images[0]).astype(int) - base_as_cat.astype(int)).max() > 2


def test_mixed_sdxl_batch_each_image_equals_its_pipeline(mixed_server, mix_stub, tiny_sdxl):
    server, weights, _ = mixed_server
    common = dict(model="tiny-sdxl", prompt=PROMPT, num_inference_steps=6)
    requests = {
        "base": generation_pb2.GenerateRequest(seed=40, **common),
        "dog": generation_pb2.GenerateRequest(adapters=adapters(xl_dog=1.3), seed=41,
                                              **common),
        "both": generation_pb2.GenerateRequest(adapters=adapters(xl_cat=0.5, xl_dog=0.5),
                                               seed=42, **common),
    }
    warm(mix_stub, requests.values())
    before = forwards_with_adapters(server, 2)
    replies = run_together(mix_stub, requests)
    assert forwards_with_adapters(server, 2) > before
    ref = Reference(tiny_sdxl, "StableDiffusionXLPipeline", XL_LORAS, weights)
    expected = {"base": ref.images({}, seed=40, steps=6),
                "dog": ref.images({"xl-dog": 1.3}, seed=41, steps=6),
                "both": ref.images({"xl-cat": 0.5, "xl-dog": 0.5}, seed=42, steps=6)}
    for key, reply in replies.items():
        assert_close(decode(reply.images[0]), expected[key][0])
    plain = ref.images({}, seed=41, steps=6)[0]
    assert abs(decode(replies["dog"].images[0]).astype(int) - plain.astype(int)).max() > 2


@pytest.mark.parametrize(("request_fields", "field", "words"), [
    ({"adapters": adapters(dog=2.5)}, "adapters[0].scale", "0..2"),
    ({"adapters": adapters(dog=-0.1)}, "adapters[0].scale", "0..2"),
    ({"adapters": [generation_pb2.AdapterRef(model="")]}, "adapters[0].model", "required"),
    ({"model": "tiny-sdxl", "adapters": adapters(dog=1.0)}, "adapters[0].model",
     "trained on models/tiny-sd"),
    ({"adapters": adapters(xl_dog=1.0, dog=1.0)}, "adapters[1].model",
     "trained on models/tiny-sd"),
    ({"adapters": adapters(tiny_sd=1.0)}, "adapters[0].model", "not a LoRA adapter"),
    ({"model": "dog", "adapters": adapters(dog=0.5)}, "adapters[0].model", "listed twice"),
    ({"adapters": adapters(dog=1, cat=1, fox=1, owl=1, dog_te=1)}, "adapters", "limit is 4"),
])
def test_bad_adapter_lists_are_invalid_argument(mix_stub, request_fields, field, words):
    with pytest.raises(grpc.RpcError) as err:
        mix_stub.Generate(generation_pb2.GenerateRequest(prompt=PROMPT, num_inference_steps=2,
                                                         **request_fields), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(err.value)
    assert field in found and words in found[field], found


def test_unknown_adapter_is_not_found_and_two_own_encoders_are_refused(mixed_server,
                                                                       mix_stub):
    with pytest.raises(grpc.RpcError) as err:
        mix_stub.Generate(generation_pb2.GenerateRequest(
            prompt=PROMPT, adapters=adapters(nobody=1.0)), timeout=60)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    server, weights, encoder = mixed_server
    store = open_store(server.server.settings.storage)
    export_lora_model(store, lora_manifest("cat-te", 4, 8.0, "tiny-sd"), weights["cat"],
                      text_encoder=encoder)
    with pytest.raises(grpc.RpcError) as err:
        mix_stub.Generate(generation_pb2.GenerateRequest(
            prompt=PROMPT, num_inference_steps=2, adapters=adapters(dog_te=1.0, cat_te=1.0)),
            timeout=120)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "own trained text encoder" in violations(err.value)["adapters"]


def test_row_deltas_equal_peft_layers_for_linear_and_conv(tmp_path, tiny_sd):
    """The hooks' arithmetic against peft's own LoRA layers, on attention projections
    and ResNet convolutions: row 0 with the adapter at 0.5, row 1 with none, row 2 at
    1.5; and an adapter for another UNet is refused."""
    import copy

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from atelier.generation.adapters import AdapterUse, RowAdapters, load_lora, rows_with_adapters
    from atelier.kit.errors import FailedPrecondition

    base = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    peft_unet = copy.deepcopy(base)
    torch.manual_seed(0)
    peft_unet.add_adapter(LoraConfig(r=4, lora_alpha=6, init_lora_weights=False,
                                     target_modules=["to_q", "to_v", "conv1", "conv2"]))
    weights = tmp_path / "pytorch_lora_weights.safetensors"
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(
            get_peft_model_state_dict(peft_unet)), weight_name=weights.name)
    adapter = load_lora("models/x", weights, StableDiffusionPipeline, base, alpha=6.0,
                        dtype=torch.float32, device="cpu")
    assert any(name.endswith("conv1") for name in adapter.layers)
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(3, 4, 16, 16, generator=generator)
    hidden = torch.randn(3, 77, base.config.cross_attention_dim, generator=generator)
    t = torch.tensor([10.0, 500.0, 900.0])
    with torch.inference_mode():
        plan = RowAdapters.plan([[AdapterUse(adapter, 0.5)], [], [AdapterUse(adapter, 1.5)]],
                                "cpu", torch.float32)
        with rows_with_adapters(plan, dict(base.named_modules())):
            ours = base(sample, t, hidden).sample
        expected = []
        for row, scale in ((0, 0.5), (1, 0.0), (2, 1.5)):
            peft_unet.set_adapters(["default"], weights=[scale])
            expected.append(peft_unet(sample[row:row + 1], t[row:row + 1],
                                      hidden[row:row + 1]).sample)
        plain = base(sample, t, hidden).sample  # the hooks are gone again
    torch.testing.assert_close(ours, torch.cat(expected), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain[1], ours[1])
    assert (plain[0] - ours[0]).abs().max() > 1e-3

    other = UNet2DConditionModel.from_config({**base.config, "cross_attention_dim": 48})
    with pytest.raises(FailedPrecondition, match="do not fit"):
        load_lora("models/x", weights, StableDiffusionPipeline, other, alpha=None,
                  dtype=torch.float32, device="cpu")


def test_resident_adapters_share_the_byte_budget_and_lru(tmp_path, model_cache, tiny_sd):
    """Room for the base, two adapters and a quarter: a third LoRA model (half their
    rank) evicts the least recently used idle one, and the request mixes the other
    two."""
    server = start_generation(tmp_path, model_cache)
    try:
        store = open_store(server.server.settings.storage)
        for name in ("dog", "cat", "owl"):
            rank, alpha, seed = SD_LORAS[name]
            export_lora_model(store, lora_manifest(name, rank, alpha, "tiny-sd"),
                              lora_weights(tiny_sd, rank, alpha, seed))
        with grpc.insecure_channel(server.target) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)

            def memory(name):
                return stub.GetModel(generation_pb2.GetModelRequest(name=f"models/{name}"),
                                     timeout=30).model.memory_bytes

            stub.Generate(generation_pb2.GenerateRequest(
                prompt=PROMPT, num_inference_steps=1, adapters=adapters(dog=1, cat=1)),
                timeout=120)
            base, dog, cat = memory("tiny-sd"), memory("dog"), memory("cat")
    finally:
        server.stop()
    assert 0 < dog == cat < base / 20  # an adapter is its own tensors only

    server = start_generation(tmp_path, model_cache, model_cache_bytes=base + 2 * dog + dog // 4)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)

            def state(name):
                return stub.GetModel(generation_pb2.GetModelRequest(name=f"models/{name}"),
                                     timeout=30).model.load_state

            for request in (adapters(dog=1), adapters(cat=1), adapters(owl=1, cat=0.5)):
                stub.Generate(generation_pb2.GenerateRequest(
                    prompt=PROMPT, num_inference_steps=2, adapters=request), timeout=120)
            assert state("dog") == model_pb2.MODEL_LOAD_STATE_NOT_LOADED
            assert state("cat") == state("owl") == model_pb2.MODEL_LOAD_STATE_LOADED
            held = sample(scrape(server.server.metrics_port),
                          "atelier_generation_model_cache_bytes")
            assert held <= base + 2 * dog + dog // 4
    finally:
        server.stop()
