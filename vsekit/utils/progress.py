"""Progress reporting that fits where the output goes.

:func:`progress` (and :func:`iterate`, its wrapper for loops) picks one of three modes:

* ``bar``   - a live ``tqdm`` bar (``leave=False``, dynamic width) on the stream; used when the stream
  (default ``sys.stderr``) is a terminal.
* ``lines`` - plain lines, never ``\\r``; used when the stream is a file or a pipe (``make demo > log``).
  A line looks like ``epoch 3/30: 120/450 batches (27%) 41.2 batch/s loss=0.512 pairs_per_s=5270``.
  Lines go to ``logger.info`` when a logger is given, else to the stream (newline, flush).
* ``off``   - nothing at all (also what ``enabled=False`` gives).

Line policy (``lines`` mode): on each ``update`` a line is written as soon as *either* ``every_steps``
updates *or* ``every_seconds`` seconds have passed since the previous line (or since the start),
whichever comes first; both counters then restart. ``every_steps`` defaults to ``max(1, total // 10)``
(about ten lines per pass) or 100 when ``total`` is None; ``every_seconds=None`` turns the time rule
off. Nothing is written between updates (no background thread). ``close`` always writes a final line
with the count, the elapsed time and the average rate. The rate in every line is the average since start.

Environment override: ``VSEKIT_PROGRESS=bar|lines|off`` forces the mode whatever the stream is
(``auto`` or unset: decide by ``isatty()``). It cannot switch on a progress that the caller made with
``enabled=False``. Unknown values are warned about and ignored.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, TypeVar

__all__ = ["ENV_VAR", "Progress", "iterate", "progress", "resolve_mode"]

ENV_VAR = "VSEKIT_PROGRESS"
_MODES = ("bar", "lines", "off")

T = TypeVar("T")


def resolve_mode(stream: IO[str] | None = None, enabled: bool = True) -> str:
    """``"bar"``, ``"lines"`` or ``"off"`` for this stream, honouring ``$VSEKIT_PROGRESS``."""
    if not enabled:
        return "off"
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced in _MODES:
        return forced
    if forced not in ("", "auto"):
        warnings.warn(f"{ENV_VAR}={forced!r} is not one of bar, lines, off, auto; ignoring it", stacklevel=3)
    stream = sys.stderr if stream is None else stream
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        tty = False
    return "bar" if tty else "lines"


class Progress:
    """Progress handle; this base class is the no-op one (``enabled=False`` / ``off``)."""

    def __init__(self) -> None:
        self.n = 0
        self.closed = False

    def update(self, n: int = 1) -> None:
        """Advance by ``n`` steps."""
        self.n += n

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the bar or at the end of each line (replaces the previous ones).

        A line is written during ``update``, so call this before ``update`` for a line to show this step.
        """

    def close(self) -> None:
        """Finish; safe to call twice."""
        self.closed = True

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _BarProgress(Progress):
    """A live ``tqdm`` bar."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int, stream: IO[str]) -> None:
        super().__init__()
        from tqdm import tqdm  # lazy: keep module import cheap

        self.n = initial
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=False,
                         dynamic_ncols=True, file=stream)

    def update(self, n: int = 1) -> None:
        if self.closed:
            return
        self.n += n
        self._bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        if not self.closed:
            self._bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._bar.close()


def _plural(unit: str) -> str:
    if not unit or unit.endswith("s"):
        return unit
    if unit.endswith(("ch", "sh", "x", "z")):
        return unit + "es"
    return unit + "s"


def _fmt_rate(rate: float) -> str:
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.1f}" if rate >= 10 else f"{rate:.2f}"


def _fmt_elapsed(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s"


class _LineProgress(Progress):
    """Plain, throttled lines for files, pipes and logs."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int, stream: IO[str],
                 every_steps: int | None, every_seconds: float | None, logger: logging.Logger | None,
                 clock: Callable[[], float]) -> None:
        super().__init__()
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self._initial = self._last_n = initial
        if every_steps is None or every_steps <= 0:
            every_steps = max(1, total // 10) if total else 100
        self.every_steps = every_steps
        self.every_seconds = every_seconds if every_seconds and every_seconds > 0 else None
        self._stream, self._logger, self._clock = stream, logger, clock
        self._start = self._last_t = clock()
        self._postfix: dict[str, Any] = {}

    def update(self, n: int = 1) -> None:
        if self.closed:
            return
        self.n += n
        now = self._clock()
        due = self.n - self._last_n >= self.every_steps
        if not due and self.every_seconds is not None:
            due = now - self._last_t >= self.every_seconds
        if due:
            self._last_n, self._last_t = self.n, now
            self._emit(self._line(now))

    def set_postfix(self, **values: Any) -> None:
        self._postfix = dict(values)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        now = self._clock()
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        parts = [f"{self.desc}: done {count} {_plural(self.unit)} in {_fmt_elapsed(now - self._start)}"]
        rate = self._rate(now)
        if rate is not None:
            parts.append(f"({_fmt_rate(rate)} {self.unit}/s)")
        self._emit(" ".join(parts + self._postfix_parts()))

    def _rate(self, now: float) -> float | None:
        elapsed = now - self._start
        return (self.n - self._initial) / elapsed if elapsed > 0 else None

    def _postfix_parts(self) -> list[str]:
        return [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self._postfix.items()]

    def _line(self, now: float) -> str:
        if self.total is not None:
            parts = [f"{self.desc}: {self.n}/{self.total} {_plural(self.unit)}"]
            if self.total > 0:
                parts.append(f"({100 * self.n / self.total:.0f}%)")
        else:
            parts = [f"{self.desc}: {self.n} {_plural(self.unit)}"]
        rate = self._rate(now)
        parts.append(f"{_fmt_rate(rate)} {self.unit}/s" if rate is not None else f"? {self.unit}/s")
        return " ".join(parts + self._postfix_parts())

    def _emit(self, line: str) -> None:
        if self._logger is not None:
            self._logger.info("%s", line)
            return
        try:
            self._stream.write(line + "\n")
            self._stream.flush()
        except (ValueError, OSError):  # closed stream: progress must never break the work
            pass


def progress(total: int | None, *, desc: str, unit: str = "batch", initial: int = 0, enabled: bool = True,
             stream: IO[str] | None = None, every_steps: int | None = None,
             every_seconds: float | None = 30.0, logger: logging.Logger | None = None,
             clock: Callable[[], float] = time.monotonic) -> Progress:
    """A progress handle (bar on a terminal, plain lines elsewhere, no-op when disabled); see module doc."""
    stream = sys.stderr if stream is None else stream
    mode = resolve_mode(stream, enabled)
    if mode == "off":
        return Progress()
    if mode == "bar":
        return _BarProgress(total, desc, unit, initial, stream)
    return _LineProgress(total, desc, unit, initial, stream, every_steps, every_seconds, logger, clock)


def iterate(iterable: Iterable[T], *, desc: str, total: int | None = None, **options: Any) -> Iterator[T]:
    """Yield from ``iterable``, advancing a :func:`progress` (``options``: its keyword arguments) by one per
    item; ``total`` defaults to ``len``."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with progress(total, desc=desc, **options) as bar:
        for item in iterable:
            yield item
            bar.update(1)
