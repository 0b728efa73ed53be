"""The metrics log of a run: ``metrics.jsonl`` (one JSON record per line) and, when installed, TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vsekit.utils.io import atomic_write_text


class MetricsLogger:
    """Appends records to ``<run>/metrics.jsonl`` and mirrors their numbers to TensorBoard.

    ``resume_step``: a resumed run replays the steps after its checkpoint, so the records an interrupted run
    wrote after that step (and the validation records of epochs the checkpoint had not finished) are dropped
    first; the log then reads as one uninterrupted run. Without it (a new
    run), an old log in the folder is replaced.
    """

    def __init__(self, out: Path, resume_step: int | None = None, resume_epoch: int | None = None,
                 enabled: bool = True) -> None:
        self.path = Path(out) / "metrics.jsonl"
        self.enabled = enabled  # False: another process (rank 0 of a distributed run) writes the log
        self.tb = None
        if not enabled:
            return
        if self.path.is_file():
            if resume_step is not None:
                self._truncate_after(resume_step, resume_epoch)
            else:  # a new run in an old folder: its checkpoints are replaced, so is its log
                self.path.unlink()
        self.tb = _tensorboard(Path(out))

    def _truncate_after(self, step: int, epoch: int | None) -> None:
        """Keep what the checkpoint at (``step``, ``epoch`` finished epochs) already covers. An epoch's end logs
        its validation at the step of its last batch and then writes ``last.pt``: a kill between the two leaves
        a record at the checkpoint's own step that the resumed run logs again, so validation records of
        unfinished epochs go too (those of a time stop, ``partial_epoch``, are not repeated and stay)."""
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if not isinstance(record, dict) or int(record.get("step", 0)) > step:
                continue
            if (epoch is not None and record.get("kind") == "val" and not record.get("partial_epoch")
                    and int(record.get("epoch", -1)) >= epoch):
                continue
            kept.append(line)
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def log(self, record: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk, a file-size limit: name the log (a failed write names no file)
            if e.filename is not None or e.errno is None:
                raise
            raise type(e)(e.errno, e.strerror, str(self.path)) from e
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
