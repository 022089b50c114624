"""Enum arguments by short name: ``task="document"`` for ANALYSIS_TASK_DOCUMENT."""

from __future__ import annotations

from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper


def enum_value(enum: EnumTypeWrapper, value: int | str | None, prefix: str) -> int:
    """``value`` as the enum's number: a number, a full name, or the name without
    ``prefix`` in any case (``"json"``, ``"JSON"``, ``"OUTPUT_FORMAT_JSON"``).
    None is the zero value (the server's default)."""
    if value is None:
        return 0
    if isinstance(value, int):
        enum.Name(value)  # ValueError when unknown
        return value
    name = value.strip().upper().replace("-", "_")
    full = name if name.startswith(prefix) else prefix + name
    try:
        return enum.Value(full)
    except ValueError:
        choices = ", ".join(short_names(enum, prefix))
        raise ValueError(f"unknown {prefix.rstrip('_').lower()} {value!r}; "
                         f"one of: {choices}") from None


def short_names(enum: EnumTypeWrapper, prefix: str) -> list[str]:
    """The enum's names without prefix, lower case, UNSPECIFIED left out."""
    return [n.removeprefix(prefix).lower() for n in enum.keys() if not n.endswith("UNSPECIFIED")]


def short_name(enum: EnumTypeWrapper, number: int, prefix: str) -> str:
    return enum.Name(number).removeprefix(prefix).lower()
