"""Which checkpoints a run writes, and when: the checkpoint policy of the trainer.

``last.pt``: after every epoch (after its validation), every ``train.checkpoint_every_steps`` steps, and when
the run stops early (time budget, collapse); it holds everything ``--resume`` needs. ``best.pt``: whenever
the validation metric (rsum) improves. Both are written atomically (``vsekit.checkpoint``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vsekit.checkpoint import load_checkpoint, save_checkpoint

LAST, BEST = "last.pt", "best.pt"


class CheckpointPolicy:
    def __init__(self, out: Path, state: Callable[[], dict[str, Any]], every_steps: int = 0,
                 metric: str = "rsum") -> None:
        self.out, self.state, self.every_steps, self.metric = Path(out), state, int(every_steps), metric
        self.best = -math.inf

    def resume_state(self) -> dict[str, Any]:
        """The state of ``last.pt`` to resume from (a clear error when there is none)."""
        last = self.out / LAST
        if not last.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint {last} to resume from")
        return load_checkpoint(last)

    def save(self, name: str = LAST) -> Path:
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
        self.save(LAST)
        if improved:
            self.save(BEST)
        return improved

    def after_partial_epoch(self, metrics: dict[str, float]) -> bool:
        """After a time stop mid-epoch (``last.pt`` was saved before validating): ``best.pt`` if better."""
        improved = self.is_better(metrics)
        if improved:
            self.best = float(metrics[self.metric])
            self.save(BEST)
        return improved
