"""The gateway's ASGI app (FastAPI on uvicorn) and its console script, ``atelier-gateway``.

Endpoints: ``POST /v1/images/generations``, ``POST /v1/images/edits``
(multipart), ``POST /v1/chat/completions`` (``stream: true`` for server-sent
events), ``GET /v1/models`` and ``GET /v1/models/{id}``; ``GET /healthz``
(liveness: the process answers) and ``GET /metrics`` (Prometheus).

The caller's ``Authorization: Bearer`` header and ``x-request-id`` go with each
gRPC call, so the services authenticate and log the caller, not the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import ValidationError

from atelier.client.errors import AtelierRpcError, from_rpc_error
from atelier.gateway import chat, images
from atelier.gateway.config import GatewaySettings
from atelier.gateway.errors import OpenAIError, bad_request, from_rpc
from atelier.kit.structured_logging import configure_logging
from atelier.v1 import (
    analysis_pb2,
    analysis_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    model_pb2,
)

log = logging.getLogger("atelier.gateway")
_PASSED_HEADERS = ("authorization", "x-request-id")


class Backends:
    """The gRPC channels and stubs of the services the gateway calls."""

    def __init__(self, settings: GatewaySettings) -> None:
        section = settings.gateway
        options = [("grpc.max_receive_message_length", section.max_request_bytes * 2),
                   ("grpc.max_send_message_length", section.max_request_bytes * 2),
                   ("grpc.lb_policy_name", "round_robin")]
        if section.tls_ca_file is not None:
            credentials = grpc.ssl_channel_credentials(section.tls_ca_file.read_bytes())
            make = lambda target: grpc.aio.secure_channel(target, credentials, options)  # noqa: E731
        else:
            make = lambda target: grpc.aio.insecure_channel(target, options)  # noqa: E731
        self.channels = [make(section.generation_target), make(section.analysis_target)]
        self.generation = generation_pb2_grpc.GenerationServiceStub(self.channels[0])
        self.analysis = analysis_pb2_grpc.AnalysisServiceStub(self.channels[1])
        self.timeout = section.request_timeout_s

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


def create_app(settings: GatewaySettings) -> FastAPI:
    backends: Backends | None = None
    registry = CollectorRegistry()
    requests = Counter("atelier_gateway_requests", "HTTP requests answered, by route and "
                       "status", ["route", "status"], registry=registry)
    seconds = Histogram("atelier_gateway_request_seconds", "Time to answer (streams: to the "
                        "first byte), by route", ["route"], registry=registry,
                        buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        nonlocal backends
        backends = Backends(settings)
        yield
        await backends.close()

    app = FastAPI(title="atelier OpenAI-compatible gateway", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    analysis_model = settings.gateway.analysis_model

    @app.middleware("http")
    async def observe(request: Request, call_next):
        started = time.perf_counter()
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.gateway.max_request_bytes:
            response = OpenAIError(413, f"the body is larger than "
                                   f"{settings.gateway.max_request_bytes} bytes").response()
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "other")
        requests.labels(name, str(response.status_code)).inc()
        seconds.labels(name).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(AtelierRpcError)
    async def rpc_error(_: Request, exc: AtelierRpcError):
        return from_rpc(exc).response()

    @app.exception_handler(Exception)
    async def failure(http: Request, exc: Exception):
        log.exception("gateway request failed", extra={"path": http.url.path})
        return OpenAIError(500, "the gateway failed; see its log", type="server_error",
                           code="internal_error").response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        return bad_request(str(first.get("msg", "invalid request")),
                           ".".join(str(p) for p in first.get("loc", ())[1:]) or None).response()

    async def call(method, request, http: Request):
        try:
            return await method(request, metadata=_metadata(http), timeout=backends.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/images/generations")
    async def generations(http: Request):
        request, response_format = images.generate_request(await _json(http))
        reply = await call(backends.generation.Generate, request, http)
        return images.images_response(reply, response_format)

    @app.post("/v1/images/edits")
    async def edits(http: Request):
        if not http.headers.get("content-type", "").startswith("multipart/form-data"):
            raise bad_request("send the edit as multipart/form-data")
        form = await http.form()
        files = [v for k, v in form.multi_items() if k in ("image", "image[]")]
        if len(files) != 1 or isinstance(files[0], str):
            raise bad_request("exactly one image file is required", "image")
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        request, response_format = images.generate_request(fields, edit=True)
        mask = form.get("mask")
        if mask is not None and isinstance(mask, str):
            raise bad_request("mask must be a file", "mask")
        images.edit_images(request, await files[0].read(),
                           None if mask is None else await mask.read())
        reply = await call(backends.generation.Generate, request, http)
        return images.images_response(reply, response_format)

    @app.post("/v1/chat/completions")
    async def completions(http: Request):
        body = await _json(http)
        model = body.get("model") or analysis_model
        if model != analysis_model:
            raise OpenAIError(404, f"model {model!r} does not exist; chat completions use "
                              f"{analysis_model!r}", type="not_found_error",
                              param="model", code="model_not_found")
        request = chat.analyze_request(body)
        if not body.get("stream"):
            reply = await call(backends.analysis.Analyze, request, http)
            return chat.completion(reply, model)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await _stream(http, request, model, include_usage)

    async def _stream(http: Request, request, model: str, include_usage: bool):
        stream = backends.analysis.AnalyzeStream(
            analysis_pb2.AnalyzeStreamRequest(request=request), metadata=_metadata(http),
            timeout=backends.timeout)
        iterator = stream.__aiter__()
        try:  # the first message decides between an HTTP error and a stream
            first = await iterator.__anext__()
        except StopAsyncIteration:
            raise OpenAIError(502, "the analysis stream ended without an answer",
                              type="server_error") from None
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

        async def events() -> AsyncIterator[str]:
            chunk_id = chat.completion_id()
            yield chat.chunk(chunk_id, model, {"role": "assistant", "content": ""})
            message = first
            try:
                while True:
                    if message.HasField("result"):
                        reason = chat.FINISH.get(message.result.finish_reason, "stop")
                        yield chat.chunk(chunk_id, model, {}, reason)
                        if include_usage:
                            yield chat.chunk(chunk_id, model, {}, usage_of=message.result)
                        break
                    yield chat.chunk(chunk_id, model, {"content": message.delta})
                    message = await iterator.__anext__()
            except grpc.RpcError as exc:
                yield f"data: {json.dumps(from_rpc(from_rpc_error(exc)).body())}\n\n"
            except StopAsyncIteration:
                pass
            finally:
                stream.cancel()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    @app.get("/v1/models")
    async def models(http: Request):
        data, token = [], ""
        while True:
            page = await call(backends.generation.ListModels,
                              generation_pb2.ListModelsRequest(page_size=500, page_token=token),
                              http)
            data += [_model(m) for m in page.models]
            token = page.next_page_token
            if not token:
                break
        data.append({"id": analysis_model, "object": "model", "created": 0,
                     "owned_by": "atelier"})
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, http: Request):
        if model_id == analysis_model:
            return {"id": analysis_model, "object": "model", "created": 0,
                    "owned_by": "atelier"}
        reply = await call(backends.generation.GetModel,
                           generation_pb2.GetModelRequest(name=images.model_name(model_id)),
                           http)
        return _model(reply.model)

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST", "DELETE", "PUT", "PATCH"])
    async def unknown(rest: str):
        raise OpenAIError(404, f"/v1/{rest} is not served by this gateway",
                          type="not_found_error", code="unknown_url")

    return app


def _metadata(http: Request) -> tuple[tuple[str, str], ...]:
    """The caller's headers that go with each gRPC call (its token, its request id)."""
    return tuple((name, http.headers[name]) for name in _PASSED_HEADERS
                 if name in http.headers)


def _model(model: model_pb2.Model) -> dict:
    return {"id": model.name.removeprefix("models/"), "object": "model",
            "created": model.create_time.seconds, "owned_by": model.owner or "atelier",
            "kind": model_pb2.ModelKind.Name(model.kind).removeprefix("MODEL_KIND_").lower()}


async def _json(http: Request) -> dict:
    try:
        body = await http.json()
    except ValueError:
        raise bad_request("the body must be JSON") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    return body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="atelier-gateway", description=__doc__.split("\n")[0])
    parser.parse_args(argv)  # --help; settings come from ATELIER_* variables
    try:
        settings = GatewaySettings()
    except ValidationError as exc:
        print(f"invalid settings: {exc}")
        return 2
    configure_logging(settings.logging, "gateway")
    import uvicorn

    config = uvicorn.Config(create_app(settings), host=settings.gateway.host,
                            port=settings.gateway.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=30)
    asyncio.run(uvicorn.Server(config).serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
