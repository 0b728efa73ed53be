"""The metrics log of a run: ``metrics.jsonl`` (one JSON record per line) and, when installed, TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vsekit.utils.io import atomic_write_text


class MetricsLogger:
    """Appends records to ``<run>/metrics.jsonl`` and mirrors their numbers to TensorBoard.

    ``resume_step``: a resumed run replays the steps after its checkpoint, so the records an interrupted run
    wrote after that step are dropped first; the log then reads as one uninterrupted run.
    """

    def __init__(self, out: Path, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.path = Path(out) / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            self._truncate_after(resume_step)
        self.tb = _tensorboard(Path(out)) if tensorboard else None

    def _truncate_after(self, step: int) -> None:
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if int(record.get("step", 0)) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def log(self, record: dict[str, Any], step: int) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            kind = record.get("kind", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step"):
                    self.tb.add_scalar(f"{kind}/{k}", v, record.get("step", step))

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard is optional
        return None
    return SummaryWriter(str(out / "tb"))
