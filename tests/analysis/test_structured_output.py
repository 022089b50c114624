"""Schema-constrained JSON: the tiny random model's answers always parse and validate."""

from __future__ import annotations

import json

import grpc
import pytest
from jsonschema import Draft202012Validator

from atelier.v1 import analysis_pb2 as A
from tests.analysis.conftest import image

SCHEMAS = [
    {"type": "object",
     "properties": {"title": {"type": "string"}, "pages": {"type": "integer"},
                    "tags": {"type": "array", "items": {"type": "string"}}},
     "required": ["title", "pages"], "additionalProperties": False},
    {"type": "object",
     "properties": {"chart_type": {"enum": ["bar", "line", "pie"]},
                    "series": {"type": "array", "minItems": 1, "items": {
                        "type": "object",
                        "properties": {"label": {"type": "string"},
                                       "values": {"type": "array",
                                                  "items": {"type": "number"}}},
                        "required": ["label", "values"]}}},
     "required": ["chart_type", "series"]},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 3},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": "null"}},
     "required": ["ok", "note"]},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["document", "chart", "array", "literals"])
@pytest.mark.parametrize("max_new_tokens", [4, 32])
def test_answers_validate_against_the_schema(stub, schema, max_new_tokens):
    reply = stub.Analyze(A.AnalyzeRequest(
        images=[image(96, 96, max_new_tokens)], task=A.ANALYSIS_TASK_DOCUMENT,
        output_format=A.OUTPUT_FORMAT_JSON, json_schema=json.dumps(schema),
        decoding=A.DecodingParams(max_new_tokens=max_new_tokens)), timeout=120)
    Draft202012Validator(schema).validate(json.loads(reply.text))
    assert reply.output_format == A.OUTPUT_FORMAT_JSON


def test_unconstrained_output_is_not_json(stub):
    """The control: without the grammar the tiny model writes garbage, so the valid
    JSON above can only come from constrained decoding."""
    failures = 0
    for seed in range(3):
        reply = stub.Analyze(A.AnalyzeRequest(
            images=[image(96, 96, seed)], task=A.ANALYSIS_TASK_DOCUMENT,
            output_format=A.OUTPUT_FORMAT_TEXT,
            decoding=A.DecodingParams(max_new_tokens=24)), timeout=120)
        try:
            json.loads(reply.text)
        except ValueError:
            failures += 1
    assert failures == 3


def test_json_without_schema_is_still_json(stub):
    reply = stub.Analyze(A.AnalyzeRequest(
        images=[image()], instruction="list the objects", task=A.ANALYSIS_TASK_GENERAL,
        output_format=A.OUTPUT_FORMAT_JSON,
        decoding=A.DecodingParams(max_new_tokens=16)), timeout=120)
    json.loads(reply.text)


@pytest.mark.parametrize("schema", ['{"type": ', '[1, 2]', '{"type": 5}',
                                    '{"minLength": "long"}'])
def test_invalid_schema_is_invalid_argument(stub, schema):
    with pytest.raises(grpc.RpcError) as err:
        stub.Analyze(A.AnalyzeRequest(images=[image()], output_format=A.OUTPUT_FORMAT_JSON,
                                      json_schema=schema, instruction="x"), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "json_schema" in err.value.details()


def test_schema_needs_json_format(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Analyze(A.AnalyzeRequest(images=[image()], output_format=A.OUTPUT_FORMAT_TEXT,
                                      json_schema='{"type": "object"}', instruction="x"),
                     timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_many_answers_close_validly_under_tight_budgets(stub):
    """Numbers, strings and arrays cut off by small budgets are all closed validly."""
    from atelier.dev.demo_assets import DOCUMENT_SCHEMA

    for schema in (DOCUMENT_SCHEMA, SCHEMAS[1]):
        for budget in (1, 3, 9):
            results = list(stub.BatchAnalyze(A.BatchAnalyzeRequest(
                images=[image(64 + 16 * s, 64, s) for s in range(8)],
                task=A.ANALYSIS_TASK_DOCUMENT, output_format=A.OUTPUT_FORMAT_JSON,
                json_schema=json.dumps(schema),
                decoding=A.DecodingParams(max_new_tokens=budget)), timeout=300))
            assert len(results) == 8
            for r in results:
                assert r.WhichOneof("outcome") == "result", r.error.message
                Draft202012Validator(schema).validate(json.loads(r.result.text))


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


RECURSIVE = {"$defs": {"node": {"type": "object", "required": ["next"],
                                "properties": {"next": {"$ref": "#/$defs/node"}}}},
             "$ref": "#/$defs/node"}
UNHONOURABLE = {
    "nested-40": (json.dumps(_nested(40)), "deeper"),
    "deep-json-text": ("[" * 30000 + "]" * 30000, "deep"),
    "not": (json.dumps({"type": "string", "not": {"const": "a"}}), "not"),
    "oneOf": (json.dumps({"oneOf": [{"type": "integer"}, {"type": "number"}]}), "anyOf"),
    "minLength": (json.dumps({"type": "string", "minLength": 100_000}), "minLength"),
    "minItems": (json.dumps({"type": "array", "items": {"type": "integer"},
                             "minItems": 5000}), "minItems"),
    "recursive-ref": (json.dumps(RECURSIVE), "requires itself"),
    "control-name": (json.dumps({"type": "object", "properties": {"a\u0001": {}},
                                 "required": ["a\u0001"]}), "control character"),
}


@pytest.mark.parametrize("name", list(UNHONOURABLE))
def test_schemas_that_cannot_be_honoured_are_refused_up_front(stub, name):
    schema, reason = UNHONOURABLE[name]
    for call in ("Analyze", "BatchAnalyze"):
        with pytest.raises(grpc.RpcError) as err:
            if call == "Analyze":
                stub.Analyze(A.AnalyzeRequest(
                    images=[image()], output_format=A.OUTPUT_FORMAT_JSON, json_schema=schema,
                    instruction="x"), timeout=60)
            else:
                list(stub.BatchAnalyze(A.BatchAnalyzeRequest(
                    images=[image()], output_format=A.OUTPUT_FORMAT_JSON, json_schema=schema,
                    instruction="x"), timeout=60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert reason in err.value.details()


def test_optional_recursion_and_modest_minimums_are_served(stub):
    tree = {"$defs": {"node": {"type": "object", "required": ["label"],
                               "properties": {"label": {"type": "string", "minLength": 3},
                                              "children": {"type": "array",
                                                           "items": {"$ref": "#/$defs/node"}}}}},
            "$ref": "#/$defs/node"}
    reply = stub.Analyze(A.AnalyzeRequest(
        images=[image()], output_format=A.OUTPUT_FORMAT_JSON, json_schema=json.dumps(tree),
        instruction="x", decoding=A.DecodingParams(max_new_tokens=8)), timeout=120)
    Draft202012Validator(tree).validate(json.loads(reply.text))


def test_a_pattern_admitting_control_characters_still_returns_strict_json(stub):
    schema = {"type": "object", "required": ["c"],
              "properties": {"c": {"type": "string", "pattern": "^[\\x00-\\x1f]{2,4}$"}}}
    for seed in range(3):
        reply = stub.Analyze(A.AnalyzeRequest(
            images=[image(96, 96, seed)], output_format=A.OUTPUT_FORMAT_JSON,
            json_schema=json.dumps(schema), instruction="x",
            decoding=A.DecodingParams(max_new_tokens=16)), timeout=120)
        value = json.loads(reply.text)  # strict: raw control characters would fail here
        Draft202012Validator(schema).validate(value)
