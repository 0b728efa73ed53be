"""Caption tokenisation.

The VSE++ reference lower-cases and uses NLTK's ``word_tokenize`` (Punkt + Treebank rules). Punkt needs a
data download, which vsekit never does at run time, so we use an equivalent rule set for captions: lower-case,
words (letters/digits, with an internal apostrophe or hyphen kept as in "it's", "t-shirt"), and each other
non-space character as its own token. On caption text the two differ only in rare cases such as
abbreviations with periods ("u.s.") and the Treebank split of "can't" into "ca n't".

Invisible characters are cleaned first (:func:`clean_text`): a zero-width space inside "dog" must not make
two tokens of it, nor a caption of zero-width characters look like words. A bounded call
(``max_tokens``) reads only as much of the text as its first tokens need, so a caption of a million words
costs what a caption of ``max_tokens`` words costs.
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*|[^\sa-z0-9]")
# a bounded tokenisation first reads this many characters per wanted token (and more only when they run out)
CHARS_PER_TOKEN = 16
# format characters (Unicode category Cf: zero-width space and joiners, soft hyphen, byte-order mark,
# direction marks and isolates, tags), dropped; C0/C1 control characters other than whitespace, read as spaces
_INVISIBLE = re.compile("[\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f"
                        "\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd"
                        "\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001"
                        "\U000e0020-\U000e007f]")
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def clean_text(text: str) -> str:
    """``text`` without invisible format characters (dropped: "dog\\u200bs" is "dogs") and with control
    characters read as spaces."""
    if not text.isascii():
        text = _INVISIBLE.sub("", text)
    return _CONTROL.sub(" ", text)


_LAST_SPACE = re.compile(r"\s(?=\S*\Z)")


def head_at_space(text: str, chars: int) -> str:
    """``text`` when it has at most ``chars`` characters, else its first ``chars`` cut back to their last
    whitespace, so that no word is split (without whitespace there: the first ``chars``). A tokenizer that
    splits words at whitespace gives the prefix's tokens as the first tokens of the whole text."""
    if len(text) <= chars:
        return text
    head = text[:chars]
    tail = max(0, chars - 256)  # the last space is almost always in the last few words: look there first
    space = _LAST_SPACE.search(head, tail) or (_LAST_SPACE.search(head, 0, tail) if tail else None)
    return head[: space.start()] if space else head


def tokenize(text: str, max_tokens: int | None = None) -> list[str]:
    """Lower-cased word tokens of ``text`` (after :func:`clean_text`); with ``max_tokens``, the first that
    many, reading no more of ``text`` than they need."""
    if max_tokens is None:
        return _TOKEN.findall(clean_text(text).lower())
    return _first_tokens(text, int(max_tokens))


def _first_tokens(text: str, n: int) -> list[str]:
    """The first ``n`` tokens of ``text``, exactly as ``tokenize(text)[:n]``, from a prefix of the text: a
    window of ``n * CHARS_PER_TOKEN`` characters, grown fourfold while its tokens may run to its cut (a
    token that touches the cut may continue past it)."""
    if n < 1:
        return []
    window = n * CHARS_PER_TOKEN
    while True:
        head = text[:window]
        whole = len(head) == len(text)
        low = clean_text(head).lower()
        tokens = []
        for m in _TOKEN.finditer(low):
            if len(tokens) == n:
                break
            if not whole and m.end() >= len(low) - 1:  # may continue past the cut: read more
                break
            tokens.append(m.group())
        if whole or len(tokens) == n:
            return tokens
        window *= 4
