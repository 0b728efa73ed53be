"""Which checkpoints a run writes, and when: the checkpoint policy of the trainer.

``last.pt``: after every epoch (after its validation), every ``train.checkpoint_every_steps`` steps, and when
the run stops early (time budget, collapse); it holds everything ``--resume`` needs. ``best.pt``: whenever
the validation metric (rsum) improves (before ``last.pt``: a kill between the two then repeats the epoch's
end, which writes ``best.pt`` again, instead of leaving a ``last.pt`` past a ``best.pt`` that never came).
Both are written atomically (``vsekit.checkpoint``). When a run starts or resumes in a folder, the temporary
files of writes that a kill cut short are removed (:func:`remove_stale_temp_files`); the metrics log drops
what a resumed run will repeat (:class:`~vsekit.train.logger.MetricsLogger`).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vsekit.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger("vsekit.train")

LAST, BEST = "last.pt", "best.pt"
# what Trainer._restore reads (beyond the model, vocab and config every checkpoint has)
RESUME_KEYS = ("loss", "optimizer", "scheduler", "scaler", "rng", "epoch", "batches_done", "step", "best_rsum",
               "epoch_loss_sum", "history")
# vsekit.utils.io.atomic_write's temporary files: tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp"), whose
# random part is 8 characters of [a-z0-9_]
_ATOMIC_TEMP = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temporary files that :func:`vsekit.utils.io.atomic_write` leaves in ``folder`` when a kill
    cuts a write short (``.last.pt.k2j4_x9a.tmp``); nothing else. Called when a run starts or resumes there:
    no other process writes a run's folder then."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for p in sorted(folder.iterdir()):
        if _ATOMIC_TEMP.fullmatch(p.name) and p.is_file() and not p.is_symlink():
            try:
                p.unlink()
            except FileNotFoundError:
                continue
            removed.append(p)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted write in %s: %s", len(removed), folder,
                 ", ".join(p.name for p in removed))
    return removed


class CheckpointPolicy:
    def __init__(self, out: Path, state: Callable[[], dict[str, Any]], every_steps: int = 0,
                 metric: str = "rsum", writes: bool = True) -> None:
        self.out, self.state, self.every_steps, self.metric = Path(out), state, int(every_steps), metric
        self.best = -math.inf
        self.writes = writes  # False: another process (rank 0 of a distributed run) writes the checkpoints
        if writes:
            remove_stale_temp_files(self.out)

    def resume_state(self, *, allow_legacy: bool = False) -> dict[str, Any]:
        """The state of ``last.pt`` to resume from (a clear error when there is none, or when it lacks what a
        resume needs)."""
        last = self.out / LAST
        if not last.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint {last} to resume from")
        state = load_checkpoint(last, allow_legacy=allow_legacy, require=RESUME_KEYS)
        return state

    def save(self, name: str = LAST) -> Path:
        if not self.writes:
            return self.out / name
        return save_checkpoint(self.out / name, self.state())

    def after_step(self, step: int) -> None:
        if self.every_steps and step % self.every_steps == 0:
            self.save(LAST)

    def is_better(self, metrics: dict[str, float]) -> bool:
        return float(metrics[self.metric]) > self.best

    def after_epoch(self, metrics: dict[str, float]) -> bool:
        """After an epoch and its validation: ``last.pt``, and ``best.pt`` when the metric improved."""
        improved = self.is_better(metrics)
        if improved:
            self.best = float(metrics[self.metric])
            self.save(BEST)
        self.save(LAST)
        return improved

    def after_partial_epoch(self, metrics: dict[str, float]) -> bool:
        """After a time stop mid-epoch (``last.pt`` was saved before validating): ``best.pt`` if better."""
        improved = self.is_better(metrics)
        if improved:
            self.best = float(metrics[self.metric])
            self.save(BEST)
        return improved
