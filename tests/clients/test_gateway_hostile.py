"""The gateway as a hostile client tries it, over real HTTP in front of the real services:
every bad request is a 4xx in OpenAI's shape, never a 5xx; bodies stop at the limit
whatever the transfer encoding; memory stays bounded; image headers are checked
before anything decodes. Table-driven cases (each found by probing) and
property-based bodies (hypothesis)."""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import socket
import struct
import threading
import zlib
from urllib.parse import urlsplit

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from prometheus_client import CollectorRegistry

from atelier.dev.demo_assets import toy_photo
from atelier.gateway.app import create_app
from atelier.gateway.config import GatewaySettings
from atelier.gateway.edge import Edge
from tests.clients.test_openai_gateway import start_gateway, stop

LIMIT = 1024 * 1024  # the gateway's body limit here, bytes
MAX_PIXELS = 1024 * 1024


@pytest.fixture(scope="module")
def gateway(local_services):
    proc, base = start_gateway(local_services.targets["generation"],
                               local_services.targets["analysis"],
                               env={"ATELIER_GATEWAY__MAX_REQUEST_BYTES": str(LIMIT),
                                    "ATELIER_GATEWAY__MAX_IMAGE_PIXELS": str(MAX_PIXELS)})
    yield {"proc": proc, "base": base, "port": urlsplit(base).port}
    stop(proc)


def send(gateway, method: str, path: str, body: bytes | None = None,
         headers: dict | None = None) -> tuple[int, dict, dict]:
    """One request on a fresh connection: (status, headers, JSON body)."""
    connection = http.client.HTTPConnection("127.0.0.1", gateway["port"], timeout=60)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in {"content-type": "application/json", **(headers or {})}.items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("content-length", str(len(body)))
        try:
            connection.endheaders(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the body was all sent (413): its answer is still there
        response = connection.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, \
            json.loads(data) if data else {}
    finally:
        connection.close()


def openai_refusal(status: int, body: dict, *, param: str | None = "") -> dict:
    """Assert a 4xx in OpenAI's error shape (naming ``param`` when given); the error."""
    assert 400 <= status < 500, (status, body)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, body
    assert error["message"] and error["type"]
    if param != "":
        assert error["param"] == param, error
    return error


def post_json(gateway, path: str, body, **kwargs):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return send(gateway, "POST", path, data, **kwargs)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


GEN = "/v1/images/generations"
CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]


def _nested(depth: int, leaf) -> object:
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize("body, param", [
    *[({"prompt": "x", "n": n}, "n") for n in (2**31, 10**12, 1e308, 2**64, 0, "1", 1.0)],
    *[({"prompt": "x", "seed": s}, "seed") for s in (2**63, 2**64, -2**63 - 1, -1)],
    *[({"prompt": "x", "num_inference_steps": s}, "num_inference_steps") for s in (2**31, 0)],
    *[({"prompt": "x", "size": s}, "size") for s in (
        "99999999999x99999999999", "64x2147483648", "0x0", "0x64", "-64x64", "63x64",
        "\uff16\uff14x\uff16\uff14", "64x64x64", 64)],
    ({"prompt": "x", "guidance_scale": "NaN"}, "guidance_scale"),
    ({"prompt": {"a": 1}}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "response_format": "file"}, "response_format"),
])
def test_images_out_of_range_or_mistyped(gateway, body, param):
    openai_refusal(*post_json(gateway, GEN, body)[::2], param=param)


@pytest.mark.parametrize("body, param", [
    *[({"messages": HI, "max_completion_tokens": v}, "max_completion_tokens")
      for v in (2**31, 10**12, 0)],
    ({"messages": HI, "max_completion_tokens": 2**31, "stream": True}, "max_completion_tokens"),
    ({"messages": HI, "max_tokens": 10**12, "stream": True}, "max_tokens"),
    *[({"messages": HI, "seed": s}, "seed") for s in (2**63, 2**64, -1)],
    *[({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                   "image_url": {"url": url}}]}]},
       "messages[0].content[0].image_url.url") for url in (5, None, [1], {"a": 1})],
    *[({"messages": HI, "stream": True, "stream_options": v}, "stream_options")
      for v in ("x", [1], 1, True)],
    ({"messages": HI, "stream": "yes"}, "stream"),
    ({"messages": HI, "temperature": 3}, "temperature"),
    ({"messages": HI, "n": 2}, "n"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
     "messages[0].content[0].type"),
    ({"messages": HI, "response_format": {"type": "json_schema"}}, "response_format"),
])
def test_chat_out_of_range_or_mistyped(gateway, body, param):
    openai_refusal(*post_json(gateway, CHAT, body)[::2], param=param)


