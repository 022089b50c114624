"""One contract, both backends: the same tests run on the local store and on S3/MinIO."""

from __future__ import annotations

import hashlib
import os

import grpc
import pytest

from atelier.storage import InvalidObjectKey, ObjectNotFound, ObjectStore, open_store


@pytest.fixture(params=["local", "minio"])
def store(request) -> ObjectStore:
    settings = request.getfixturevalue(f"{request.param}_settings")
    return open_store(settings)


def test_large_object_round_trip_through_files(store, tmp_path):
    size = 17 * 1024 * 1024 + 123  # above 16 MiB: a multipart upload on S3
    payload = os.urandom(size)
    source = tmp_path / "big.bin"
    source.write_bytes(payload)
    store.put_file("blobs/big.bin", source)
    assert store.stat("blobs/big.bin").size == size
    target = store.get_file("blobs/big.bin", tmp_path / "out" / "big.bin")
    assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(payload).digest()


def test_bytes_and_json_round_trip(store):
    store.put_bytes("a/b.txt", b"hello")
    assert store.get_bytes("a/b.txt") == b"hello"
    store.put_bytes("a/b.txt", b"replaced")
    assert store.get_bytes("a/b.txt") == b"replaced"
    store.put_json("jobs/j1.json", {"state": "QUEUED", "n": 3})
    assert store.get_json("jobs/j1.json") == {"state": "QUEUED", "n": 3}


def test_list_by_prefix(store):
    for key in ["models/a/manifest.json", "models/a/unet/w.safetensors", "models/b/x",
                "modelsx/y", "other/z"]:
        store.put_bytes(key, key.encode())
    assert [o.key for o in store.list("models/")] == [
        "models/a/manifest.json", "models/a/unet/w.safetensors", "models/b/x",
    ]
    assert [o.key for o in store.list("models/a/")] == [
        "models/a/manifest.json", "models/a/unet/w.safetensors",
    ]
    assert {o.key for o in store.list("models")} >= {"models/b/x", "modelsx/y"}
    assert list(store.list("nothing/")) == []
    sizes = {o.key: o.size for o in store.list("other/")}
    assert sizes == {"other/z": len(b"other/z")}


def test_delete_and_delete_prefix(store):
    store.put_bytes("d/1", b"1")
    store.put_bytes("d/2", b"2")
    store.put_bytes("d/sub/3", b"3")
    store.delete("d/1")
    assert not store.exists("d/1")
    assert store.exists("d/2")
    assert store.delete_prefix("d/") == 2
    assert list(store.list("d/")) == []


def test_missing_key_is_typed_not_found(store, tmp_path):
    for call in (
        lambda: store.get_bytes("no/such"),
        lambda: store.get_file("no/such", tmp_path / "x"),
        lambda: store.stat("no/such"),
        lambda: store.delete("no/such"),
    ):
        with pytest.raises(ObjectNotFound) as info:
            call()
        assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert not store.exists("no/such")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "key",
    ["../escape", "a/../../b", "/absolute", "a//b", "a/./b", "ctl\x00char", "new\nline",
     "back\\slash", "", "trailing/", "x" * 1025],
)
def test_bad_keys_refused(store, key):
    with pytest.raises(InvalidObjectKey) as info:
        store.put_bytes(key, b"x")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(InvalidObjectKey):
        store.get_bytes(key)


def test_directory_round_trip(store, tmp_path):
    src = tmp_path / "model"
    (src / "unet").mkdir(parents=True)
    (src / "model_index.json").write_text("{}")
    (src / "unet" / "w.bin").write_bytes(b"\x00" * 10)
    assert store.upload_dir(src, "models/m1") == 2
    dest = tmp_path / "copy"
    assert store.download_prefix("models/m1", dest) == 2
    assert (dest / "unet" / "w.bin").read_bytes() == b"\x00" * 10
    assert (dest / "model_index.json").read_text() == "{}"


def test_create_claims_a_key_exactly_once_under_concurrency(store):
    from concurrent.futures import ThreadPoolExecutor

    store.put_bytes("claims/taken", b"first")
    assert store.create_bytes("claims/taken", b"second") is False
    assert store.get_bytes("claims/taken") == b"first"  # never overwritten
    for round_ in range(3):
        key = f"claims/race-{round_}"
        with ThreadPoolExecutor(8) as pool:
            won = list(pool.map(lambda i, k=key: store.create_bytes(k, f"writer-{i}".encode()),
                                range(8)))
        assert won.count(True) == 1
        assert store.get_bytes(key) == f"writer-{won.index(True)}".encode()
    # A retry of a landed write finds its own bytes: still a success.
    assert store.create_json("claims/j.json", {"job": "a"}) is True
    assert store.create_json("claims/j.json", {"job": "a"}) is True
    assert store.create_json("claims/j.json", {"job": "b"}) is False
    store.delete("claims/j.json")
    assert store.create_json("claims/j.json", {"job": "b"}) is True
