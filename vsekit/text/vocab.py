"""The word vocabulary, built from the training captions only (never from validation/test captions)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from vsekit.text.tokenizer import tokenize
from vsekit.utils.io import atomic_write_json

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)


class Vocabulary:
    """Word <-> id table with the field's four special tokens at ids 0-3 (``<pad>`` is 0)."""

    def __init__(self, words: Sequence[str]) -> None:
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}")
        self.itos: list[str] = list(words)
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("a vocabulary holds a word twice")

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 4, max_tokens: int | None = None) -> Vocabulary:
        """Words seen at least ``min_count`` times, most frequent first (ties alphabetical, so deterministic).
        ``max_tokens``: only the first that many tokens of a caption count, as only they are ever encoded
        (``text.max_tokens``)."""
        counts = Counter()
        for c in captions:
            counts.update(tokenize(c, max_tokens))
        words = sorted((w for w, n in counts.items() if n >= min_count and w not in SPECIALS),
                       key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + words)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, caption: str, max_len: int | None = None) -> list[int]:
        """``<start> w1 ... wn <end>`` as ids; unknown words map to ``<unk>``; truncated to ``max_len`` words
        (reading no more of the caption than those need)."""
        words = tokenize(caption, max_len)
        unk = self.unk_id
        return [self.start_id, *(self.stoi.get(w, unk) for w in words), self.end_id]

    def decode(self, ids: Iterable[int]) -> str:
        out = []
        for i in ids:
            w = self.itos[int(i)]
            if w == END:
                break
            if w not in (PAD, START):
                out.append(w)
        return " ".join(out)

    def to_dict(self) -> dict:
        return {"format": 1, "words": self.itos}

    @classmethod
    def from_dict(cls, d: dict) -> Vocabulary:
        return cls(d["words"])

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        return cls.from_dict(json.loads(Path(path).read_text()))
