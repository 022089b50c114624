"""Model references: tiny://, store:// (on both backends), local paths, hub ids."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from atelier.kit.errors import AtelierError
from atelier.models.sources import parse_model_ref, resolve_model_ref
from atelier.storage import open_store


def _image(path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe("a photo of sks dog", num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(7)).images[0]


@pytest.mark.parametrize("backend", ["local", "minio"])
def test_store_prefix_downloads_and_loads_like_a_local_path(request, backend, tiny_sd, tmp_path):
    store = open_store(request.getfixturevalue(f"{backend}_settings"))
    store.upload_dir(tiny_sd, "models/tiny-sd")
    cache = tmp_path / "cache"
    path = resolve_model_ref("store://models/tiny-sd", cache_dir=cache, store=store)
    np.testing.assert_array_equal(_image(path), _image(tiny_sd))
    # Unchanged objects: the cached copy is reused.
    marker = (cache / "store").glob("*/.complete")
    stamps = {p: p.stat().st_mtime_ns for p in marker}
    assert resolve_model_ref(f"s3://{store.bucket}/models/tiny-sd", cache_dir=cache,
                             store=store) == path
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # A changed object in the store invalidates the cached copy.
    store.put_bytes("models/tiny-sd/extra.txt", b"new file")
    resolve_model_ref("store://models/tiny-sd", cache_dir=cache, store=store)
    assert (tmp_path / "cache").joinpath("store").exists()
    assert any(p.name == "extra.txt" for p in (cache / "store").rglob("extra.txt"))


def test_pickles_from_the_store_are_refused(local_settings, tmp_path):
    store = open_store(local_settings)
    store.put_bytes("models/evil/unet/diffusion_pytorch_model.bin", b"\x80\x04pickle")
    with pytest.raises(AtelierError) as err:
        resolve_model_ref("store://models/evil", cache_dir=tmp_path, store=store)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "safetensors" in err.value.message


def test_unknown_and_malformed_references(local_settings, tmp_path):
    store = open_store(local_settings)
    cases = {
        "store://models/nothing-here": grpc.StatusCode.NOT_FOUND,
        "tiny://no-such-model": grpc.StatusCode.NOT_FOUND,
        "/no/such/dir": grpc.StatusCode.NOT_FOUND,
        "s3://other-bucket/models/x": grpc.StatusCode.INVALID_ARGUMENT,
        "store://../etc": grpc.StatusCode.INVALID_ARGUMENT,
        "": grpc.StatusCode.INVALID_ARGUMENT,
        "not a model!": grpc.StatusCode.INVALID_ARGUMENT,
    }
    for ref, code in cases.items():
        with pytest.raises(AtelierError) as err:
            resolve_model_ref(ref, cache_dir=tmp_path, store=store)
        assert err.value.code == code, ref


def test_hub_ids_and_local_paths(tiny_sd, tmp_path):
    assert parse_model_ref("stable-diffusion-v1-5/stable-diffusion-v1-5").kind == "hub"
    assert resolve_model_ref("Qwen/Qwen3-VL-2B-Instruct", cache_dir=tmp_path) == \
        "Qwen/Qwen3-VL-2B-Instruct"
    assert resolve_model_ref(str(tiny_sd), cache_dir=tmp_path) == str(tiny_sd)
    assert parse_model_ref("tiny://qwen3-vl").kind == "tiny"
