"""Request bodies: JSON read within limits, and one typed model per route.

Every body is checked before anything is converted or sent on:

- JSON is parsed, then walked once without recursion: nesting deeper than
  ``max_json_depth`` and strings that UTF-8 cannot encode (lone surrogates
  such as ``"\\ud800"``) are 400 naming where they are.
- The walked body is validated by the route's model. JSON bodies are strict:
  ``"n": "1"``, ``"n": 1.0`` and ``"stream": "yes"`` are 400, not coerced.
  Multipart fields arrive as text, so the edit form reads digits as numbers
  (``n=2``) and nothing else.
- Every integer is bounded to its gRPC field's documented range, so nothing
  out of range reaches protobuf; zero is refused where the service would read
  it as "default".
- Unknown fields are ignored (OpenAI's SDKs and proxies add their own), and
  parameters atelier cannot honour (``tools``, ``n`` above 1 in chat) are 400.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from atelier.gateway.errors import bad_request

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
#: Largest side ``size`` may ask for; the service's own limit may be lower.
MAX_SIDE = 16384
_SIZE = re.compile(r"([0-9]+)x([0-9]+)", re.ASCII)


def parse_json(body: bytes, max_depth: int) -> dict:
    """``body`` as a JSON object, refused (400) unless it is one, nests at most
    ``max_depth`` deep and holds only encodable strings."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested past the parser's stack
        raise bad_request(f"the body must be JSON nested at most {max_depth} deep") from None
    if not isinstance(value, dict):
        raise bad_request("the body must be a JSON object")
    check_json(value, max_depth)
    return value


def check_json(value: Any, max_depth: int) -> None:
    """Refuse nesting past ``max_depth`` and strings (keys too) UTF-8 cannot encode."""
    stack: list[tuple[Any, str, int]] = [(value, "", 1)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > max_depth:
                raise bad_request(f"the body nests deeper than {max_depth} levels",
                                  where or None)
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                if isinstance(key, str):
                    _encodable(key, where or None)
                    path = f"{where}.{key}" if where else key
                else:
                    path = f"{where}[{key}]"
                stack.append((child, path, depth + 1))
        elif isinstance(item, str):
            _encodable(item, where or None)


def _encodable(text: str, where: str | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("the text holds a lone surrogate, which is not Unicode text",
                          where) from None


def validated(model: type[BaseModel], body: dict, *, form: bool = False):
    """``body`` as ``model``; a violation is a 400 whose ``param`` names it (the deepest
    one, which for a field of several shapes is the shape that came closest)."""
    try:
        return model.model_validate(body, strict=not form)
    except ValidationError as exc:
        first = max(exc.errors(), key=lambda error: len(error["loc"]))
        raise bad_request(f"{_param(first['loc']) or 'body'}: {first['msg']}",
                          _param(first["loc"])) from None


def _param(loc: tuple) -> str | None:
    """A validation error's location as an OpenAI ``param``: ``messages[0].content[1]``.
    Union members' tags (``str``, ``list[Part]``) are not part of the path."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != "str" and "[" not in part:
            out += f".{part}" if out else part
    return out or None


def parse_size(size: str | None) -> tuple[int, int] | None:
    """``WIDTHxHEIGHT`` as (width, height), or None for ``auto`` and absent; 400 for
    anything else: other characters, zero, a side not a multiple of 8, or over
    ``MAX_SIDE``."""
    if size is None or size == "auto":
        return None
    match = _SIZE.fullmatch(size.lower())
    if match is None:
        raise bad_request("size must be WIDTHxHEIGHT in ASCII digits, e.g. 512x512, or "
                          "auto", "size")
    sides = [int(v) if len(v) <= 6 else MAX_SIDE + 1 for v in match.groups()]
    if any(not 8 <= v <= MAX_SIDE or v % 8 for v in sides):
        raise bad_request(f"each side of size must be a multiple of 8 in 8..{MAX_SIDE}",
                          "size")
    return sides[0], sides[1]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class ImagesBody(_Body):
    """``POST /v1/images/generations`` (JSON), and the edit form's fields."""

    prompt: str = Field(min_length=1, max_length=32768)
    model: str | None = Field(None, max_length=512)
    n: int = Field(1, ge=1, le=INT32_MAX)
    size: str | None = Field(None, max_length=64)
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] | None = None
    # atelier's own parameters (extra_body in the OpenAI SDKs)
    seed: int | None = Field(None, ge=0, le=INT64_MAX)
    num_inference_steps: int | None = Field(None, ge=1, le=INT32_MAX)
    guidance_scale: float | None = None
    negative_prompt: str | None = Field(None, max_length=32768)
    scheduler: str | None = Field(None, max_length=64)


class EditForm(ImagesBody):
    """``POST /v1/images/edits``: the form fields besides the files."""

    strength: float | None = Field(None, ge=0.0, le=1.0)
    reference_images: bool = False
    """Send a single image as a reference image (FLUX.2 [klein]) instead of the image
    to edit; several images are always reference images."""


class ImageUrl(_Body):
    url: str
    detail: str | None = None


class ContentPart(_Body):
    """One part of a message: ``{"type": "text", "text"}`` or ``{"type": "image_url",
    "image_url": {"url"}}``."""

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | None = None

    @model_validator(mode="after")
    def _matches_type(self):
        if getattr(self, self.type) is None:
            raise ValueError(f"a {self.type} part needs its {self.type} field")
        return self


class Message(_Body):
    role: str
    content: str | list[ContentPart]


class JsonSchemaFormat(_Body):
    name: str | None = None
    schema_: dict = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema.schema")
        return self


class StreamOptions(_Body):
    include_usage: bool = False


class ChatBody(_Body):
    """``POST /v1/chat/completions``."""

    model: str | None = Field(None, max_length=512)
    messages: list[Message] = Field(min_length=1, max_length=256)
    n: Literal[1] | None = None
    tools: list | None = None
    functions: list | None = None
    response_format: ResponseFormat | None = None
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
