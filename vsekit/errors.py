"""The errors a user can cause, each printed by the command line as one line (exit code 2).

Library code raises these instead of bare ``ValueError``s for mistakes in what the user supplied (a config,
a data set, a checkpoint, an index), so that the message, not a traceback, reaches the user.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VsekitError(Exception):
    """Base class of the errors that the command line reports in one line."""


class ConfigError(VsekitError, ValueError):
    """A recipe or override is invalid; the message names the key (``train.epochs``) and what is wrong."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'epochs'?"`` for the nearest of ``choices``, or ``""`` when nothing is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def first_line(e: BaseException, limit: int | None = 200, default: str | None = None) -> str:
    """The first line of an exception's message for a one-line error, cut to ``limit`` characters (None: not
    cut); an empty message gives ``default`` (None: the exception's type name)."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else (type(e).__name__ if default is None else default)
    return text if limit is None else text[:limit]


def one_line(e: BaseException, limit: int = 200) -> str:
    """An exception's whole message on one line (whitespace runs joined), cut to ``limit`` characters with
    "..."; an empty message gives the exception's type name."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


class TrainingCollapsed(RuntimeError):
    """Raised by the trainer (after saving ``last.pt``) when ``train.collapse.action`` is ``stop``; the
    command line exits with code 3."""


class TrainingDiverged(TrainingCollapsed):
    """Raised by the trainer (after saving ``last.pt``) when ``train.max_nonfinite_steps`` steps in a row had a
    non-finite loss or gradient; the command line exits with code 3."""
