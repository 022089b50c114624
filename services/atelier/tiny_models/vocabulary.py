"""Byte-level BPE vocabularies learned here from a fixed word list.

The merge learner is a plain, deterministic byte-pair-encoding loop (ties
broken by the pair itself), so a rebuild gives byte-identical tokenizers.
CLIP-style vocabularies mark word ends with ``</w>``; GPT-2/Qwen-style ones
keep a leading space inside words. Both start from the 256 byte symbols, so
any text tokenises.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import cache
from itertools import pairwise

#: Words the tiny tokenizers learn merges for: prompt vocabulary, instructions
#: and JSON punctuation. Anything else still tokenises, byte by byte.
CORPUS_WORDS = """
a an the of on in at with and or to for from by is are be this that it its as photo picture
image painting drawing render portrait close up high quality detailed sharp dog cat toy robot
person man woman child bird car house tree flower mountain beach city street forest sky moon
sun space astronaut snow rain night day red green blue yellow orange purple black white gray
brown pink gold silver sks zwx ohwx style standing sitting running jumping flying wearing hat
describe what where who how many which answer question text document chart table graph axis
legend series value title label json markdown list item key name type number string object
array true false null video frame second seconds scene show shows showing translate language
english german french spanish chinese japanese read transcribe extract page line column row
""".split()
JSON_SAMPLE = '{"type": "bar", "title": "sales", "values": [1, 2, 3], "ok": true, "x": null}'


@cache
def byte_symbols() -> tuple[str, ...]:
    """The printable stand-in for each byte 0..255 used by byte-level BPE (GPT-2's table)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


def _to_symbols(text: str) -> str:
    table = byte_symbols()
    return "".join(table[b] for b in text.encode("utf-8"))


def learn_merges(words: Counter[tuple[str, ...]], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties: smallest pair),
    until ``num_merges`` or every word is one symbol."""
    vocab = dict(words)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, freq in vocab.items():
            for pair in pairwise(word):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = best[0] + best[1]
        new_vocab: dict[tuple[str, ...], int] = {}
        for word, freq in vocab.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_vocab[tuple(out)] = new_vocab.get(tuple(out), 0) + freq
        vocab = new_vocab
    return merges


def _corpus_lines() -> list[str]:
    lines = [" ".join(CORPUS_WORDS[i : i + 9]) for i in range(0, len(CORPUS_WORDS), 9)]
    return [*lines, JSON_SAMPLE]


def train_clip_vocabulary(num_merges: int = 500) -> tuple[dict[str, int], list[str]]:
    """CLIP-style: every byte symbol with and without ``</w>``, learned merges, specials."""
    words: Counter[tuple[str, ...]] = Counter()
    for line in _corpus_lines():
        for word in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", line.lower()):
            symbols = list(_to_symbols(word))
            symbols[-1] += "</w>"
            words[tuple(symbols)] += 1
    merges = learn_merges(words, num_merges)
    vocab: dict[str, int] = {}
    for symbol in byte_symbols():
        vocab[symbol] = len(vocab)
    for symbol in byte_symbols():
        vocab[symbol + "</w>"] = len(vocab)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab, [f"{a} {b}" for a, b in merges]


def train_byte_level_vocabulary(num_merges: int = 600) -> tuple[dict[str, int], list[str]]:
    """GPT-2/Qwen-style: byte symbols plus learned merges; callers append special tokens."""
    words: Counter[tuple[str, ...]] = Counter()
    for line in _corpus_lines():
        for piece in re.findall(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+", line):
            words[tuple(_to_symbols(piece))] += 1
    merges = learn_merges(words, num_merges)
    vocab = {symbol: i for i, symbol in enumerate(byte_symbols())}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return vocab, [f"{a} {b}" for a, b in merges]
