"""Fine-tuned models belong to their owner: other principals get NOT_FOUND, admins
see all; DeleteModel removes a model from the store, and every replica on that
store stops serving it within the refresh interval."""

from __future__ import annotations

import grpc
import pytest

from atelier.models.export import export_lora_model
from atelier.storage import open_store
from atelier.v1 import generation_pb2, generation_pb2_grpc
from tests.conftest import wait_until
from tests.generation.test_fine_tuned_models import lora_state, manifest

TOKENS = "alice tok-alice\nbob tok-bob\nroot tok-root\n"


def as_(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, model_cache, tiny_sd):
    """Two generation replicas with bearer auth on one store; alice owns one LoRA."""
    root = tmp_path_factory.mktemp("owned")
    tokens = root / "tokens"
    tokens.write_text(TOKENS)
    storage = {"local_root": root / "store", "bucket": "atelier-test"}
    servers = []
    for _ in range(2):
        servers.append(start_app_with_auth(storage, model_cache, tokens))
    store = open_store(servers[0].server.settings.storage)
    yield servers, store
    for server in servers:
        server.stop()


def start_app_with_auth(storage, model_cache, tokens):
    from atelier.generation import app
    from tests.kit.server_thread import start_app

    return start_app(app, storage=storage, model_cache=model_cache, section="generation",
                     engine={"model_refresh_interval_s": 0.2},
                     auth={"tokens_file": tokens, "admin_principals": ["root"]})


def test_other_principals_see_no_such_model(replicas, tiny_sd):
    servers, store = replicas
    export_lora_model(store, manifest("alices-dog").model_copy(update={"owner": "alice"}),
                      lora_state(tiny_sd, 5))
    with grpc.insecure_channel(servers[0].target) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        request = generation_pb2.GenerateRequest(model="models/alices-dog", prompt="a sks dog",
                                                 num_inference_steps=2)
        assert len(stub.Generate(request, timeout=120, metadata=as_("tok-alice")).images) == 1
        got = stub.GetModel(generation_pb2.GetModelRequest(name="models/alices-dog"),
                            timeout=30, metadata=as_("tok-root")).model
        assert got.owner == "alice"

        def names(token):
            listed = stub.ListModels(generation_pb2.ListModelsRequest(), timeout=30,
                                     metadata=as_(token))
            return {m.name for m in listed.models}

        assert "models/alices-dog" in names("tok-alice") and "models/alices-dog" in \
            names("tok-root")
        assert names("tok-bob") == {"models/tiny-sd", "models/tiny-sdxl",  # the bases only
                                    "models/tiny-klein-base", "models/tiny-klein"}
        for call in (lambda: stub.Generate(request, timeout=60, metadata=as_("tok-bob")),
                     lambda: stub.GetModel(generation_pb2.GetModelRequest(
                         name="models/alices-dog"), timeout=30, metadata=as_("tok-bob")),
                     lambda: stub.DeleteModel(generation_pb2.DeleteModelRequest(
                         name="models/alices-dog"), timeout=30, metadata=as_("tok-bob"))):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            stub.DeleteModel(generation_pb2.DeleteModelRequest(name="models/tiny-sd"),
                             timeout=30, metadata=as_("tok-root"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_delete_model_leaves_nothing_and_every_replica_stops_serving_it(replicas, tiny_sd):
    servers, store = replicas
    export_lora_model(store, manifest("to-delete").model_copy(update={"owner": "alice"}),
                      lora_state(tiny_sd, 6))
    request = generation_pb2.GenerateRequest(model="models/to-delete", prompt="a sks dog",
                                             num_inference_steps=2)
    channels = [grpc.insecure_channel(s.target) for s in servers]
    stubs = [generation_pb2_grpc.GenerationServiceStub(c) for c in channels]
    try:
        for stub in stubs:  # loaded on both replicas
            stub.Generate(request, timeout=120, metadata=as_("tok-alice"))
        reply = stubs[0].DeleteModel(generation_pb2.DeleteModelRequest(name="models/to-delete"),
                                     timeout=60, metadata=as_("tok-alice"))
        assert reply.deleted_objects >= 2
        assert list(store.list("models/to-delete/")) == []

        def refused(stub) -> bool:
            try:
                stub.Generate(request, timeout=60, metadata=as_("tok-alice"))
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.NOT_FOUND
                return True
            return False

        assert refused(stubs[0])  # the replica that deleted it: at once
        # The other replica had it loaded; it drops it within its refresh interval.
        wait_until(lambda: refused(stubs[1]), timeout=30)
    finally:
        for channel in channels:
            channel.close()
