"""An honest validation split for labelled text: whole texts held out, and nothing of them trained on.

Some data sets hold phrases cut from their own sentences as rows of their own (SST-2's training
split is about 67,000 phrases of 6,900 sentences). A random share of such rows is easy to score
(mostly short phrases) and leaks: a held-out sentence's phrases stay in training. So the split
holds out whole texts only, the rows that no longer row contains, and drops from training every
row that is a contiguous word span of a held-out text (its phrases, and exact duplicates).
Words are compared lower-cased with whitespace collapsed. On data whose rows are independent
texts this is the plain stratified split, less the duplicates of held-out rows.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

_K = 4  # spans of at least _K words are found through their first _K words; shorter ones by a set


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.lower().split())


class SpanIndex:
    """Which texts contain a given word sequence as a contiguous span."""

    def __init__(self, texts: list[tuple[str, ...]]):
        self.texts = texts
        self.padded = [" " + " ".join(t) + " " for t in texts]
        self.short: dict[tuple[str, ...], int] = {}  # span of < _K words -> longest text holding it
        self.anchor: dict[tuple[str, ...], list[int]] = defaultdict(list)  # first _K words -> texts
        for i, t in enumerate(texts):
            n = len(t)
            for s in range(n):
                for e in range(s + 1, min(n, s + _K - 1) + 1):
                    span = t[s:e]
                    if self.short.get(span, -1) < n:
                        self.short[span] = n
            seen = set()
            for s in range(n - _K + 1):
                g = t[s:s + _K]
                if g not in seen:
                    seen.add(g)
                    self.anchor[g].append(i)

    def in_longer(self, words: tuple[str, ...], longer_than: int) -> bool:
        """Is `words` a span of some text with more than `longer_than` words?"""
        if not words:
            return False
        if len(words) < _K:
            return self.short.get(words, -1) > longer_than
        needle = " " + " ".join(words) + " "
        return any(len(self.texts[i]) > longer_than and needle in self.padded[i] for i in self.anchor.get(words[:_K], ()))


def _whole(words: list[tuple[str, ...]]) -> list[int]:
    everything = SpanIndex(words)
    return [i for i, w in enumerate(words) if not everything.in_longer(w, len(w))]


def whole_texts(texts: list[str]) -> list[int]:
    """Indices of the rows that are no span of a longer row (SST-2's sentences, not its phrases)."""
    return _whole([_words(t) for t in texts])


@dataclass
class Split:
    train: list[int]
    val: list[int]
    whole: int
    """How many rows are whole texts (contained in no longer row)."""
    dropped: int
    """Training rows removed because they are spans of a held-out text."""


def whole_text_split(texts: list[str], labels: list[str], fraction: float, rng: random.Random) -> Split:
    """Hold out `fraction` of the whole texts, stratified by label; train on every row that is
    not part of a held-out text."""
    words = [_words(t) for t in texts]
    whole = _whole(words)
    by_class: dict[str, list[int]] = defaultdict(list)
    for i in whole:
        by_class[labels[i]].append(i)
    held: list[int] = []
    for lb in sorted(by_class):
        idx = by_class[lb]
        rng.shuffle(idx)
        if len(idx) > 1:
            held.extend(idx[:max(1, round(len(idx) * fraction))])
    held.sort()
    held_index = SpanIndex([words[i] for i in held])
    held_set = set(held)
    train, dropped = [], 0
    for i, w in enumerate(words):
        if i in held_set:
            continue
        if held_index.in_longer(w, len(w) - 1):  # a span of a held-out text at least as long
            dropped += 1
        else:
            train.append(i)
    return Split(train, held, len(whole), dropped)
