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
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vsekit.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vsekit.errors import ConfigError
from vsekit.registry import short_repr
from vsekit.train.signals import critical
from vsekit.utils.io import check_writable_dir

log = logging.getLogger("vsekit.train")

LAST, BEST = "last.pt", "best.pt"
# what Trainer.load_state_dict reads (beyond the model, vocab and config every checkpoint has)
RESUME_KEYS = ("loss", "optimizer", "scheduler", "scaler", "rng", "epoch", "batches_done", "step", "best_rsum",
               "epoch_loss_sum", "history")
# vsekit.utils.io.atomic_write's temporary files: tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp"), whose
# random part is 8 characters of [a-z0-9_]
_ATOMIC_TEMP = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
# what a finished or interrupted run leaves in its folder; a new run there would replace it
RUN_FILES = (LAST, BEST, "metrics.jsonl")
# config keys (and sections) a resumed run may change: how long it trains, how it logs, checkpoints and watches
# itself (train.collapse: read afresh at every step), where it runs and where its images lie. Any other change (the model, the loss, the optimizer, the data)
# would not apply to the saved state (an optimizer's lr lives in its state) or would not fit it.
RESUMABLE_KEYS = (
    "name", "output_dir", "device", "config_format",
    "train.epochs", "train.max_minutes", "train.max_steps_per_epoch", "train.progress", "train.log_every",
    "train.checkpoint_every_steps", "train.max_nonfinite_steps", "train.init_from", "train.collapse",
    "data.num_workers", "data.image_cache_mb", "data.image_root", "eval.batch_size", "eval.chunk_size", "semantics.cache_dir",
)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temporary files that :func:`vsekit.utils.io.atomic_write` leaves in ``folder`` when a kill
    cuts a write short (``.last.pt.k2j4_x9a.tmp``); nothing else. Called when a run starts or resumes there:
    no other process writes a run's folder then."""
    folder, removed = Path(folder), []
    for p in sorted(folder.iterdir()) if folder.is_dir() else ():
        if _ATOMIC_TEMP.fullmatch(p.name) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted write in %s: %s", len(removed), folder,
                 ", ".join(p.name for p in removed))
    return removed


def check_new_run(folder: str | Path, *, overwrite: bool = False) -> None:
    """Before a new (not resumed) run writes to ``folder``: refuse when an earlier run's checkpoints or log are
    there, unless ``overwrite``, which removes them first (a stale ``best.pt`` must not outlive the new run's
    start)."""
    folder = Path(folder)
    found = [name for name in RUN_FILES if (folder / name).exists()]
    if not found:
        return
    if not overwrite:
        raise ConfigError(f"{folder} already holds a run ({', '.join(found)}): pass --resume to continue it, "
                          "--overwrite to replace it, or choose another output_dir")
    for name in found:
        (folder / name).unlink()
    log.info("--overwrite: removed %s of the earlier run in %s", ", ".join(found), folder)


def prepare_output_dir(out: Path, init_from: str | None, *, resume: bool, overwrite: bool) -> None:
    """Before anything of a run is built: the output folder exists and can be written (a probe file, so that a
    read-only folder is said now, not after the first epoch), and a new run does not silently replace an
    earlier one's checkpoints (:func:`check_new_run`) nor the ``train.init_from`` it starts from."""
    check_writable_dir(out, "output_dir")
    if not resume:
        init = Path(init_from) if init_from else None
        if overwrite and init and init.name in RUN_FILES and init.resolve().parent == out.resolve():
            raise ConfigError(f"train.init_from {init} lies in output_dir {out}, whose checkpoints a new "
                              "run replaces: copy it elsewhere first, or choose another output_dir")
        check_new_run(out, overwrite=overwrite)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict) or not d:
        return {prefix: d}
    return {key: v for k, sub in d.items()
            for key, v in _flat(sub, f"{prefix}.{k}" if prefix else str(k)).items()}


def _resumable(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in RESUMABLE_KEYS)


ABSENT = "(absent)"  # how a key one side lacks is shown