@pytest.mark.parametrize("path, raw", [
    (GEN, b"[" * 5000),
    (GEN, b'{"prompt": ' + b'{"a": ' * 5000 + b'"x"' + b"}" * 5001),
    (CHAT, b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
    (CHAT, json.dumps({"messages": HI, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": _nested(40, {})}}}
    ).encode()),
    (GEN, b'{"prompt": "\\ud800"}'),
    (GEN, b'{"prompt": "x", "model": "\\udfff"}'),
    (CHAT, b'{"messages": [{"role": "user", "content": "a \\ud800 b"}]}'),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "\\ud800": 1}'),
    (GEN, b"not json"),
    (GEN, b"[1, 2]"),
    (GEN, b"\xff\xfe\x00"),
])
def test_nesting_and_text_that_cannot_be_encoded(gateway, path, raw):
    openai_refusal(*post_json(gateway, path, raw)[::2])


@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("POST", GEN)])
@pytest.mark.parametrize("name, value", [
    ("x-request-id", "café".encode()), ("authorization", "Bearer éé".encode()),
    ("x-request-id", b"a\tb"), ("x-request-id", b"r" * 10_000),
    ("authorization", b"Bearer " + b"t" * 10_000),
])
def test_headers_grpc_cannot_carry_are_400_not_500_or_429(gateway, method, path, name, value):
    body = json.dumps({"prompt": "x"}).encode() if method == "POST" else None
    status, _, error = send(gateway, method, path, body, headers={name: value})
    assert openai_refusal(status, error, param=name)["code"] == "invalid_header"
    assert status == 400


def test_the_request_id_comes_back(gateway):
    status, headers, _ = send(gateway, "GET", "/v1/models", headers={"x-request-id": "abc-123"})
    assert status == 200 and headers["x-request-id"] == "abc-123"
    status, headers, _ = send(gateway, "GET", "/v1/models")
    assert status == 200 and len(headers["x-request-id"]) == 32
    status, headers, _ = post_json(gateway, GEN, {"prompt": "x", "n": 0})
    assert status == 400 and headers["x-request-id"]


@pytest.mark.parametrize("method", ["OPTIONS", "TRACE", "PROPFIND"])
def test_other_methods_are_openai_errors(gateway, method):
    status, _, error = send(gateway, method, "/v1/models")
    assert status == 405 and openai_refusal(status, error)["code"] == "method_not_allowed"
    status, _, error = send(gateway, "GET", "/nowhere")
    assert status == 404 and openai_refusal(status, error)["code"] == "unknown_url"


def test_malformed_http_is_a_json_400(gateway):
    with socket.create_connection(("127.0.0.1", gateway["port"]), timeout=10) as sock:
        sock.sendall(b"GARBAGE / HTTP/9\r\n\x00\r\n\r\n")
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"connection: close" in head.lower()
    openai_refusal(400, json.loads(body))


# -- multipart edits ------------------------------------------------------------------------
def multipart(fields: dict[str, str] | list, files: list[tuple[str, bytes]] = (),
              boundary: str = "b0undary") -> tuple[bytes, dict]:
    out = io.BytesIO()
    items = fields.items() if isinstance(fields, dict) else fields
    for name, value in items:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                  f"{value}\r\n".encode())
    for name, data in files:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                  f'filename="{name}.png"\r\nContent-Type: image/png\r\n\r\n'.encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), {"content-type": f"multipart/form-data; boundary={boundary}"}


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header says ``width`` x ``height`` (an 8-bit grey image), with a few
    bytes of pixel data: decoding it would take width x height bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0,
                                                               0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


PHOTO = toy_photo(1, size=64)


@pytest.mark.parametrize("fields, param", [
    ({"prompt": "x", "n": "99999999999"}, "n"),
    ({"prompt": "x", "size": "99999999999x1"}, "size"),
    ({"prompt": "x", "seed": "1" * 30}, "seed"),
    ({"prompt": "x", "size": "0x0"}, "size"),
    ({"prompt": "x", "n": "1.5"}, "n"),
    ({"prompt": "x", "strength": "2"}, "strength"),
])
def test_edit_fields_out_of_range(gateway, fields, param):
    body, headers = multipart(fields, [("image", PHOTO)])
    openai_refusal(*post_json(gateway, "/v1/images/edits", body, headers=headers)[::2],
                   param=param)


