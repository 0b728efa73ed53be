"""Stopping a training run cleanly on SIGTERM, SIGINT and SIGHUP or when its time budget is spent, and other
commands in one line (what a user sees: docs/training.md, "Stopping, resuming, and what may change").

While :class:`StopSignals` is active, a signal only *asks* the run to stop: the trainer finishes the current
step, saves the exact state to ``last.pt`` as a ``train.max_minutes`` stop does, and raises
:class:`TrainingInterrupted` (exit code 128 + the signal's number). SIGTERM again is ignored: a launcher such
as torchrun forwards the scheduler's SIGTERM, so a process may receive it twice. SIGINT again stops at once,
except while a checkpoint is being written (:func:`critical`). SIGHUP stops a run as SIGTERM does, unless it
is ignored (``nohup``). Outside training (:func:`terminate_raises`), SIGTERM and SIGHUP raise
:class:`Terminated`, so that a killed ``index build`` removes its work folders.

Handlers can only be installed in the main thread; elsewhere both leave signals alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from vsekit.utils import distributed

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


# SIGHUP: the terminal of an ssh session that ran the command closed. Where it is ignored (``nohup``), it
# stays ignored; elsewhere it stops a command as SIGTERM does (exit 129).
_HANGUP = (signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()


def _handled(signals_: tuple[int, ...]) -> list[int]:
    """The signals of ``signals_`` that this process does not ignore (a SIGHUP under ``nohup`` stays ignored)."""
    return [s for s in signals_ if s not in _HANGUP or signal.getsignal(s) is not signal.SIG_IGN]


class Terminated(BaseException):
    """SIGTERM or SIGHUP outside training, raised in the main thread as Ctrl-C raises KeyboardInterrupt (not an
    ``Exception``: nothing catches it by accident), so that ``finally`` blocks remove work folders and the
    command line says one line; ``signum`` is the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal_name(signum)}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """While active, SIGTERM and SIGHUP raise :class:`Terminated` instead of ending the process at once (a
    killed ``index build`` left its work folder in the new index folder, and said nothing). Training
    replaces these handlers with :class:`StopSignals` while it runs. Only in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    owner = os.getpid()

    def handle(signum: int, frame: object) -> None:
        if os.getpid() != owner:  # a forked child (a data loader worker): ends as it did before, by the signal
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Terminated(signum)

    previous = {s: signal.signal(s, handle) for s in _handled((signal.SIGTERM, *_HANGUP))}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


class StopSignals:
    """While active (``with StopSignals() as stop``), SIGTERM, SIGINT and SIGHUP (unless ignored) set
    :attr:`signum` instead of ending the process; the trainer looks at it after every step. The previous
    handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, *_HANGUP)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in _handled(self.SIGNALS):
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
            again = "" if signum != signal.SIGINT else " (again: stop at once, without saving)"
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


def agreed_signal(stop: StopSignals | None, device: torch.device) -> int | None:
    """The signal that asked the run to stop (None: none); every process of a distributed run agrees on it
    (the signal may reach only some of them), so that all stop at the same step."""
    signum = stop.signum if stop is not None else None
    if distributed.world().distributed:
        flag = torch.tensor([signum or 0], dtype=torch.long, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        signum = int(flag.item()) or None
    return signum


class TimeBudget:
    """``train.max_minutes``: the seconds of training in an output folder, earlier (resumed) runs included
    (:attr:`before`, from the checkpoint); :meth:`spent` stops a run as a signal does, with its state saved."""

    def __init__(self, max_minutes: float | None) -> None:
        self.max_seconds = max_minutes * 60 if max_minutes is not None else None
        self.before = 0.0
        self._t_start = time.perf_counter()

    @property
    def elapsed_s(self) -> float:
        return self.before + (time.perf_counter() - self._t_start)

    def spent(self) -> bool:
        """Whether the budget is spent (rank 0's clock decides for every process)."""
        limit = self.max_seconds
        return limit is not None and bool(distributed.broadcast_object(self.elapsed_s >= limit))


def worker_init(worker_id: int) -> None:
    """A data loader worker leaves SIGINT (a terminal's Ctrl-C reaches the whole process group) to the main
    process, which stops the run; SIGTERM keeps its default (the loader ends its workers with it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
