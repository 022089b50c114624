"""The OpenAI-compatible gateway, driven by the official ``openai`` SDK (nobody here wrote
it, so what it expects is the spec), in front of the real services on loopback.

Each answer is also checked against the gRPC call the gateway should have made:
the gateway adds nothing and loses nothing."""

from __future__ import annotations

import base64
import io
import json
import urllib.request

import grpc
import jsonschema
import openai
import pytest
from PIL import Image

from atelier.dev import local_stack
from atelier.dev.demo_assets import DOCUMENT_SCHEMA, document_page, toy_photo
from atelier.v1 import (
    analysis_pb2,
    analysis_pb2_grpc,
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
)
from tests.conftest import free_port


def start_gateway(generation: str, analysis: str, env: dict[str, str] | None = None):
    """The gateway as ``make up`` starts it, on a free loopback port; (process, base URL)."""
    port = free_port()
    proc = local_stack.start_gateway(port, generation, analysis, log_level="WARNING", env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        local_stack.wait_http(base + "/healthz", proc)
    except Exception:
        stop(proc)
        raise
    return proc, base


def stop(proc) -> None:
    """SIGTERM: uvicorn drains, then ends by the signal (as it re-raises it) or with 0."""
    assert local_stack.stop({"gateway": proc}, timeout=30)["gateway"] in (0, -15)


@pytest.fixture(scope="module")
def gateway(local_services):
    proc, base = start_gateway(local_services.targets["generation"],
                               local_services.targets["analysis"])
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    channels = {name: grpc.insecure_channel(local_services.targets[name])
                for name in ("generation", "analysis")}
    yield {"client": client, "base": base, "proc": proc,
           "generation": generation_pb2_grpc.GenerationServiceStub(channels["generation"]),
           "analysis": analysis_pb2_grpc.AnalysisServiceStub(channels["analysis"])}
    for channel in channels.values():
        channel.close()
    stop(proc)


def _png(data: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(data)))
    image.load()
    return image


def test_generation_is_the_generate_call(gateway):
    result = gateway["client"].images.generate(
        model="tiny-sd", prompt="a red fox in the snow", n=2, size="64x80",
        response_format="b64_json",
        extra_body={"seed": 11, "num_inference_steps": 3, "guidance_scale": 6.0,
                    "negative_prompt": "blurry", "scheduler": "euler"})
    assert len(result.data) == 2 and result.size == "64x80"
    assert all(_png(item.b64_json).size == (64, 80) for item in result.data)
    direct = gateway["generation"].Generate(generation_pb2.GenerateRequest(
        model="models/tiny-sd", prompt="a red fox in the snow", num_images=2, width=64,
        height=80, seed=11, num_inference_steps=3, guidance_scale=6.0,
        negative_prompt="blurry", scheduler="euler"), timeout=120)
    assert [base64.b64decode(item.b64_json) for item in result.data] == \
        [image.data for image in direct.images]


def test_edits_with_several_images_are_klein_reference_images(gateway):
    client, stub = gateway["client"], gateway["generation"]
    photos = [toy_photo(1, size=64), toy_photo(2, size=80)]
    placed = client.images.edit(
        image=[("a.png", photos[0], "image/png"), ("b.png", photos[1], "image/png")],
        prompt="this toy on a beach", model="tiny-klein",
        extra_body={"seed": 5, "num_inference_steps": 2})
    direct = stub.Generate(generation_pb2.GenerateRequest(
        model="models/tiny-klein", prompt="this toy on a beach", reference_images=photos,
        seed=5, num_inference_steps=2), timeout=120)
    assert base64.b64decode(placed.data[0].b64_json) == direct.images[0].data
    one = client.images.edit(image=("a.png", photos[0], "image/png"), prompt="this toy",
                             model="tiny-klein",
                             extra_body={"seed": 5, "num_inference_steps": 2,
                                         "reference_images": "true"})
    alone = stub.Generate(generation_pb2.GenerateRequest(
        model="models/tiny-klein", prompt="this toy", reference_images=photos[:1], seed=5,
        num_inference_steps=2), timeout=120)
    assert base64.b64decode(one.data[0].b64_json) == alone.images[0].data
    with pytest.raises(openai.BadRequestError) as caught:  # a mask edits one image
        client.images.edit(image=[("a.png", photos[0], "image/png"),
                                  ("b.png", photos[1], "image/png")],
                           mask=("m.png", photos[0], "image/png"), prompt="x",
                           model="tiny-klein")
    assert caught.value.body["param"] == "mask"