@pytest.mark.parametrize("make", [
    lambda: (b"--x\r\n\r\n", {"content-type": "multipart/form-data"}),  # no boundary
    lambda: (b"\x00garbage" * 100, {"content-type": "multipart/form-data; boundary=zz"}),
    lambda: (b'--b\r\nContent-Disposition: form-data\r\n\r\nv\r\n--b--\r\n',
             {"content-type": "multipart/form-data; boundary=b"}),  # a part without a name
    lambda: multipart({"prompt": "p" * (70 * 1024)}, [("image", PHOTO)]),  # a field too long
    lambda: multipart([(f"f{i}", "v") for i in range(1001)], [("image", PHOTO)]),
    lambda: multipart({"prompt": "x"}, [("image", PHOTO)] * 1001),
    lambda: multipart({"prompt": "x"}, []),  # no image
    lambda: multipart({"prompt": "x"}, [("image", b"not an image")]),
    lambda: (b'{"prompt": "x"}', {"content-type": "application/json"}),
])
def test_malformed_multipart_is_an_openai_400(gateway, make):
    body, headers = make()
    status, _, error = post_json(gateway, "/v1/images/edits", body, headers=headers)
    assert status in (400, 413), (status, error)
    openai_refusal(status, error)


def test_image_headers_are_checked_before_decoding(gateway):
    """A 2 KB PNG that says 13000 x 13000 (169 MB decoded) is refused from its header,
    as image or mask, without the gateway's memory growing."""
    huge = png_header(13000, 13000)
    before = rss_bytes(gateway["proc"].pid)
    for files, param in (([("image", huge)], "image"),
                         ([("image", PHOTO), ("mask", huge)], "mask")):
        body, headers = multipart({"prompt": "x"}, files)
        status, _, error = post_json(gateway, "/v1/images/edits", body, headers=headers)
        assert "13000x13000" in openai_refusal(status, error, param=param)["message"]
    url = "data:image/png;base64," + base64.b64encode(huge).decode()
    status, _, error = post_json(gateway, CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}]}]})
    openai_refusal(status, error, param="messages")
    assert rss_bytes(gateway["proc"].pid) - before < 64 * 1024 * 1024


def test_health_answers_while_masks_decode(gateway):
    """Six edits with 1024 x 1024 masks at once (each decoded and converted in a worker
    thread); /healthz is answered while they are in flight."""
    mask = Image.new("RGBA", (1024, 1024), (0, 0, 0, 255))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    body, headers = multipart({"prompt": "x", "num_inference_steps": "1"},
                              [("image", PHOTO), ("mask", buffer.getvalue())])
    statuses = []

    def edit():
        statuses.append(post_json(gateway, "/v1/images/edits", body, headers=headers)[0])

    threads = [threading.Thread(target=edit) for _ in range(6)]
    for thread in threads:
        thread.start()
    answered_in_flight = 0
    while any(t.is_alive() for t in threads):
        status, _, reply = send(gateway, "GET", "/healthz")
        assert status == 200 and reply == {"status": "ok"}
        answered_in_flight += any(t.is_alive() for t in threads)
    assert answered_in_flight >= 1
    # The service refuses a mask whose size differs from the image's: a 400, never 5xx.
    assert statuses and all(400 <= s < 500 for s in statuses), statuses


# -- bodies over the limit ------------------------------------------------------------------
def send_chunked(gateway, path: str, total: int, headers: dict, head: bytes = b"",
                 piece: int = 256 * 1024) -> int | None:
    """POST ``total`` bytes chunked (no Content-Length); the status, or None when the
    gateway closed the connection before an answer could be read."""
    with socket.create_connection(("127.0.0.1", gateway["port"]), timeout=30) as sock:
        lines = [f"POST {path} HTTP/1.1", "host: 127.0.0.1", "transfer-encoding: chunked",
                 *[f"{k}: {v}" for k, v in headers.items()]]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sent, filler = 0, head + b" " * piece
        try:
            while sent < total:
                data = filler[:min(piece, total - sent)]
                filler = b" " * piece
                sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))
                sent += len(data)
            sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            reply = sock.recv(4096)
        except ConnectionResetError:
            return None
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1") else None


def test_chunked_bodies_stop_at_the_limit_with_bounded_memory(gateway):
    pid = gateway["proc"].pid
    before = rss_bytes(pid)
    for path, total, headers, head in (
            (GEN, LIMIT + 1024 * 1024, {"content-type": "application/json"}, b'{"prompt": "'),
            (CHAT, 64 * LIMIT, {"content-type": "application/json"}, b'{"messages": "'),
            ("/v1/images/edits", LIMIT + 1024 * 1024,
             {"content-type": "multipart/form-data; boundary=b0undary"},
             b'--b0undary\r\nContent-Disposition: form-data; name="image"; '
             b'filename="a.png"\r\n\r\n')):
        assert send_chunked(gateway, path, total, headers, head) in (413, None)
    # 66 MiB were offered; the gateway read at most its 1 MiB limit of each.
    assert rss_bytes(pid) - before < 32 * 1024 * 1024
    status, _, error = post_json(gateway, GEN, b" " * (LIMIT + 1))  # declared length
    assert status == 413 and openai_refusal(status, error)["code"] == "request_too_large"
    status, _, _ = send(gateway, "GET", "/healthz")
    assert status == 200


