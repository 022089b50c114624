"""Failures in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``.

A gRPC status from a service becomes the HTTP status that means the same, and
its first field violation names the OpenAI parameter (``num_images`` -> ``n``).
RESOURCE_EXHAUSTED keeps the service's retry hint as ``retry-after`` (and
``retry-after-ms``), which OpenAI SDKs honour when they retry a 429.
"""

from __future__ import annotations

import math

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from atelier.client.errors import AtelierRpcError

#: gRPC status -> (HTTP status, OpenAI error type).
HTTP_OF_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.ABORTED: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}

#: Request fields of the services -> the OpenAI parameters they come from.
PARAM_OF_FIELD = {
    "num_images": "n", "width": "size", "height": "size", "init_image": "image",
    "mask_image": "mask", "images": "messages", "instruction": "messages",
    "decoding.max_new_tokens": "max_completion_tokens", "decoding.temperature": "temperature",
    "decoding.top_p": "top_p", "decoding.seed": "seed", "json_schema": "response_format",
}


class OpenAIError(Exception):
    """A failure to answer in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code="invalid_value" if param else None)


def from_rpc(error: AtelierRpcError) -> OpenAIError:
    status, kind = HTTP_OF_CODE.get(error.code, (500, "server_error"))
    param = None
    message = error.message
    if error.field_violations:
        first = error.field_violations[0]
        field = first.field.removeprefix("request.")
        param = PARAM_OF_FIELD.get(field, field)
        message = "; ".join(f"{v.field}: {v.description}" for v in error.field_violations)
    headers = {}
    if error.retry_delay is not None:
        headers = {"retry-after": str(max(1, math.ceil(error.retry_delay))),
                   "retry-after-ms": str(int(error.retry_delay * 1000))}
    if status == 500:
        message = "the service failed; quote request id " + (error.request_id or "(none)")
    code = error.code.name.lower()
    if error.code is grpc.StatusCode.NOT_FOUND and error.resource and \
            error.resource[0] == "model":
        code = "model_not_found"
    return OpenAIError(status, message, type=kind, param=param, code=code, headers=headers)


#: Framework refusals (unknown path, wrong method, malformed multipart) -> OpenAI codes.
CODE_OF_HTTP = {400: "invalid_value", 404: "unknown_url", 405: "method_not_allowed",
                413: "request_too_large"}


def install_handlers(app: FastAPI) -> None:
    """Answer every refusal, the framework's too, in OpenAI's shape."""

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(AtelierRpcError)
    async def rpc_error(_: Request, exc: AtelierRpcError):
        return from_rpc(exc).response()

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return OpenAIError(exc.status_code, str(exc.detail), type=kind,
                           code=CODE_OF_HTTP.get(exc.status_code),
                           headers=dict(exc.headers or {})).response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        return bad_request(str(first.get("msg", "invalid request")),
                           ".".join(str(p) for p in first.get("loc", ())[1:]) or None
                           ).response()
