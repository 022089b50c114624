"""Fine-tuned models written to the store in the manifest format load by name,
generate what diffusers makes with the same weights, and share their base."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch

from atelier.models.export import export_full_model, export_lora_model
from atelier.models.manifest import ManifestWeights, ModelManifest
from atelier.storage import open_store
from atelier.v1 import generation_pb2, generation_pb2_grpc, model_pb2
from tests.generation.conftest import (
    assert_close,
    decode,
    reference_images,
    reference_pipeline,
    start_generation,
)
from tests.kit.test_server import sample, scrape

PROMPT = "a photo of sks dog"


def manifest(model_id: str) -> ModelManifest:
    return ModelManifest(model_id=model_id, kind="lora", base_model="models/tiny-sd",
                         base_model_source="tiny://stable-diffusion", identifier_token="sks",
                         class_prompt="a photo of a dog",
                         weights=ManifestWeights(lora="x.safetensors"))


def perturbed_unet(tiny_sd, seed: int):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return unet


def lora_state(tiny_sd, seed: int):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return get_peft_model_state_dict(unet)


@pytest.fixture(scope="module")
def models_server(tmp_path_factory, model_cache, tiny_sd):
    root = tmp_path_factory.mktemp("ft")
    server = start_generation(root, model_cache)
    store = open_store(server.server.settings.storage)
    export_full_model(store, manifest("dog-full"), perturbed_unet(tiny_sd, 1))
    export_lora_model(store, manifest("dog-lora"), lora_state(tiny_sd, 2))
    export_lora_model(store, manifest("cat-lora"), lora_state(tiny_sd, 3))
    yield server, store
    server.stop()


@pytest.fixture(scope="module")
def ft_stub(models_server):
    with grpc.insecure_channel(models_server[0].target) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


def lora_reference(tiny_sd, store, model_id, tmp_path, **kw):
    from diffusers import StableDiffusionPipeline

    local = tmp_path / model_id
    store.download_prefix(f"models/{model_id}", local)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(local), weight_name="pytorch_lora_weights.safetensors")
    return reference_images(pipe, prompt=PROMPT, **kw)


def test_full_fine_tune_generates_like_diffusers(ft_stub, tiny_sd):
    reply = ft_stub.Generate(generation_pb2.GenerateRequest(
        model="models/dog-full", prompt=PROMPT, num_inference_steps=6, seed=9), timeout=120)
    assert reply.model == "models/dog-full"
    pipe = reference_pipeline(tiny_sd)
    original = pipe.unet
    pipe.unet = perturbed_unet(tiny_sd, 1)
    try:
        ref = reference_images(pipe, prompt=PROMPT, seed=9, steps=6)[0]
    finally:
        pipe.unet = original
    assert_close(decode(reply.images[0]), ref)
    base_ref = reference_images(pipe, prompt=PROMPT, seed=9, steps=6)[0]
    assert abs(decode(reply.images[0]).astype(int) - base_ref.astype(int)).max() > 2


def test_lora_and_base_batched_together_each_match(ft_stub, models_server, tiny_sd, tmp_path):
    """Base, two LoRA models over it, concurrently: each matches its own reference,
    so one model's adapter never leaks into another's rows of a shared forward."""
    _, store = models_server
    requests = {
        "tiny-sd": generation_pb2.GenerateRequest(prompt=PROMPT, num_inference_steps=10,
                                                  seed=21, scheduler="ddim"),
        "dog-lora": generation_pb2.GenerateRequest(model="models/dog-lora", prompt=PROMPT,
                                                   num_inference_steps=10, seed=22,
                                                   scheduler="ddim"),
        "cat-lora": generation_pb2.GenerateRequest(model="cat-lora", prompt=PROMPT,
                                                   num_inference_steps=10, seed=23,
                                                   scheduler="ddim"),
    }
    replies = {}

    def run(name):
        replies[name] = ft_stub.Generate(requests[name], timeout=300)

    threads = [threading.Thread(target=run, args=(n,)) for n in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    base_ref = reference_images(reference_pipeline(tiny_sd), prompt=PROMPT, seed=21, steps=10,
                                scheduler="ddim")[0]
    assert_close(decode(replies["tiny-sd"].images[0]), base_ref)
    for name, seed in (("dog-lora", 22), ("cat-lora", 23)):
        ref = lora_reference(tiny_sd, store, name, tmp_path, seed=seed, steps=10,
                             scheduler="ddim")[0]
        assert_close(decode(replies[name].images[0]), ref)
        wrong = reference_images(reference_pipeline(tiny_sd), prompt=PROMPT, seed=seed,
                                 steps=10, scheduler="ddim")[0]
        assert abs(decode(replies[name].images[0]).astype(int) - wrong.astype(int)).max() > 2


def test_list_and_get_models(ft_stub):
    ft_stub.Generate(generation_pb2.GenerateRequest(model="models/dog-lora", prompt=PROMPT,
                                                    num_inference_steps=2), timeout=120)
    models = {m.name: m for m in ft_stub.ListModels(generation_pb2.ListModelsRequest(),
                                                    timeout=30).models}
    assert {"models/tiny-sd", "models/dog-full", "models/dog-lora", "models/cat-lora"} <= \
        models.keys()
    base, lora = models["models/tiny-sd"], models["models/dog-lora"]
    assert base.kind == model_pb2.MODEL_KIND_BASE
    assert base.load_state == model_pb2.MODEL_LOAD_STATE_LOADED
    assert base.default_resolution == 128
    assert lora.kind == model_pb2.MODEL_KIND_FINE_TUNED_LORA
    assert lora.load_state == model_pb2.MODEL_LOAD_STATE_LOADED
    assert lora.base_model == "models/tiny-sd" and lora.identifier_token == "sks"
    assert lora.class_prompt == "a photo of a dog"
    # The LoRA model holds only its adapter; the UNet, VAE and text encoder are the base's.
    assert 0 < lora.memory_bytes < base.memory_bytes / 5
    got = ft_stub.GetModel(generation_pb2.GetModelRequest(name="models/dog-full"), timeout=30)
    assert got.model.kind == model_pb2.MODEL_KIND_FINE_TUNED_FULL

    page = ft_stub.ListModels(generation_pb2.ListModelsRequest(page_size=2), timeout=30)
    assert len(page.models) == 2 and page.next_page_token
    rest = ft_stub.ListModels(generation_pb2.ListModelsRequest(
        page_size=50, page_token=page.next_page_token), timeout=30)
    assert len(page.models) + len(rest.models) == len(models) and not rest.next_page_token
    only_lora = ft_stub.ListModels(generation_pb2.ListModelsRequest(
        kind=model_pb2.MODEL_KIND_FINE_TUNED_LORA), timeout=30)
    assert {m.name for m in only_lora.models} == {"models/dog-lora", "models/cat-lora"}
    for bad in (generation_pb2.GetModelRequest(name="models/none"),):
        with pytest.raises(grpc.RpcError) as err:
            ft_stub.GetModel(bad, timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        ft_stub.ListModels(generation_pb2.ListModelsRequest(page_token="garbage"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_concurrent_requests_wait_for_one_load_and_lru_evicts(tmp_path, model_cache, tiny_sd):
    base_bytes = 0
    server = start_generation(tmp_path, model_cache)
    try:
        store = open_store(server.server.settings.storage)
        export_full_model(store, manifest("full-a"), perturbed_unet(tiny_sd, 5))
        export_full_model(store, manifest("full-b"), perturbed_unet(tiny_sd, 6))
        with grpc.insecure_channel(server.target) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            before = sample(scrape(server.server.metrics_port),
                            "atelier_generation_model_loads_total", result="ok")
            threads = [threading.Thread(target=stub.Generate, args=(
                generation_pb2.GenerateRequest(model="models/full-a", prompt=PROMPT,
                                               num_inference_steps=2, seed=i),),
                kwargs={"timeout": 120}) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            after = sample(scrape(server.server.metrics_port),
                           "atelier_generation_model_loads_total", result="ok")
            assert after - before == 1  # four requests, one load
            base_bytes = stub.GetModel(generation_pb2.GetModelRequest(name="models/tiny-sd"),
                                       timeout=30).model.memory_bytes
            full_bytes = stub.GetModel(generation_pb2.GetModelRequest(name="models/full-a"),
                                       timeout=30).model.memory_bytes
            assert full_bytes > 0
    finally:
        server.stop()

    # Room for the base and one full fine-tune: loading the second evicts the first.
    server = start_generation(tmp_path, model_cache,
                              model_cache_bytes=base_bytes + full_bytes + full_bytes // 2)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)

            def state(name):
                return stub.GetModel(generation_pb2.GetModelRequest(name=name),
                                     timeout=30).model.load_state

            for name in ("models/full-a", "models/full-b"):
                stub.Generate(generation_pb2.GenerateRequest(model=name, prompt=PROMPT,
                                                             num_inference_steps=2), timeout=120)
            assert state("models/full-a") == model_pb2.MODEL_LOAD_STATE_NOT_LOADED
            assert state("models/full-b") == model_pb2.MODEL_LOAD_STATE_LOADED
            assert state("models/tiny-sd") == model_pb2.MODEL_LOAD_STATE_LOADED
            held = sample(scrape(server.server.metrics_port),
                          "atelier_generation_model_cache_bytes")
            assert held <= base_bytes + full_bytes + full_bytes // 2
    finally:
        server.stop()


def test_sdxl_fine_tunes_load_by_name_beside_sd(tmp_path, model_cache, tiny_sd, tiny_sdxl):
    """A full and a LoRA fine-tune of the tiny SDXL load by name and equal diffusers'
    SDXL pipeline with the same weights; a manifest whose family is not its base's is
    FAILED_PRECONDITION."""
    from diffusers import StableDiffusionXLPipeline

    def sdxl_manifest(model_id: str, base: str = "tiny-sdxl") -> ModelManifest:
        return manifest(model_id).model_copy(update={
            "family": "stable-diffusion-xl", "base_model": f"models/{base}",
            "base_model_source": "tiny://stable-diffusion-xl"})

    server = start_generation(tmp_path, model_cache, base_models={
        "tiny-sd": "tiny://stable-diffusion", "tiny-sdxl": "tiny://stable-diffusion-xl"})
    try:
        store = open_store(server.server.settings.storage)
        export_full_model(store, sdxl_manifest("xl-full"), perturbed_unet(tiny_sdxl, 7))
        export_lora_model(store, sdxl_manifest("xl-lora"), lora_state(tiny_sdxl, 8))
        export_lora_model(store, sdxl_manifest("xl-over-sd", base="tiny-sd"),
                          lora_state(tiny_sdxl, 9))
        with grpc.insecure_channel(server.target) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)

            def generate(model):
                return stub.Generate(generation_pb2.GenerateRequest(
                    model=model, prompt=PROMPT, num_inference_steps=6, seed=12), timeout=120)

            full, lora = generate("xl-full"), generate("models/xl-lora")
            got = stub.GetModel(generation_pb2.GetModelRequest(name="models/xl-lora"),
                                timeout=30).model
            assert got.family == model_pb2.MODEL_FAMILY_STABLE_DIFFUSION_XL
            with pytest.raises(grpc.RpcError) as err:
                generate("xl-over-sd")
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "stable-diffusion-xl" in err.value.details()

        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, use_safetensors=True)
        pipe.set_progress_bar_config(disable=True)
        base_unet = pipe.unet
        pipe.unet = perturbed_unet(tiny_sdxl, 7)
        assert_close(decode(full.images[0]),
                     reference_images(pipe, prompt=PROMPT, seed=12, steps=6)[0])
        pipe.unet = base_unet
        local = tmp_path / "xl-lora"
        store.download_prefix("models/xl-lora", local)
        pipe.load_lora_weights(str(local), weight_name="pytorch_lora_weights.safetensors")
        assert_close(decode(lora.images[0]),
                     reference_images(pipe, prompt=PROMPT, seed=12, steps=6)[0])
    finally:
        server.stop()


def _tamper(store, model_id: str, **changes) -> None:
    """Rewrite a stored model's manifest, as anyone who can write to the store could."""
    key = f"models/{model_id}/manifest.json"
    store.put_json(key, {**store.get_json(key), **changes})