def test_edits_are_image_to_image_and_inpainting(gateway):
    client, stub = gateway["client"], gateway["generation"]
    photo = toy_photo(1, size=64)
    varied = client.images.edit(image=("toy.png", photo, "image/png"), prompt="a blue toy",
                                model="tiny-sd",
                                extra_body={"seed": 5, "num_inference_steps": 4,
                                            "strength": 0.5})
    direct = stub.Generate(generation_pb2.GenerateRequest(
        model="models/tiny-sd", prompt="a blue toy", init_image=photo, seed=5,
        num_inference_steps=4, strength=0.5), timeout=120)
    assert base64.b64decode(varied.data[0].b64_json) == direct.images[0].data

    # OpenAI's mask: transparent pixels are the ones to repaint (the left half here).
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    painted = client.images.edit(image=("toy.png", photo, "image/png"),
                                 mask=("mask.png", buffer.getvalue(), "image/png"),
                                 prompt="a hat", model="tiny-sd",
                                 extra_body={"seed": 5, "num_inference_steps": 4})
    white_left = Image.new("L", (64, 64), 0)
    white_left.paste(255, (0, 0, 32, 64))
    buffer = io.BytesIO()
    white_left.save(buffer, format="PNG")
    direct = stub.Generate(generation_pb2.GenerateRequest(
        model="models/tiny-sd", prompt="a hat", init_image=photo,
        mask_image=buffer.getvalue(), seed=5, num_inference_steps=4), timeout=120)
    assert base64.b64decode(painted.data[0].b64_json) == direct.images[0].data


def _image_message(text: str, png: bytes) -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def test_chat_with_an_image_and_usage(gateway):
    messages = _image_message("What is shown?", toy_photo(0))
    reply = gateway["client"].chat.completions.create(
        model="qwen3-vl", messages=messages, max_completion_tokens=6, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    direct = gateway["analysis"].Analyze(analysis_pb2.AnalyzeRequest(
        images=[common_pb2.ImageInput(data=toy_photo(0))],
        instruction="Answer briefly.\n\nWhat is shown?", task=analysis_pb2.ANALYSIS_TASK_GENERAL,
        decoding=analysis_pb2.DecodingParams(max_new_tokens=6)), timeout=120)
    assert choice.message.content == direct.text
    assert reply.usage.prompt_tokens == direct.usage.prompt_tokens > 0
    assert reply.usage.completion_tokens == direct.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_text_alone_is_a_question(gateway):
    reply = gateway["client"].chat.completions.create(
        model="qwen3-vl", messages=[{"role": "user", "content": "hello"}],
        max_completion_tokens=5)
    direct = gateway["analysis"].Analyze(analysis_pb2.AnalyzeRequest(
        instruction="hello", task=analysis_pb2.ANALYSIS_TASK_GENERAL,
        decoding=analysis_pb2.DecodingParams(max_new_tokens=5)), timeout=120)
    assert reply.choices[0].message.content == direct.text
    assert reply.usage.completion_tokens == direct.usage.completion_tokens > 0
    assert reply._request_id  # the SDK reads the response's x-request-id


def test_json_past_the_token_limit_says_length(gateway):
    """A JSON answer closes past max_completion_tokens rather than break; when it does,
    finish_reason says so."""
    over = []
    for limit in (2, 4, 8):
        reply = gateway["client"].chat.completions.create(
            model="qwen3-vl", messages=_image_message("Extract the fields.", document_page()),
            max_completion_tokens=limit,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "document", "schema": DOCUMENT_SCHEMA}})
        jsonschema.validate(json.loads(reply.choices[0].message.content), DOCUMENT_SCHEMA)
        if reply.usage.completion_tokens > limit:
            over.append(limit)
            assert reply.choices[0].finish_reason == "length"
    assert over, "no answer ran past its limit: the case above was not exercised"


