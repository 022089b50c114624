"""Which JSON schemas constrained decoding can honour, decided at request time.

A JSON answer is promised to parse and to validate against its schema. The
grammar enforces most of JSON Schema, but not all of it, and some schemas
cannot be met within a token budget at all. Those are refused up front with
INVALID_ARGUMENT naming the reason, instead of failing after generation:

- nesting deeper than :data:`MAX_DEPTH` (recursion in every tool that reads it);
- keywords the grammar does not enforce (:data:`UNENFORCED`): an answer could
  satisfy the grammar and still fail validation;
- property names with control characters, which no valid answer can spell;
- schemas whose smallest valid instance is longer than the tokens a closing
  answer may use (``json_completion_tokens``): long ``minLength`` or
  ``minItems``, or a ``$ref`` that requires itself and so has no finite
  instance at all. Each token is at least one character, so an instance of at
  most that many characters can always be completed.
"""

from __future__ import annotations

from typing import Any

from atelier.kit.errors import InvalidArgument

#: Deepest nesting of objects and arrays accepted in a schema.
MAX_DEPTH = 32
#: Keywords the grammar accepts but does not enforce, with what to use instead.
UNENFORCED = {
    "not": "describe the allowed values positively",
    "oneOf": "use anyOf",
    "allOf": "merge the subschemas into one",
    "contains": "describe the items with items",
    "minContains": "describe the items with items",
    "maxContains": "describe the items with items",
    "if": "use anyOf",
    "then": "use anyOf",
    "else": "use anyOf",
    "dependentSchemas": "use anyOf",
}
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMAS = ("items", "additionalProperties", "propertyNames", "unevaluatedProperties",
               "unevaluatedItems", "additionalItems")
_SUBSCHEMA_LISTS = ("anyOf", "prefixItems")


def check_depth(value: Any) -> None:
    """Refuse nesting deeper than MAX_DEPTH, without recursion."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidArgument.field(
                "json_schema", f"nests deeper than {MAX_DEPTH} levels")
        children = node.values() if isinstance(node, dict) else node if isinstance(
            node, list) else ()
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list))


def check_honourable(schema: dict, closing_tokens: int) -> None:
    """Refuse a (meta-schema-valid, depth-checked) schema that decoding cannot honour."""
    _check_keywords(schema)
    length = _Minimum(schema).of(schema)
    if length is None:
        raise InvalidArgument.field(
            "json_schema", "requires itself through $ref: no finite JSON value matches it")
    if length > closing_tokens:
        raise InvalidArgument.field(
            "json_schema", f"its smallest valid answer is {length} characters; answers are "
                           f"guaranteed to close within {closing_tokens} tokens (lower "
                           "minLength / minItems)")


def _subschemas(node: dict):
    for key in _SUBSCHEMA_MAPS:
        value = node.get(key)
        if isinstance(value, dict):
            yield from (v for v in value.values() if isinstance(v, dict))
    for key in _SUBSCHEMAS:
        if isinstance(node.get(key), dict):
            yield node[key]
    for key in _SUBSCHEMA_LISTS:
        if isinstance(node.get(key), list):
            yield from (v for v in node[key] if isinstance(v, dict))


def _check_keywords(schema: dict) -> None:
    stack = [schema]
    while stack:
        node = stack.pop()
        for keyword, instead in UNENFORCED.items():
            if keyword in node:
                raise InvalidArgument.field(
                    "json_schema", f"uses {keyword!r}, which constrained decoding cannot "
                                   f"guarantee; {instead}")
        names = list((node.get("properties") or {}).keys()) + list(node.get("required") or [])
        if any(isinstance(n, str) and any(ord(c) < 0x20 for c in n) for n in names):
            raise InvalidArgument.field(
                "json_schema", "has a property name with a control character")
        stack.extend(_subschemas(node))


class _Minimum:
    """Length in characters of the shortest JSON text that a schema accepts (a lower
    bound where the exact value is hard), or None if none is finite."""

    def __init__(self, root: dict) -> None:
        self.root = root
        self.resolving: set[str] = set()
        self.done: dict[str, int | None] = {}

    def of(self, node: Any) -> int | None:
        if node is True or not isinstance(node, dict):
            return 1
        if "$ref" in node:
            return self._ref(node["$ref"])
        if "const" in node:
            return len(_json(node["const"]))
        if isinstance(node.get("enum"), list) and node["enum"]:
            return min(len(_json(v)) for v in node["enum"])
        if isinstance(node.get("anyOf"), list) and node["anyOf"]:
            options = [self.of(option) for option in node["anyOf"]]
            finite = [n for n in options if n is not None]
            return min(finite) if finite else None
        kinds = node.get("type")
        kinds = [kinds] if isinstance(kinds, str) else kinds or [
            "null", "boolean", "number", "string", "array", "object"]
        options = [self._typed(kind, node) for kind in kinds]
        finite = [n for n in options if n is not None]
        return min(finite) if finite else None

    def _typed(self, kind: str, node: dict) -> int | None:
        if kind == "string":
            return 2 + int(node.get("minLength", 0))
        if kind == "array":
            count = int(node.get("minItems", 0))
            prefix = node.get("prefixItems") or []
            parts = [self.of(p) for p in prefix[:count]]
            rest = max(0, count - len(prefix))
            if rest:
                parts += [self.of(node.get("items", True))] * rest
            if any(p is None for p in parts):
                return None
            return 2 + sum(parts) + max(0, count - 1)
        if kind == "object":
            properties = node.get("properties") or {}
            total = 2
            for i, name in enumerate(node.get("required") or []):
                value = self.of(properties.get(name, True))
                if value is None:
                    return None
                total += len(_json(name)) + 1 + value + (1 if i else 0)
            return total
        return {"null": 4, "boolean": 4}.get(kind, 1)

    def _ref(self, ref: str) -> int | None:
        if ref in self.done:
            return self.done[ref]
        if ref in self.resolving:
            return None  # requires itself
        target = _resolve(self.root, ref)
        if target is None:
            return 1  # unknown to us; the grammar compiler reports it
        self.resolving.add(ref)
        try:
            self.done[ref] = self.of(target)
        finally:
            self.resolving.discard(ref)
        return self.done[ref]


def _resolve(root: dict, ref: str) -> Any:
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        return None
    node: Any = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _json(value: Any) -> str:
    import json

    return json.dumps(value, separators=(",", ":"))
