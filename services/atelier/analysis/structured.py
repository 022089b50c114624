"""Schema-constrained JSON: grammars from xgrammar, per-row control of a batched generate.

``JsonGrammars`` compiles (and caches) a grammar per JSON schema, or the generic
JSON grammar. ``RowControl`` is a logits processor that applies each row's
grammar to that row only, so constrained and free-text requests share one
batch. Past a row's token budget, a JSON row is steered to close what is open (end
the current string, then closing brackets and short values, always within
the grammar), so its answer always parses. ``RowStop`` records each row's
tokens and ends each row at EOS, at its own budget, or when cancelled.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
import xgrammar as xgr
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from transformers import LogitsProcessor, StoppingCriteria

from atelier.analysis.schema_limits import check_depth, check_honourable
from atelier.kit.errors import InvalidArgument

_CLOSERS = set('"}]')
#: Complete JSON values of one or two characters.
_SHORT_VALUES = {'""', "[]", "{}", "null", "true", "false", "0"}


def parse_schema(text: str, closing_tokens: int, limit: int = 64 * 1024) -> dict:
    """The schema as a dict, checked against the JSON Schema meta-schema and against
    what constrained decoding can honour (schema_limits.py) when an answer may use
    ``closing_tokens`` to close."""
    if len(text.encode()) > limit:
        raise InvalidArgument.field("json_schema", f"is larger than {limit} bytes")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument.field("json_schema", f"is not valid JSON: {exc.msg}") from None
    except RecursionError:
        raise InvalidArgument.field("json_schema", "nests too deeply") from None
    if not isinstance(schema, dict):
        raise InvalidArgument.field("json_schema", "must be a JSON object")
    check_depth(schema)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise InvalidArgument.field("json_schema",
                                    f"is not a valid JSON Schema: {exc.message}"[:300]) from None
    check_honourable(schema, closing_tokens)
    return schema


def load_answer(text: str) -> tuple[Any, str]:
    """An answer's JSON value and text. A grammar may let a raw control character into a
    string (a pattern matching one); such text still parses leniently, and is
    then returned re-serialised with the character escaped, so the JSON returned
    always parses strictly."""
    try:
        return json.loads(text), text
    except json.JSONDecodeError:
        value = json.loads(text, strict=False)  # raises if it is not JSON at all
        return value, json.dumps(value, ensure_ascii=False)


class ClosingTokens:
    """Token classes for closing a cut-off JSON answer fast, by preference: inside a
    string, tokens that end it; after a number, the stop token, closing brackets or
    a comma; elsewhere the stop token, closing brackets, short complete values, a
    colon, an opening quote (closed at the next step), a comma, then anything but
    whitespace. Shared by both backends, so they close answers the same way."""

    def __init__(self, tokenizer, stop_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        end_string, brackets, literals, colons, commas, open_string, solid = (
            [], [], [], [], [], [], [])
        for token_id in range(len(tokenizer)):
            text = tokenizer.decode([token_id]).strip()
            if not text:
                continue
            solid.append(token_id)
            if text == ":":
                colons.append(token_id)
            if text == ",":
                commas.append(token_id)
            if text[0] == '"' and set(text) <= _CLOSERS:
                end_string.append(token_id)
            if set(text) <= set("}]"):
                brackets.append(token_id)
            if text in _SHORT_VALUES or (text.isdigit() and len(text) == 1):
                literals.append(token_id)
            if text == '"':
                open_string.append(token_id)
        as_tensor = lambda ids: torch.tensor(ids, dtype=torch.long)  # noqa: E731
        stop, end_string, brackets, literals, colons, commas, open_string, solid = map(
            as_tensor, (stop_token_ids, end_string, brackets, literals, colons, commas,
                        open_string, solid))
        self._in_string = (end_string, solid)
        self._after_number = (stop, brackets, commas, solid)
        self._elsewhere = (stop, brackets, literals, colons, open_string, commas, solid)

    def steer(self, scores: torch.Tensor, tokens: list[int]) -> None:
        """Keep, in one row of (grammar-masked) ``scores``, only the allowed tokens of
        the first class that has any, given the answer's ``tokens`` so far."""
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        last = text.rstrip()[-1:]
        if _inside_string(text):
            classes = self._in_string
        elif last and (last.isdigit() or last in ".eE+-"):
            classes = self._after_number  # a number may go on for ever: end it
        else:
            classes = self._elsewhere
        allowed = torch.isfinite(scores)
        for preferred in classes:
            preferred = preferred[preferred < scores.shape[-1]].to(scores.device)
            choices = preferred[allowed[preferred]]
            if len(choices):
                keep = scores[choices].clone()
                scores.fill_(float("-inf"))
                scores[choices] = keep
                return


