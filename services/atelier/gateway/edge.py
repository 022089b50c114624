"""The gateway's outer layer (pure ASGI): what every request passes before a route.

- **Headers** that travel to the services as gRPC metadata (``authorization``,
  ``x-request-id``) must be printable ASCII and at most ``max_header_bytes``;
  anything else is 400, never a 500 or a 429 from the channel.
- **Request id:** the caller's ``x-request-id``, or a new one, goes with each
  gRPC call and comes back as the response's ``x-request-id``.
- **Body limit:** a declared ``Content-Length`` over ``max_request_bytes`` is
  413 before anything is read; any body (chunked too) is counted as it
  arrives, and reading stops with 413 at the limit.
- **Failures:** an unexpected error is logged and answered 500 in OpenAI's
  shape with ``Connection: close``; every answer, that one too, is counted in
  ``atelier_gateway_requests_total``.
"""

from __future__ import annotations

import logging
import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Histogram

from atelier.gateway.errors import OpenAIError

log = logging.getLogger("atelier.gateway")
#: Request headers that go on to the services as gRPC metadata.
PASSED_HEADERS = (b"authorization", b"x-request-id")


class BodyTooLarge(OpenAIError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the body is larger than {limit} bytes",
                         code="request_too_large", headers={"connection": "close"})


class Edge:
    """ASGI middleware: header checks, request id, body limit, failures and metrics."""

    def __init__(self, app, *, max_request_bytes: int, max_header_bytes: int,
                 registry: CollectorRegistry) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.max_header_bytes = max_header_bytes
        self.requests = Counter("atelier_gateway_requests", "HTTP requests answered, by "
                                "route and status", ["route", "status"], registry=registry)
        self.seconds = Histogram(
            "atelier_gateway_request_seconds", "Time to answer (streams: to the first "
            "byte), by route", ["route"], registry=registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: list[int] = []
        caller_id = _header(scope, b"x-request-id")
        request_id = caller_id if caller_id is not None and \
            self._passable(caller_id.encode("latin-1")) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def answer(message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                self.seconds.labels(_route(scope)).observe(time.perf_counter() - started)
                message["headers"] = [*message.get("headers", ()),
                                      (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal.response()(scope, receive, answer)
            else:
                await self.app(scope, self._counted(receive), answer)
        except Exception:
            log.exception("gateway request failed", extra={
                "path": scope.get("path"), "request_id": request_id})
            if not status:
                failure = OpenAIError(500, f"the gateway failed; quote request id {request_id}",
                                      type="server_error", code="internal_error",
                                      headers={"connection": "close"})
                await failure.response()(scope, receive, answer)
        finally:
            self.requests.labels(_route(scope), str(status[0] if status else 500)).inc()

    def _refusal(self, scope) -> OpenAIError | None:
        """A 400 for a passed header gRPC cannot carry, a 413 for a declared length over
        the limit; else None."""
        for name, value in scope["headers"]:
            if name not in PASSED_HEADERS:
                continue
            if not self._passable(value):
                return OpenAIError(400, f"header {name.decode()} must be printable ASCII of "
                                   f"at most {self.max_header_bytes} bytes",
                                   param=name.decode(), code="invalid_header")
        length = _header(scope, b"content-length")
        if length and (not length.isdigit() or int(length) > self.max_request_bytes):
            return BodyTooLarge(self.max_request_bytes) if length.isdigit() else \
                OpenAIError(400, "content-length must be a number of bytes",
                            code="invalid_header")
        return None

    def _passable(self, value: bytes) -> bool:
        return len(value) <= self.max_header_bytes and all(0x20 <= b <= 0x7E for b in value)

    def _counted(self, receive):
        """``receive`` that stops the body at the limit (a 413 from the route)."""
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_request_bytes:
                    raise BodyTooLarge(self.max_request_bytes)
            return message
        return counted


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _route(scope) -> str:
    return getattr(scope.get("route"), "path", "other")