# -- properties -----------------------------------------------------------------------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=12)
IMAGE_FIELDS = ["prompt", "model", "n", "size", "response_format", "output_format", "seed",
                "num_inference_steps", "guidance_scale", "negative_prompt", "scheduler"]
CHAT_FIELDS = ["model", "messages", "n", "tools", "response_format", "max_completion_tokens",
               "max_tokens", "temperature", "top_p", "seed", "stream", "stream_options"]


def answered(status: int, body: dict) -> None:
    """A property's outcome: a 2xx, or a 4xx in OpenAI's shape; never a 5xx."""
    assert status < 500, (status, body)
    if status >= 400:
        openai_refusal(status, body)


@settings(max_examples=40, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(IMAGE_FIELDS), value=JSON_VALUES)
def test_any_value_in_any_images_field(gateway, field, value):
    body = {"prompt": "a fox", "model": "tiny-sd", "size": "64x64",
            "num_inference_steps": 1, field: value}
    status, _, reply = post_json(gateway, GEN, body)
    answered(status, reply)


@settings(max_examples=40, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(CHAT_FIELDS), value=JSON_VALUES)
def test_any_value_in_any_chat_field(gateway, field, value):
    body = {"messages": HI, "max_completion_tokens": 2, field: value}
    if body.get("stream") is True:
        status, _, reply = _streamed(gateway, body)
    else:
        status, _, reply = send(gateway, "POST", CHAT, json.dumps(body).encode())
    answered(status, reply)


def _streamed(gateway, body) -> tuple[int, dict, dict]:
    with httpx.stream("POST", gateway["base"] + CHAT, json=body, timeout=60) as response:
        text = response.read().decode()
    return response.status_code, {}, json.loads(text) if response.status_code >= 400 else {}


@settings(max_examples=30, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=256), path=st.sampled_from([GEN, CHAT]))
def test_any_bytes_as_a_body(gateway, raw, path):
    status, _, reply = post_json(gateway, path, raw)
    answered(status, reply)


# -- the outer layer, in process ------------------------------------------------------------
async def _asgi(app, method: str, path: str, headers: dict) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gateway") as client:
        return await client.request(method, path, headers=headers)


def test_an_unexpected_failure_is_a_counted_500_that_closes_the_connection():
    async def broken(scope, receive, send):
        raise RuntimeError("a bug")

    registry = CollectorRegistry()
    edge = Edge(broken, max_request_bytes=LIMIT, max_header_bytes=1024, registry=registry)
    response = asyncio.run(_asgi(edge, "GET", "/v1/models", {"x-request-id": "r-1"}))
    assert response.status_code == 500 and response.headers["connection"] == "close"
    assert response.json()["error"]["code"] == "internal_error"
    assert "r-1" in response.json()["error"]["message"]
    assert response.headers["x-request-id"] == "r-1"
    assert registry.get_sample_value("atelier_gateway_requests_total",
                                     {"route": "other", "status": "500"}) == 1


def test_cors_only_for_the_origins_set():
    origin = "https://app.example.com"
    preflight = {"origin": origin, "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization, content-type"}
    for origins, allowed in (([], False), ([origin], True)):
        app = create_app(GatewaySettings(gateway={"cors_allow_origins": origins}))
        response = asyncio.run(_asgi(app, "OPTIONS", CHAT, preflight))
        health = asyncio.run(_asgi(app, "GET", "/healthz", {"origin": origin}))
        if allowed:
            assert response.status_code == 200
            assert response.headers["access-control-allow-origin"] == origin
            assert health.headers["access-control-allow-origin"] == origin
            assert "x-request-id" in health.headers["access-control-expose-headers"]
        else:
            assert response.status_code == 405 and "error" in response.json()
            assert "access-control-allow-origin" not in health.headers


def test_metrics_count_refusals(gateway):
    scraped = httpx.get(gateway["base"] + "/metrics", timeout=10).text
    assert sample_of(scraped, 'atelier_gateway_requests_total{route="/v1/images/generations",'
                              'status="400"}') >= 1
    assert sample_of(scraped, 'atelier_gateway_requests_total{route="other",'
                              'status="400"}') >= 1


def sample_of(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0

