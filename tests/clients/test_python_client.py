"""The Python client library against real services: sync and asyncio calls, the
image helpers, typed errors with rich details, retries on UNAVAILABLE and on
RESOURCE_EXHAUSTED (honouring the server's hint), bearer tokens and mTLS."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from atelier.client import (
    FINAL_STATES,
    AnalysisClient,
    AsyncAnalysisClient,
    AsyncGenerationClient,
    AsyncTrainingClient,
    ConnectionOptions,
    FailedPrecondition,
    GenerationClient,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
    answer_json,
    dreambooth_spec,
    save_images,
    to_pil,
)
from atelier.client.generation import generate_request, parse_adapter
from atelier.dev.demo_assets import DOCUMENT_SCHEMA, bar_chart, document_page, toy_photo
from atelier.generation import app as generation_app
from atelier.v1 import generation_pb2_grpc
from atelier.v1 import training_pb2 as T
from tests.conftest import free_port, wait_until
from tests.kit.certificates import make_pki
from tests.kit.server_thread import start_app
from tests.kit.test_server import sample, scrape

NO_RETRY = RetryPolicy(max_attempts=1)


def test_generate_matches_the_raw_stub(local_services, tmp_path):
    target = local_services.targets["generation"]
    fields = dict(num_images=2, steps=3, seed=11, width=64, height=64, scheduler="ddim")
    with GenerationClient(target) as client:
        reply = client.generate("a red fox", **fields)
    with grpc.insecure_channel(target) as channel:
        raw = generation_pb2_grpc.GenerationServiceStub(channel).Generate(
            generate_request("a red fox", **fields), timeout=60)
    assert [i.data for i in reply.images] == [i.data for i in raw.images]
    assert list(reply.seeds) == [11, 12]
    paths = save_images(reply.images, tmp_path, "fox")
    assert [p.name for p in paths] == ["fox-0.png", "fox-1.png"]
    assert to_pil(reply.images[0]).size == (64, 64)


def test_adapters_in_requests(local_services):
    request = generate_request("a fox", adapters=["sks-dog", ("ink", 0.7)])
    assert [(a.model, a.HasField("scale")) for a in request.adapters] == [
        ("sks-dog", False), ("ink", True)]
    assert request.adapters[1].scale == pytest.approx(0.7)
    assert parse_adapter("models/ink:0.25") == ("models/ink", 0.25)
    assert parse_adapter("ink") == ("ink", 1.0)
    with pytest.raises(ValueError):
        parse_adapter("ink:strong")
    with GenerationClient(local_services.targets["generation"], retry=NO_RETRY) as client:
        with pytest.raises(NotFound):
            client.generate("a fox", steps=2, adapters=[("no-such-lora", 1.0)])


def test_images_from_paths_bytes_and_pil(local_services, tmp_path):
    from PIL import Image

    chart = bar_chart()
    (tmp_path / "chart.png").write_bytes(chart)
    with AnalysisClient(local_services.targets["analysis"]) as client:
        answers = {client.analyze(image, instruction="What is shown?", max_new_tokens=6).text
                   for image in (tmp_path / "chart.png", chart,
                                 Image.open(tmp_path / "chart.png"))}
        assert len(answers) == 1  # the same picture, however it is passed
        doc = client.analyze(document_page(), task="document", output_format="json",
                             json_schema=DOCUMENT_SCHEMA, max_new_tokens=64)
        assert set(answer_json(doc)) >= set(DOCUMENT_SCHEMA["required"])
        streamed = list(client.analyze_stream(chart, instruction="What is shown?",
                                              max_new_tokens=6))
        assert "".join(e.delta for e in streamed if e.HasField("delta")) in answers
        batch = list(client.batch_analyze([chart, chart], instruction="What is shown?",
                                          max_new_tokens=6))
        assert sorted(r.index for r in batch) == [0, 1]
        assert {r.result.text for r in batch} == answers


def test_errors_carry_code_and_details(local_services):
    with GenerationClient(local_services.targets["generation"], retry=NO_RETRY) as client:
        with pytest.raises(InvalidArgument) as bad:
            client.generate("x", width=1001, steps=2)
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in bad.value.field_violations] == ["width"]
        assert bad.value.request_id
        with pytest.raises(NotFound) as missing:
            client.get_model("no-such-model")
        assert missing.value.resource == ("model", "models/no-such-model")


def test_async_clients(local_services):
    async def scenario():
        async with AsyncGenerationClient(local_services.targets["generation"]) as gen:
            models = await gen.list_models()
            reply = await gen.generate("a red fox", steps=2, seed=3, width=64, height=64)
            steps = [e.progress.step async for e in gen.generate_stream(
                "a red fox", steps=2, seed=3, width=64, height=64, scheduler="ddim")
                if e.HasField("progress")]
        async with AsyncAnalysisClient(local_services.targets["analysis"]) as an:
            answer = await an.analyze(bar_chart(), instruction="What?", max_new_tokens=4)
            deltas = [e async for e in an.analyze_stream(bar_chart(), instruction="What?",
                                                          max_new_tokens=4)]
        return models, reply, steps, answer, deltas

    models, reply, steps, answer, deltas = asyncio.run(scenario())
    assert models and len(reply.images) == 1 and steps == [1, 2]
    assert answer.text and deltas[-1].result.text == answer.text


def test_async_training_client_is_idempotent_and_cancels(local_services):
    spec = dreambooth_spec([toy_photo(p) for p in range(3)], identifier_token="zwx",
                           class_noun="toy", prior_preservation=False, resolution=64,
                           max_train_steps=5000, resources=T.TrainingResources(num_workers=1))

    async def scenario():
        async with AsyncTrainingClient(local_services.targets["training"]) as client:
            first = await client.create_job(spec, request_id="client-test-1")
            again = await client.create_job(spec, request_id="client-test-1")
            assert again.name == first.name  # the same submission, not a second job
            listed = await client.list_jobs(page_size=1)
            assert first.name in {j.name for j in listed}
            await client.cancel_job(first.name)
            final = await client.wait_for_job(first.name, timeout=300)
            with pytest.raises(FailedPrecondition):
                await client.cancel_job(first.name)
            return final

    final = asyncio.run(scenario())
    assert final.state == T.TRAINING_JOB_STATE_CANCELLED and final.state in FINAL_STATES


def test_unavailable_is_retried_until_the_server_is_up(tmp_path, model_cache):
    port = free_port()
    target = f"127.0.0.1:{port}"
    with GenerationClient(target, retry=NO_RETRY) as client:
        with pytest.raises(Unavailable):
            list(client.list_models())
    started = {}

    def start_late():
        time.sleep(1.0)
        started["server"] = start_app(generation_app, storage={"local_root": tmp_path},
                                      model_cache=model_cache, section="generation",
                                      engine={}, grpc={"port": port})

    thread = threading.Thread(target=start_late)
    thread.start()
    try:
        patient = RetryPolicy(max_attempts=200, initial_backoff_s=0.1, max_backoff_s=0.3)
        with GenerationClient(target, retry=patient) as client:
            assert list(client.list_models())
    finally:
        thread.join()
        started["server"].stop()


def test_resource_exhausted_honours_the_retry_hint(tmp_path, model_cache):
    server = start_app(generation_app, storage={"local_root": tmp_path},
                       model_cache=model_cache, section="generation",
                       engine={"max_batch_size": 1, "max_images_per_request": 1,
                               "max_queue_length": 1, "max_steps": 1000,
                               "min_retry_after_s": 0.2})
    # Requests long enough that the queue stays full until the test lets them go.
    long = generate_request("busy", steps=999, width=64, height=64, scheduler="ddim")
    port = server.server.metrics_port

    def refused() -> float:
        return sample(scrape(port), "atelier_generation_requests_rejected_total",
                      reason="queue_full") or 0

    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = generation_pb2_grpc.GenerationServiceStub(channel)
            # One request denoising, then one waiting: the queue (length 1) is full. The
            # second goes in once the first denoises: both at once could find the queue
            # still holding the first, and the second would be refused.
            busy = [stub.Generate.future(long, timeout=300)]
            wait_until(lambda: sample(scrape(port), "atelier_generation_active_sequences") == 1,
                       timeout=120)
            busy.append(stub.Generate.future(long, timeout=300))
            wait_until(lambda: sample(scrape(port), "atelier_generation_queue_depth") == 1
                       and sample(scrape(port), "atelier_generation_active_sequences") == 1,
                       timeout=120)
            with GenerationClient(server.target, retry=NO_RETRY) as client:
                with pytest.raises(ResourceExhausted) as full:
                    client.generate("x", steps=2, width=64, height=64)
            assert full.value.retry_delay and full.value.retry_delay >= 0.2
            patient = RetryPolicy(max_attempts=100, max_backoff_s=1.0)
            result: list = []
            with GenerationClient(server.target, retry=patient) as client:
                caller = threading.Thread(target=lambda: result.append(
                    client.generate("x", steps=2, width=64, height=64)))
                caller.start()
                wait_until(lambda: refused() >= 2, timeout=60)  # refused, and waiting
                for future in busy:
                    future.cancel()
                caller.join(120)
            assert len(result) == 1 and len(result[0].images) == 1
            assert refused() >= 2
    finally:
        server.stop()


def test_bearer_token_and_mtls(tmp_path, model_cache):
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    server = start_app(generation_app, storage={"local_root": tmp_path / "store"},
                       model_cache=model_cache, section="generation", engine={},
                       auth={"tokens": ["s3cret"]},
                       tls={"cert_file": pki.server_cert, "key_file": pki.server_key,
                            "client_ca_file": pki.ca_cert, "require_client_cert": True})
    tls = dict(ca_file=pki.ca_cert, cert_file=pki.client_cert, key_file=pki.client_key,
               server_name="localhost", retry=NO_RETRY)
    target = f"localhost:{server.server.port}"
    try:
        with GenerationClient(ConnectionOptions(target=target, token="s3cret", **tls)) as c:
            assert list(c.list_models())
        with GenerationClient(ConnectionOptions(target=target, **tls)) as c:
            with pytest.raises(Unauthenticated):
                list(c.list_models())
        no_cert = ConnectionOptions(target=target, token="s3cret", ca_file=pki.ca_cert,
                                    retry=NO_RETRY)
        with GenerationClient(no_cert) as c:
            with pytest.raises(Unavailable):
                list(c.list_models())
    finally:
        server.stop()


def test_reference_images_from_paths_and_bytes(local_services, tmp_path):
    """klein's reference images, as paths or bytes, reach the service as the same request."""
    photo = toy_photo(3)
    (tmp_path / "toy.png").write_bytes(photo)
    request = generate_request("x", reference_images=[tmp_path / "toy.png", photo])
    assert list(request.reference_images) == [photo, photo]
    with GenerationClient(local_services.targets["generation"]) as client:
        by_path = client.generate("this toy in the snow", model="tiny-klein", seed=2, steps=2,
                                  reference_images=[str(tmp_path / "toy.png")])
        by_bytes = client.generate("this toy in the snow", model="tiny-klein", seed=2, steps=2,
                                   reference_images=[photo])
    assert by_path.images[0].data == by_bytes.images[0].data
