"""Incremental detokenization: the streamed deltas join into exactly the text that
decoding every token at once gives, for any token sequence, including characters
split across tokens and special tokens, while each step decodes a short window."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atelier.analysis.detokenize import IncrementalText


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_qwen).tokenizer


def streamed(tokenizer, ids: list[int]) -> str:
    text = IncrementalText(tokenizer)
    return "".join(text.push(i) for i in ids)


@pytest.mark.parametrize("sample", [
    "A dog, on a sofa: 3 cats & 1 parrot.",
    "Ünïcödé — naïve café, 東京タワー, emoji 🐕‍🦺 and 👍🏽!",
    '{"label": "dog", "box": [12, 40, 200, 310]}',
    "  leading spaces,\n\nnew lines\tand tabs  ",
])
def test_deltas_join_into_the_whole_decode(tokenizer, sample):
    ids = tokenizer(sample).input_ids
    assert streamed(tokenizer, ids) == tokenizer.decode(ids, skip_special_tokens=True)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_any_token_sequence_streams_as_it_decodes(tokenizer, data):
    ids = data.draw(st.lists(st.integers(0, len(tokenizer) - 1), max_size=40))
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    joined = streamed(tokenizer, ids)
    if whole.endswith("\ufffd"):  # an incomplete character waits for a next token
        assert whole.startswith(joined)
    else:
        assert joined == whole


def test_each_step_decodes_a_short_window(tokenizer):
    calls: list[int] = []

    class Counting:
        def decode(self, ids, **kwargs):
            calls.append(len(ids))
            return tokenizer.decode(ids, **kwargs)

    ids = tokenizer("word " * 300).input_ids
    text = IncrementalText(Counting())
    for i in ids:
        text.push(i)
    assert max(calls) <= 4  # not the whole answer, every step