def test_json_schema_answers_are_valid(gateway):
    reply = gateway["client"].chat.completions.create(
        model="qwen3-vl", messages=_image_message("Extract the fields.", document_page()),
        max_completion_tokens=96,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "document", "schema": DOCUMENT_SCHEMA,
                                         "strict": True}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), DOCUMENT_SCHEMA)


def test_streaming_is_the_same_answer_in_pieces(gateway):
    client = gateway["client"]
    messages = _image_message("Describe it.", toy_photo(2))
    whole = client.chat.completions.create(model="qwen3-vl", messages=messages,
                                           max_completion_tokens=8)
    chunks = list(client.chat.completions.create(
        model="qwen3-vl", messages=messages, max_completion_tokens=8, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2
    # The service's final answer is the streamed text without its outer whitespace.
    assert text.strip() == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices
              and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # With include_usage, every chunk but the last carries "usage": null, as OpenAI's do.
    request = urllib.request.Request(
        gateway["base"] + "/v1/chat/completions", method="POST",
        headers={"content-type": "application/json"},
        data=json.dumps({"model": "qwen3-vl", "messages": messages, "stream": True,
                         "max_completion_tokens": 8,
                         "stream_options": {"include_usage": True}}).encode())
    events = [json.loads(line.removeprefix("data: "))
              for line in urllib.request.urlopen(request, timeout=120).read().decode()
              .splitlines() if line.startswith("data: {")]
    assert all("usage" in e and e["usage"] is None for e in events[:-1])
    assert events[-1]["usage"]["completion_tokens"] == whole.usage.completion_tokens


def test_models_lists_generation_and_analysis_models(gateway):
    ids = [m.id for m in gateway["client"].models.list()]
    assert "tiny-sd" in ids and "qwen3-vl" in ids
    assert gateway["client"].models.retrieve("tiny-sd").id == "tiny-sd"
    scraped = urllib.request.urlopen(gateway["base"] + "/metrics", timeout=5).read().decode()
    assert 'atelier_gateway_requests_total{route="/v1/models",status="200"}' in scraped


@pytest.mark.parametrize("call, status, param", [
    (lambda c: c.images.generate(model="tiny-sd", prompt="a fox", size="big"), 400, "size"),
    (lambda c: c.images.generate(model="tiny-sd", prompt="a fox", n=0), 400, "n"),
    (lambda c: c.images.generate(model="tiny-sd", prompt="a fox", size="63x64"), 400, "size"),
    (lambda c: c.images.generate(model="no-such-model", prompt="a fox"), 404, None),
    (lambda c: c.chat.completions.create(model="qwen3-vl", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/x.png"}}]}]),
     400, "messages[0].content[0].image_url.url"),
    (lambda c: c.chat.completions.create(model="qwen3-vl", messages=_image_message(
        "Extract.", document_page()), response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}),
     400, "response_format"),
    (lambda c: c.chat.completions.create(model="gpt-4o", messages=[
        {"role": "user", "content": "hi"}]), 404, "model"),
])
def test_bad_input_is_an_openai_error(gateway, call, status, param):
    with pytest.raises(openai.APIStatusError) as caught:
        call(gateway["client"])
    error = caught.value
    assert error.status_code == status
    assert error.body["message"] and error.body["type"]
    if param is not None:
        assert error.body["param"] == param


def test_a_full_queue_is_429_with_the_retry_hint():
    from atelier.client.errors import ResourceExhausted
    from atelier.gateway.errors import from_rpc

    refusal = from_rpc(ResourceExhausted(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full",
                                         retry_delay=2.5))
    assert refusal.status == 429 and refusal.headers["retry-after"] == "3"
    assert refusal.headers["retry-after-ms"] == "2500"


def test_bearer_tokens_pass_through(tmp_path, model_cache):
    from atelier.generation import app as generation_app
    from tests.kit.server_thread import start_app

    server = start_app(generation_app, storage={"local_root": tmp_path / "store"},
                       model_cache=model_cache, section="generation", engine={},
                       auth={"tokens": ["s3cret"]})
    proc, base = start_gateway(f"127.0.0.1:{server.server.port}", "127.0.0.1:9")
    try:
        allowed = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert "tiny-sd" in [m.id for m in allowed.models.list()]
        refused = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            refused.models.list()
        assert caught.value.status_code == 401
    finally:
        stop(proc)
        server.stop()
