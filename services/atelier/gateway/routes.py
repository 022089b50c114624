"""The gateway's routes: each reads its body within limits, validates it as its model
(``bodies.py``), makes one gRPC call and answers in OpenAI's shape.

The app's state holds ``settings`` (GatewaySettings), ``backends`` (the gRPC stubs,
``app.Backends``) and ``registry`` (the Prometheus registry ``/metrics`` serves).
Image headers are checked, and masks decoded, in a worker thread, so a large
image never stalls other requests.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import UploadFile

from atelier.client.errors import from_rpc_error
from atelier.gateway import chat, images
from atelier.gateway.bodies import ChatBody, EditForm, ImagesBody, parse_json, validated
from atelier.gateway.errors import OpenAIError, bad_request, from_rpc
from atelier.v1 import analysis_pb2, generation_pb2, model_pb2

router = APIRouter()


async def _call(http: Request, method, request):
    try:
        return await method(request, metadata=_metadata(http),
                            timeout=http.app.state.backends.timeout)
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from None


def _metadata(http: Request) -> tuple[tuple[str, str], ...]:
    """What goes with each gRPC call: the caller's token and the request id (checked to
    be printable ASCII by ``edge.Edge``)."""
    token = http.headers.get("authorization")
    return (("x-request-id", http.state.request_id),
            *((("authorization", token),) if token is not None else ()))


async def _json(http: Request) -> dict:
    return parse_json(await http.body(), http.app.state.settings.gateway.max_json_depth)


@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(http: Request):
    return Response(generate_latest(http.app.state.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/v1/images/generations")
async def generations(http: Request):
    body = validated(ImagesBody, await _json(http))
    reply = await _call(http, http.app.state.backends.generation.Generate,
                        images.generate_request(body))
    return images.images_response(reply, body.response_format)


@router.post("/v1/images/edits")
async def edits(http: Request):
    section = http.app.state.settings.gateway
    if not http.headers.get("content-type", "").startswith("multipart/form-data"):
        raise bad_request("send the edit as multipart/form-data")
    form = await http.form(max_files=section.max_form_files, max_fields=section.max_form_fields,
                           max_part_size=section.max_field_bytes)
    files = [v for k, v in form.multi_items() if k in ("image", "image[]")]
    if not files or not all(isinstance(f, UploadFile) for f in files):
        raise bad_request("at least one image file is required", "image")
    mask = form.get("mask")
    if mask is not None and not isinstance(mask, UploadFile):
        raise bad_request("mask must be a file", "mask")
    fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
    body = validated(EditForm, fields, form=True)
    request = images.generate_request(body)
    if len(files) > 1 or body.reference_images:  # klein's multi-reference conditioning
        if mask is not None:
            raise bad_request("a mask goes with one image to edit, not with reference "
                              "images", "mask")
        await asyncio.to_thread(images.reference_images, request,
                                [await f.read() for f in files], section.max_image_pixels)
    else:
        await asyncio.to_thread(images.edit_images, request, await files[0].read(),
                                None if mask is None else await mask.read(),
                                section.max_image_pixels)
    reply = await _call(http, http.app.state.backends.generation.Generate, request)
    return images.images_response(reply, body.response_format)


@router.post("/v1/chat/completions")
async def completions(http: Request):
    section = http.app.state.settings.gateway
    body = validated(ChatBody, await _json(http))
    model = body.model or section.analysis_model
    if model != section.analysis_model:
        raise OpenAIError(404, f"model {model!r} does not exist; chat completions use "
                          f"{section.analysis_model!r}", type="not_found_error",
                          param="model", code="model_not_found")
    request = chat.analyze_request(body)
    for i, image in enumerate(request.images):
        await asyncio.to_thread(images.checked_image, image.data, "messages",
                                section.max_image_pixels, f"image {i + 1} of the messages")
    if not body.stream:
        reply = await _call(http, http.app.state.backends.analysis.Analyze, request)
        return chat.completion(reply, model)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return await _stream(http, request, model, include_usage)


async def _stream(http: Request, request: analysis_pb2.AnalyzeRequest, model: str,
                  include_usage: bool) -> StreamingResponse:
    backends = http.app.state.backends
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
        yield chat.chunk(chunk_id, model, {"role": "assistant", "content": ""},
                         include_usage=include_usage)
        message = first
        try:
            while True:
                if message.HasField("result"):
                    reason = chat.FINISH.get(message.result.finish_reason, "stop")
                    yield chat.chunk(chunk_id, model, {}, reason, include_usage=include_usage)
                    if include_usage:
                        yield chat.chunk(chunk_id, model, {}, usage_of=message.result)
                    break
                yield chat.chunk(chunk_id, model, {"content": message.delta},
                                 include_usage=include_usage)
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


@router.get("/v1/models")
async def models(http: Request):
    data, token = [], ""
    while True:
        page = await _call(http, http.app.state.backends.generation.ListModels,
                           generation_pb2.ListModelsRequest(page_size=500, page_token=token))
        data += [_model(m) for m in page.models]
        token = page.next_page_token
        if not token:
            break
    data.append(_analysis_model(http))
    return {"object": "list", "data": data}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, http: Request):
    if model_id == http.app.state.settings.gateway.analysis_model:
        return _analysis_model(http)
    reply = await _call(http, http.app.state.backends.generation.GetModel,
                        generation_pb2.GetModelRequest(name=images.model_name(model_id)))
    return _model(reply.model)


@router.api_route("/v1/{rest:path}", methods=["GET", "POST", "DELETE", "PUT", "PATCH"])
async def unknown(rest: str):
    raise OpenAIError(404, f"/v1/{rest} is not served by this gateway",
                      type="not_found_error", code="unknown_url")


def _analysis_model(http: Request) -> dict:
    return {"id": http.app.state.settings.gateway.analysis_model, "object": "model",
            "created": 0, "owned_by": "atelier"}


def _model(model: model_pb2.Model) -> dict:
    return {"id": model.name.removeprefix("models/"), "object": "model",
            "created": model.create_time.seconds, "owned_by": model.owner or "atelier",
            "kind": model_pb2.ModelKind.Name(model.kind).removeprefix("MODEL_KIND_").lower()}