class JsonGrammars:
    """Compiles grammars for one tokenizer; caches them by schema text."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int],
                 closing: bool = True) -> None:
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self.compiler = xgr.GrammarCompiler(self.info)
        self.vocab_size = vocab_size
        # The closing steer's token classes, where this process applies grammars
        # (the vLLM backend steers inside vLLM's engine, vllm_closing.py).
        self.closing = ClosingTokens(tokenizer, stop_token_ids) if closing else None
        self._compile = lru_cache(maxsize=128)(self._compile_uncached)

    def compile(self, schema_text: str | None) -> xgr.CompiledGrammar:
        """A compiled grammar for ``schema_text`` (None: any JSON value)."""
        return self._compile(schema_text)

    def _compile_uncached(self, schema_text: str | None) -> xgr.CompiledGrammar:
        if schema_text is None:
            return self.compiler.compile_builtin_json_grammar()
        try:
            return self.compiler.compile_json_schema(schema_text, any_whitespace=False)
        except Exception as exc:  # xgrammar reports unsupported schema features here
            raise InvalidArgument.field(
                "json_schema", f"cannot be used for constrained decoding: {exc}"[:500]) from None


@dataclass(eq=False)
class Row:
    """Per-request state inside one generate call."""

    budget: int
    grammar: xgr.CompiledGrammar | None = None
    extra_budget: int = 0
    cancelled: Callable[[], bool] = lambda: False
    on_token: Callable[[int], None] | None = None
    matcher: Any = None
    tokens: list[int] = field(default_factory=list)
    finished: bool = False
    stopped_by_eos: bool = False
    closing: bool = False

    def __post_init__(self) -> None:
        if self.grammar is not None:
            self.matcher = xgr.GrammarMatcher(self.grammar)


class RowControl(LogitsProcessor):
    """Applies each row's grammar (and closing steer) to its logits."""

    def __init__(self, rows: list[Row], grammars: JsonGrammars | None) -> None:
        self.rows = rows
        self.grammars = grammars
        self.bitmask = None
        self.steps = 0
        if grammars is not None and any(r.matcher is not None for r in rows):
            self.bitmask = xgr.allocate_token_bitmask(len(rows), grammars.vocab_size)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        if self.steps > 0:
            for row in self.rows:
                if row.matcher is not None and not row.finished \
                        and not row.matcher.is_terminated():
                    row.matcher.accept_token(row.tokens[-1])
        self.steps += 1
        if self.bitmask is None:
            return scores
        constrained = []
        for i, row in enumerate(self.rows):
            if row.matcher is None or row.finished or row.matcher.is_terminated():
                continue
            row.matcher.fill_next_token_bitmask(self.bitmask, i)
            constrained.append(i)
        if not constrained:
            return scores
        xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device),
                                        indices=constrained)
        for i in constrained:
            row = self.rows[i]
            if len(row.tokens) >= row.budget:
                row.closing = True
                self.grammars.closing.steer(scores[i], row.tokens)
        return scores


def _inside_string(text: str) -> bool:
    """Whether JSON text ends inside a string literal."""
    inside = escaped = False
    for ch in text:
        if escaped:
            escaped = False
        elif inside and ch == "\\":
            escaped = True
        elif ch == '"':
            inside = not inside
    return inside


class RowStop(StoppingCriteria):
    """Records each row's new token (and streams it), then ends rows one by one: at
    EOS, at their own budget, when cancelled, or past the JSON closing allowance.

    Stopping criteria run right after each token is chosen, before generate's own
    streamer, so this is where per-row state is kept.
    """

    def __init__(self, rows: list[Row], eos_token_ids: set[int]) -> None:
        self.rows = rows
        self.eos = eos_token_ids

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        latest = input_ids[:, -1].tolist()
        done = []
        for row, token in zip(self.rows, latest, strict=True):
            if not row.finished:
                row.tokens.append(int(token))
                if row.on_token is not None:
                    row.on_token(int(token))
                if token in self.eos:
                    row.finished = row.stopped_by_eos = True
                elif row.cancelled():
                    row.finished = True
                elif row.matcher is None and len(row.tokens) >= row.budget:
                    row.finished = True
                elif row.matcher is not None and \
                        len(row.tokens) >= row.budget + row.extra_budget:
                    row.finished = True
            done.append(row.finished)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
