"""Stopping a training run cleanly on SIGTERM and SIGINT.

SLURM and Kubernetes preempt a job with SIGTERM (and SIGKILL after a grace period); a user stops one with
Ctrl-C (SIGINT). While :class:`StopSignals` is active, either signal only *asks* the run to stop: the trainer
finishes the current step, saves the exact state to ``last.pt`` as a ``train.max_minutes`` stop does, and
raises :class:`TrainingInterrupted`, which the command line reports in one line with exit code 128 + the
signal's number (143 for SIGTERM, 130 for SIGINT). ``--resume`` then continues as if nothing had happened.

A second signal: SIGTERM again is ignored (a launcher such as torchrun forwards the scheduler's SIGTERM, so a
process may receive it twice; the scheduler's SIGKILL ends a stop that takes too long). SIGINT again stops at
once, like Ctrl-C always does, except while a checkpoint is being written (:func:`critical`): that write is
finished first. Checkpoints are written atomically anyway, so no signal can leave a half-written one.

Handlers can only be installed in the main thread; elsewhere :class:`StopSignals` leaves signals alone.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("vsekit.train")

_critical = 0  # > 0 while a checkpoint is written: a second SIGINT waits for its end
_deferred = False  # a second SIGINT came during a critical write


class TrainingInterrupted(Exception):
    """A run stopped by SIGTERM or SIGINT after saving its exact state; ``signum`` is the signal's number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """A block (a checkpoint write) that a second SIGINT does not cut short: it stops the run after the block."""
    global _critical, _deferred
    _critical += 1
    try:
        yield
    finally:
        _critical -= 1
        if not _critical and _deferred:
            _deferred = False
            raise KeyboardInterrupt


class StopSignals:
    """While active (``with StopSignals() as stop``), SIGTERM and SIGINT set :attr:`signum` instead of ending the
    process; the trainer looks at it after every step. The previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        global _deferred
        name = signal_name(signum)
        if self.signum is None:
            self.signum = signum
            again = "" if signum == signal.SIGTERM else " (again: stop at once, without saving)"
            log.warning("%s received: stopping after this step and saving the state%s", name, again)
            return
        if signum != signal.SIGINT:
            log.warning("%s received again: already stopping", name)
            return
        if _critical:
            log.warning("%s received again: stopping once the checkpoint being written is complete", name)
            _deferred = True
            return
        raise KeyboardInterrupt


def worker_init(worker_id: int) -> None:
    """A data loader worker leaves SIGINT (a terminal's Ctrl-C reaches the whole process group) to the main
    process, which stops the run; SIGTERM keeps its default (the loader ends its workers with it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
