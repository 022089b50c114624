"""Streaming text from token ids, incrementally.

Decoding the whole answer again for every new token costs O(n²) over an answer;
here each step decodes only a short window: from a *prefix offset* (the tokens
emitted last time, so that what joins across the boundary, such as word pieces
and spaces, decodes as it will in the whole) up to the end, and emits what the
window adds after its *read offset*. Text that ends
in an incomplete UTF-8 sequence (U+FFFD) waits for the next token.
"""

from __future__ import annotations


class IncrementalText:
    """Text deltas of a growing list of token ids."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; the text it completes ("" while a character is incomplete)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        now = self._decode(self.ids[self.prefix_offset:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return now[len(before):]
