"""The one request check every RPC gets, driven by the message descriptors.

Before a handler sees a request, the kit's interceptor walks it and refuses,
with one field violation per bad field (dotted paths such as
``spec.lora.alpha`` or ``video.frames.frames[2].timestamp_seconds``):

- floats and doubles that are NaN or infinite: no field of the API gives them
  a meaning, and letting one through fails a job late with a meaningless
  reason, or crashes arithmetic;
- enum numbers the schema does not define: proto3 enums are open, so an
  unknown number (``method=999``) parses and would otherwise be stored and
  acted on as a default.

Service-specific ranges stay in each service's validation; this is the part
that is the same for every message. Echoed text is cut by :func:`echo`, so an
error message never repeats an unbounded input.
"""

from __future__ import annotations

import math

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from atelier.kit.errors import FieldViolation, InvalidArgument

#: Most violations reported for one request; the rest are summarised in one line.
MAX_VIOLATIONS = 32
#: Longest echoed value in an error message, in characters.
MAX_ECHO_CHARS = 64

_FLOATS = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)


def echo(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """``repr`` of a value for an error message, cut to ``limit`` characters."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(str(value))} characters)"


def request_violations(message: Message) -> list[FieldViolation]:
    """Every non-finite float and unknown enum value in ``message``, with field paths."""
    bad: list[FieldViolation] = []
    _walk(message, "", bad)
    return bad


def check_request(message: Message) -> None:
    """Raise InvalidArgument listing the violations :func:`request_violations` finds."""
    bad = request_violations(message)
    if not bad:
        return
    if len(bad) > MAX_VIOLATIONS:
        extra = len(bad) - MAX_VIOLATIONS
        bad = [*bad[:MAX_VIOLATIONS], FieldViolation("request", f"and {extra} more violations")]
    raise InvalidArgument(bad)


def _walk(message: Message, prefix: str, bad: list[FieldViolation]) -> None:
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for key, item in value.items():
                _check_value(value_field, item, f"{path}[{key!r}]", bad)
            continue
        if field.is_repeated:
            for i, item in enumerate(value):
                _check_value(field, item, f"{path}[{i}]", bad)
        else:
            _check_value(field, value, path, bad)


def _check_value(field: FieldDescriptor, value, path: str, bad: list[FieldViolation]) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        _walk(value, path + ".", bad)
    elif field.type in _FLOATS:
        if not math.isfinite(value):
            bad.append(FieldViolation(path, "must be a finite number"))
    elif field.type == FieldDescriptor.TYPE_ENUM:
        if field.enum_type.values_by_number.get(value) is None:
            bad.append(FieldViolation(
                path, f"{value} is not a value of {field.enum_type.full_name}"))
