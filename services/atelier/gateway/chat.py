"""``/v1/chat/completions`` <-> AnalyzeRequest / AnalyzeResponse and AnalyzeStream.

One question per call, as the analysis service answers: the system (or
developer) messages and the user messages' text parts make the instruction,
and the user messages' ``image_url`` parts (``data:`` URLs; the gateway fetches
nothing) the images. Earlier assistant turns are refused rather than silently
dropped. ``response_format`` ``json_schema`` is atelier's guaranteed-JSON path
(grammar-constrained decoding, then schema validation); ``json_object`` asks
for any JSON. ``max_completion_tokens`` (or ``max_tokens``), ``temperature``,
``top_p`` and ``seed`` go to the decoding parameters.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from typing import Any

from atelier.gateway.errors import bad_request
from atelier.v1 import analysis_pb2, common_pb2

FINISH = {analysis_pb2.FINISH_REASON_STOP: "stop", analysis_pb2.FINISH_REASON_LENGTH: "length"}


def analyze_request(body: dict[str, Any]) -> analysis_pb2.AnalyzeRequest:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    if body.get("n") not in (None, 1):
        raise bad_request("only n=1 is supported", "n")
    if body.get("tools") or body.get("functions"):
        raise bad_request("tools are not supported", "tools")
    system, user, images = [], [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request("each message must be an object", f"messages[{i}]")
        role = message.get("role")
        if role in ("system", "developer"):
            system += [text for kind, text in _parts(message, i) if kind == "text"]
        elif role == "user":
            for kind, value in _parts(message, i):
                (user if kind == "text" else images).append(value)
        else:
            raise bad_request(f"role {role!r} is not supported: each call is one question "
                              "(system and user messages)", f"messages[{i}].role")
    request = analysis_pb2.AnalyzeRequest(
        instruction="\n\n".join([*system, "\n".join(user)]).strip(),
        task=analysis_pb2.ANALYSIS_TASK_GENERAL,
        images=[common_pb2.ImageInput(data=data) for data in images])
    _response_format(body.get("response_format"), request)
    _decoding(body, request.decoding)
    return request


def _parts(message: dict, index: int) -> list[tuple[str, Any]]:
    content = message.get("content")
    if isinstance(content, str):
        return [("text", content)]
    if not isinstance(content, list):
        raise bad_request("content must be a string or a list of parts",
                          f"messages[{index}].content")
    out = []
    for j, part in enumerate(content):
        where = f"messages[{index}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append(("text", part["text"]))
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url", "") if isinstance(
                part.get("image_url"), dict) else ""
            out.append(("image", _data_url(url, where)))
        else:
            raise bad_request("parts must be text or image_url", where)
    return out


def _data_url(url: str, where: str) -> bytes:
    if not url.startswith("data:") or ";base64," not in url:
        raise bad_request("image_url.url must be a data: URL with base64 content (the "
                          "gateway fetches no URLs)", f"{where}.image_url.url")
    try:
        return base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("image_url.url is not valid base64", f"{where}.image_url.url") from None


def _response_format(value, request: analysis_pb2.AnalyzeRequest) -> None:
    if value is None:
        return
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        request.output_format = analysis_pb2.OUTPUT_FORMAT_TEXT
    elif kind == "json_object":
        request.output_format = analysis_pb2.OUTPUT_FORMAT_JSON
    elif kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise bad_request("json_schema.schema must be a JSON Schema object",
                              "response_format")
        request.output_format = analysis_pb2.OUTPUT_FORMAT_JSON
        request.json_schema = json.dumps(spec["schema"])
    else:
        raise bad_request("response_format.type must be text, json_object or json_schema",
                          "response_format")


def _decoding(body: dict, decoding: analysis_pb2.DecodingParams) -> None:
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    for name, value, kind in (("max_completion_tokens", limit, int),
                              ("temperature", body.get("temperature"), float),
                              ("top_p", body.get("top_p"), float),
                              ("seed", body.get("seed"), int)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                kind is int and not float(value).is_integer()):
            raise bad_request(f"{name} must be {'an integer' if kind is int else 'a number'}",
                              name)
        target = "max_new_tokens" if name == "max_completion_tokens" else name
        setattr(decoding, target, kind(value))


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


def chunk(chunk_id: str, model: str, delta: dict, finish: str | None = None,
          usage_of: analysis_pb2.AnalyzeResponse | None = None) -> str:
    """One server-sent event of a streamed completion."""
    body: dict[str, Any] = {"id": chunk_id, "object": "chat.completion.chunk",
                            "created": int(time.time()), "model": model}
    if usage_of is not None:
        body["choices"] = []
        body["usage"] = usage(usage_of)
    else:
        body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
    return f"data: {json.dumps(body)}\n\n"
