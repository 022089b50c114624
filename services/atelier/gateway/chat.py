"""``/v1/chat/completions`` <-> AnalyzeRequest / AnalyzeResponse and AnalyzeStream.

One question per call, as the analysis service answers: the system (or
developer) messages and the user messages' text parts make the instruction,
and the user messages' ``image_url`` parts (``data:`` URLs; the gateway fetches
nothing) the images, none or more: text alone is a question too. Earlier
assistant turns are refused rather than silently dropped. ``response_format``
``json_schema`` is atelier's guaranteed-JSON path (grammar-constrained decoding,
then schema validation); ``json_object`` asks
for any JSON. ``max_completion_tokens`` (or ``max_tokens``), ``temperature``,
``top_p`` and ``seed`` go to the decoding parameters. A JSON answer is never cut
off mid-value: past the token limit it closes in a few more tokens, so
``completion_tokens`` may exceed the limit, and ``finish_reason`` is then
``length``.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from typing import Any

from atelier.gateway.bodies import ChatBody, Message, ResponseFormat
from atelier.gateway.errors import bad_request
from atelier.v1 import analysis_pb2, common_pb2

FINISH = {analysis_pb2.FINISH_REASON_STOP: "stop", analysis_pb2.FINISH_REASON_LENGTH: "length"}


def analyze_request(body: ChatBody) -> analysis_pb2.AnalyzeRequest:
    """The AnalyzeRequest of a validated chat body. Text alone is a question too."""
    if body.tools or body.functions:
        raise bad_request("tools are not supported", "tools")
    system, user, images = [], [], []
    for i, message in enumerate(body.messages):
        if message.role in ("system", "developer"):
            system += [text for kind, text in _parts(message, i) if kind == "text"]
        elif message.role == "user":
            for kind, value in _parts(message, i):
                (user if kind == "text" else images).append(value)
        else:
            raise bad_request(f"role {message.role!r} is not supported: each call is one "
                              "question (system and user messages)", f"messages[{i}].role")
    request = analysis_pb2.AnalyzeRequest(
        instruction="\n\n".join([*system, "\n".join(user)]).strip(),
        task=analysis_pb2.ANALYSIS_TASK_GENERAL,
        images=[common_pb2.ImageInput(data=data) for data in images])
    _response_format(body.response_format, request)
    decoding = request.decoding
    limit = body.max_completion_tokens or body.max_tokens
    if limit is not None:
        decoding.max_new_tokens = limit
    if body.temperature is not None:
        decoding.temperature = body.temperature
    if body.top_p is not None:
        decoding.top_p = body.top_p
    if body.seed is not None:
        decoding.seed = body.seed
    return request


def _parts(message: Message, index: int) -> list[tuple[str, Any]]:
    if isinstance(message.content, str):
        return [("text", message.content)]
    out = []
    for j, part in enumerate(message.content):
        if part.type == "text":
            out.append(("text", part.text))
        else:
            out.append(("image", _data_url(part.image_url.url,
                                           f"messages[{index}].content[{j}]")))
    return out


def _data_url(url: str, where: str) -> bytes:
    if not url.startswith("data:") or ";base64," not in url:
        raise bad_request("image_url.url must be a data: URL with base64 content (the "
                          "gateway fetches no URLs)", f"{where}.image_url.url")
    try:
        return base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("image_url.url is not valid base64", f"{where}.image_url.url") from None


def _response_format(value: ResponseFormat | None,
                     request: analysis_pb2.AnalyzeRequest) -> None:
    if value is None:
        return
    if value.type == "text":
        request.output_format = analysis_pb2.OUTPUT_FORMAT_TEXT
    elif value.type == "json_object":
        request.output_format = analysis_pb2.OUTPUT_FORMAT_JSON
    else:
        request.output_format = analysis_pb2.OUTPUT_FORMAT_JSON
        request.json_schema = json.dumps(value.json_schema.schema_)


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def usage(reply: analysis_pb2.AnalyzeResponse) -> dict:
    prompt, completion = reply.usage.prompt_tokens, reply.usage.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def completion(reply: analysis_pb2.AnalyzeResponse, model: str) -> dict:
    return {"id": completion_id(), "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "finish_reason": FINISH.get(reply.finish_reason, "stop"),
                         "message": {"role": "assistant", "content": reply.text}}],
            "usage": usage(reply)}


def chunk(chunk_id: str, model: str, delta: dict, finish: str | None = None, *,
          include_usage: bool = False,
          usage_of: analysis_pb2.AnalyzeResponse | None = None) -> str:
    """One server-sent event of a streamed completion. With ``include_usage`` every chunk
    carries ``usage``: null, and the last (``usage_of``) the counts."""
    body: dict[str, Any] = {"id": chunk_id, "object": "chat.completion.chunk",
                            "created": int(time.time()), "model": model}
    if usage_of is not None:
        body["choices"] = []
        body["usage"] = usage(usage_of)
    else:
        body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
        if include_usage:
            body["usage"] = None
    return f"data: {json.dumps(body)}\n\n"