def config_changes(saved: dict[str, Any], current: dict[str, Any],
                   schema: type | None = None) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) of every config key that differs between a checkpoint's config and
    the resumed run's, but for :data:`RESUMABLE_KEYS`; a section whose component changed shows in its name.

    A key one side lacks is a change when it lies in a free-form mapping of the config ``schema`` (the
    pydantic model of the config: an ``optim.lr_mult`` entry, a component's option, ``objective.terms``, a
    ``model.similarity`` given as a mapping instead of a name): those hold what the user wrote, and adding one
    changes the run as much as editing one. A field of a typed section that one side lacks (added to or
    dropped from vsekit's schema since the checkpoint) is not; without ``schema``, no missing key is."""
    old, new = _flat(saved), _flat(current)
    changes = [(k, old[k], new[k]) for k in sorted(old.keys() & new.keys())
               if not _resumable(k) and old[k] != new[k] and not _same_number(old[k], new[k])]
    if schema is not None:
        for k in sorted(old.keys() ^ new.keys()):
            if not _resumable(k) and _in_free_form_mapping(schema, k.split(".")):
                changes.append((k, old.get(k, ABSENT), new.get(k, ABSENT)))
    return sorted(changes, key=lambda c: c[0])


def _in_free_form_mapping(schema: Any, parts: list[str]) -> bool:
    """Whether the config key ``parts`` reaches into a ``dict`` field of ``schema`` (its keys are the user's,
    not vsekit's), walking typed sections (pydantic models, or a union of them) by their field names."""

    def arms(annotation: Any) -> tuple[Any, ...]:
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            return tuple(a for arm in typing.get_args(annotation) for a in arms(arm))
        if typing.get_origin(annotation) is typing.Annotated:
            return arms(typing.get_args(annotation)[0])
        return (annotation,)

    candidates = arms(schema)
    for i, part in enumerate(parts):
        models = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        if not fields:  # not a field of a typed section: a free-form mapping's key if one may hold it
            return i > 0 and any(c is dict or typing.get_origin(c) is dict for c in candidates)
        candidates = tuple(a for f in fields for a in arms(f.annotation))
    return False


def _same_number(a: Any, b: Any) -> bool:
    """1e-3 and 0.001, [0.9, 0.999] and (0.9, 0.999): a YAML round trip, not a change."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(x == y or _same_number(x, y) for x, y in zip(a, b))
    numbers = (int, float)
    return isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and float(a) == float(b)


def check_resume_config(saved: dict[str, Any], current: dict[str, Any], path: str | Path,
                        schema: type | None = None) -> None:
    """Refuse to resume the checkpoint at ``path`` under a config that changes more than
    :data:`RESUMABLE_KEYS`: one line listing each changed key with its old and new value (``schema``: the
    config's pydantic model, see :func:`config_changes`)."""
    changes = config_changes(saved, current, schema)
    if changes:
        listed = "; ".join(f"{k}: {short_repr(a, 40)} -> {short_repr(b, 40)}" for k, a, b in changes[:8])
        more = f" and {len(changes) - 8} more" if len(changes) > 8 else ""
        raise CheckpointError(f"--resume: the config differs from the one {path} was trained with ({listed}{more}); "
                              "a resumed run may change only how long it trains, how it logs and checkpoints "
                              "(train.epochs, train.max_minutes, ...) and where it runs: undo the change, or "
                              "start a new run in another output_dir (train.init_from to start from its weights)")


class CheckpointPolicy:
    def __init__(self, out: Path, state: Callable[[], dict[str, Any]], every_steps: int = 0,
                 metric: str = "rsum", writes: bool = True) -> None:
        self.out, self.state, self.every_steps, self.metric = Path(out), state, int(every_steps), metric
        self.best = -math.inf
        self.writes = writes  # False: another process (rank 0 of a distributed run) writes the checkpoints
        if writes:
            remove_stale_temp_files(self.out)

    def resume_state(self) -> dict[str, Any]:
        """The state of ``last.pt`` to resume from (a clear error when there is none, or when it lacks what a
        resume needs)."""
        last = self.out / LAST
        if not last.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint {last} to resume from")
        return load_checkpoint(last, require=RESUME_KEYS)

    def start_states(self, cfg: Any, resume: bool) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The checkpoints a run starts from, before its model is built: ``last.pt`` to resume (under a config
        ``cfg`` that changes only :data:`RESUMABLE_KEYS`: a changed embed_size would not fit it), else
        ``train.init_from``'s weights (e.g. VSE++ FT stage 2); None for what it does not have."""
        if resume:
            state = self.resume_state()
            check_resume_config(state["config"], cfg.to_dict(), self.out / LAST, schema=type(cfg))
            return state, None
        return None, load_checkpoint(cfg.train.init_from) if cfg.train.init_from else None

    def save(self, name: str = LAST) -> Path:
        if not self.writes:
            return self.out / name
        with critical():  # a second Ctrl-C waits for the write to end (it is atomic anyway)
            return save_checkpoint(self.out / name, self.state())

    def after_step(self, step: int) -> None:
        if self.every_steps and step % self.every_steps == 0:
            self.save(LAST)

    def after_partial_epoch(self, metrics: dict[str, float]) -> bool:
        """After a time stop mid-epoch (``last.pt`` was saved before validating): ``best.pt`` if better."""
        improved = float(metrics[self.metric]) > self.best
        if improved:
            self.best = float(metrics[self.metric])
            self.save(BEST)
        return improved

    def after_epoch(self, metrics: dict[str, float]) -> bool:
        """After an epoch and its validation: ``best.pt`` when the metric improved, then ``last.pt``."""
        improved = self.after_partial_epoch(metrics)
        self.save(LAST)
        return improved