def _refusal(stub, model_id: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(generation_pb2.GenerateRequest(model=f"models/{model_id}", prompt=PROMPT,
                                                     num_inference_steps=2), timeout=120)
    return err.value


@pytest.mark.parametrize("kind, weights, field", [
    ("lora", {"lora": "../../../outside/evil.safetensors"}, "lora"),
    ("lora", {"lora": "/etc/evil.safetensors"}, "lora"),
    ("full", {"unet": "../../../../../../../../etc"}, "unet"),
    ("lora", {"lora": "pytorch_lora_weights.safetensors", "text_encoder": "../dog-full/unet"},
     "text_encoder"),
])
def test_manifest_weight_paths_stay_inside_the_model_folder(models_server, ft_stub, tiny_sd,
                                                            kind, weights, field):
    """A manifest whose weights lead out of its folder is refused before anything is
    read there, naming the field; the service goes on serving."""
    _, store = models_server
    model_id = f"escape-{field.replace('_', '-')}-{len(weights[field]) % 97}"
    export_lora_model(store, manifest(model_id), lora_state(tiny_sd, 5))
    _tamper(store, model_id, kind=kind, weights=weights)
    error = _refusal(ft_stub, model_id)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"weights.{field}" in error.details() and "outside the model's folder" in \
        error.details()
    assert ft_stub.Generate(generation_pb2.GenerateRequest(
        prompt=PROMPT, num_inference_steps=2), timeout=120).images


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "deleted"])
def test_unreadable_weights_are_a_precondition_naming_the_model(models_server, ft_stub,
                                                               tiny_sd, damage):
    """Stored LoRA weights cut in half, emptied, overwritten or deleted: FAILED_PRECONDITION
    naming the model (no host path, no INTERNAL), and other models still serve."""
    _, store = models_server
    model_id = f"broken-{damage}"
    export_lora_model(store, manifest(model_id), lora_state(tiny_sd, 6))
    key = f"models/{model_id}/pytorch_lora_weights.safetensors"
    data = store.get_bytes(key)
    if damage == "deleted":
        store.delete(key)
    else:
        store.put_bytes(key, {"truncated": data[: len(data) // 2], "empty": b"",
                              "garbage": b"\x00not safetensors" * 64}[damage])
    error = _refusal(ft_stub, model_id)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
    assert f"models/{model_id}" in error.details()
    assert "/tmp" not in error.details() and ".cache" not in error.details()
    assert ft_stub.Generate(generation_pb2.GenerateRequest(
        model="models/dog-lora", prompt=PROMPT, num_inference_steps=2), timeout=120).images


def test_a_manifest_cannot_point_at_a_real_file_elsewhere(models_server, ft_stub, tiny_sd,
                                                          tmp_path):
    """The case that served before: a valid LoRA file outside the model's folder, named
    by an absolute path in a tampered manifest, is not loaded."""
    _, store = models_server
    elsewhere = tmp_path / "elsewhere.safetensors"
    elsewhere.write_bytes(store.get_bytes("models/dog-lora/pytorch_lora_weights.safetensors"))
    export_lora_model(store, manifest("pointer"), lora_state(tiny_sd, 7))
    _tamper(store, "pointer", weights={"lora": str(elsewhere)})
    error = _refusal(ft_stub, "pointer")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "weights.lora" in error.details()
