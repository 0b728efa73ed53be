"""Caption -> token ids for the text encoder, bounded: what the training run, the Embedder (evaluation, index
building) and the search server all use, so that a caption is cut the same way everywhere.

Two limits apply (``text`` section of the config): ``text.max_len``, a method's own window (Dual-Path's 30
words), cuts silently; ``text.max_tokens`` (default 128) bounds every caption, and cutting a caption to it
logs a warning once per encoder, since a caption that long is usually a mistake (or an attack: a caption of a
million words would otherwise cost seconds and gigabytes to tokenize and embed). Neither reads more of the
text than its first tokens need: vsekit's tokenizer reads a growing prefix (:func:`~vsekit.text.tokenizer.
tokenize`), and an encoder's own tokenizer (BERT, CLIP) is given a prefix of the caption cut at a space.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from vsekit.text.tokenizer import CHARS_PER_TOKEN, clean_text, head_at_space
from vsekit.text.vocab import Vocabulary

log = logging.getLogger(__name__)

Hook = Callable[[str, "int | None"], list[int]]


class CaptionEncoder:
    """``encoder(caption) -> ids``: ``[start, tokens..., end]`` through the text encoder's own tokenizer
    (``hook``, e.g. BERT's word pieces: :attr:`vsekit.models.base.Encoder.tokenize`) or the vocabulary, with
    at most ``max_len`` tokens (silently) and at most ``max_tokens`` (with one warning).

    ``known_words(caption)``: how many of the caption's tokens the model knows as words (not padding,
    start/end or unknown markers; for the vocabulary, not punctuation either), so that a query of only
    punctuation or invisible characters can be refused instead of answered with confident nonsense.
    """

    def __init__(self, vocab: Vocabulary | None, hook: Hook | None, max_len: int | None, max_tokens: int) -> None:
        if vocab is None and hook is None:
            raise ValueError("a CaptionEncoder needs a vocabulary or a tokenizer hook")
        self.vocab, self.hook = vocab, hook
        self.max_tokens = int(max_tokens)
        self.max_len = None if max_len is None else min(int(max_len), self.max_tokens)
        owner = getattr(hook, "__self__", None)
        # an encoder's own cap on pieces (BERT's positions): asking for more than it gives is pointless
        self._hook_cap = getattr(owner, "max_pieces", None)
        self._special = frozenset(getattr(owner, "special_ids", ()) or ())
        self._warned = False

    def __call__(self, caption: str) -> list[int]:
        if self.max_len is not None:  # the method's own window, within max_tokens: no warning
            return self._ids(caption, self.max_len)
        ids = self._ids(caption, self.max_tokens + 1)  # one token more tells whether the caption is longer
        if len(ids) - 2 <= self.max_tokens:
            return ids
        self._warn(caption)
        return ids[: self.max_tokens + 1] + ids[-1:]

    def _ids(self, caption: str, n: int) -> list[int]:
        return self.vocab.encode(caption, n) if self.hook is None else self._hook_ids(caption, n)

    def _hook_ids(self, caption: str, n: int) -> list[int]:
        """The hook's ids of the first ``n`` pieces, from a prefix of the caption cut at a space (a word is
        never split, so the prefix's pieces are the caption's first pieces), grown while it gives too few."""
        if self._hook_cap is not None:  # the encoder cuts there itself (then max_tokens never binds)
            n = min(n, int(self._hook_cap))
        window = max(n, 1) * CHARS_PER_TOKEN
        while True:
            ids = self.hook(clean_text(head_at_space(caption, window)), n)
            if len(caption) <= window or len(ids) - 2 >= n:
                return ids
            window *= 4

    def _warn(self, caption: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("a caption of more than %d tokens was cut to its first %d (text.max_tokens; this is said "
                        "once): %r...", self.max_tokens, self.max_tokens, caption[:60])  # repr: no escape codes

    def known_words(self, caption: str) -> int:
        """How many of the caption's (first ``max_tokens``) tokens the model knows as words."""
        ids = self(caption)[1:-1]
        if self.hook is not None:
            return sum(1 for i in ids if i not in self._special)
        itos, unk = self.vocab.itos, self.vocab.unk_id
        return sum(1 for i in ids if i != unk and any(ch.isalnum() for ch in itos[i]))
