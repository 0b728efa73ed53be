"""Caption tokenisation.

The VSE++ reference lower-cases and uses NLTK's ``word_tokenize`` (Punkt + Treebank rules). Punkt needs a
data download, which vsekit never does at run time, so we use an equivalent rule set for captions: lower-case,
words (letters/digits, with an internal apostrophe or hyphen kept as in "it's", "t-shirt"), and each other
non-space character as its own token. On caption text the two differ only in rare cases such as
abbreviations with periods ("u.s.") and the Treebank split of "can't" into "ca n't".
"""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens of ``text``."""
    return _TOKEN.findall(text.lower())
