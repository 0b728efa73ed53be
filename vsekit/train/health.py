"""A run's health, one part with its own state: the collapse detector (:mod:`vsekit.train.monitor`), the
epoch's diagnostics, steps skipped for a non-finite loss or gradient, and unreadable training images.

:class:`TrainingHealth` watches every step, acts as ``train.collapse`` and ``train.max_nonfinite_steps`` say
(warn, fall back to the sum of hinges at a lower learning rate, or stop with the state saved), and saves and
restores all of it as a checkpoint's ``monitor`` section, so that a resumed run acts as the uninterrupted one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vsekit.config.schema import TrainConfig
from vsekit.data.batch import Batch
from vsekit.data.corpus import Corpus
from vsekit.errors import TrainingCollapsed, TrainingDiverged
from vsekit.eval.chance import chance_rsum
from vsekit.losses.base import RankingLoss
from vsekit.train.monitor import (
    ADVICE,
    CollapseDetector,
    EpochDiagnostics,
    batch_diagnostics,
    collapse_symptom,
    collapse_value,
)
from vsekit.train.optim import OptimizerSet

log = logging.getLogger("vsekit.train")


class TrainingHealth:
    """Watches the steps of a run. ``record`` writes a line to the metrics log; ``save_last`` writes ``last.pt``
    before the run is stopped and returns its path; ``optim`` and ``loss_fn`` are what a collapse fallback
    changes; ``corpus`` names the captions of a skipped step."""

    def __init__(self, tcfg: TrainConfig, loss_fn: RankingLoss, optim: OptimizerSet, corpus: Corpus,
                 record: Callable[[dict[str, Any]], None], save_last: Callable[[], Path]) -> None:
        self.opts, self.max_nonfinite = tcfg.collapse, tcfg.max_nonfinite_steps
        self.loss_fn, self.optim, self.corpus, self.record, self.save_last = loss_fn, optim, corpus, record, save_last
        c = tcfg.collapse
        self.detector = CollapseDetector(c.patience, c.loss_tol, c.max_mean_cos)
        self.diagnostics = EpochDiagnostics()
        self.last_diag: dict[str, float] = {}
        self.last_collapse_value: float | None = None  # None: not computed for this step
        self.nonfinite_streak, self.nonfinite_total = 0, 0  # steps skipped for a NaN/inf loss or gradient
        self.nonfinite_what = ""
        self.skipped_images: set[str] = set()  # unreadable images met in training (data.skip_missing_images)

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"detector": self.detector.state_dict(), "diagnostics": self.diagnostics.state_dict(),
                "sum_until_epoch": int(self.loss_fn.sum_until_epoch),
                "nonfinite": [self.nonfinite_streak, self.nonfinite_total],
                "skipped_images": sorted(str(m) for m in self.skipped_images)}

    def load_state_dict(self, monitor: dict[str, Any]) -> None:
        self.detector.load_state_dict(monitor.get("detector") or {})
        self.diagnostics.load_state_dict(monitor.get("diagnostics") or {})
        if monitor.get("sum_until_epoch"):
            self.loss_fn.fall_back_to_sum(int(monitor["sum_until_epoch"]))
        self.nonfinite_streak, self.nonfinite_total = (int(v) for v in monitor.get("nonfinite", (0, 0)))
        self.skipped_images = set(monitor.get("skipped_images", ()))

    # -- the log -------------------------------------------------------------------------------------
    def step_record(self) -> dict[str, Any]:
        """What a training log line says about the last step's health."""
        record: dict[str, Any] = dict(self.last_diag)
        if self.last_collapse_value is not None:
            record["collapse_value"] = self.last_collapse_value
        return record

    def epoch_record(self) -> dict[str, Any]:
        """What a validation log line says about the epoch's health."""
        return {**{f"train_{k}": v for k, v in self.diagnostics.means().items()},
                "skipped_images": len(self.skipped_images), "nonfinite_steps": self.nonfinite_total}

    def new_epoch(self) -> None:
        self.diagnostics = EpochDiagnostics()

    # -- each step -----------------------------------------------------------------------------------
    def note_skipped(self, messages: list[str]) -> None:
        for m in map(str, messages):  # plain strings (a Skipped marker is a str subclass)
            if m not in self.skipped_images:
                self.skipped_images.add(m)
                log.warning("skipping an unreadable training image (data.skip_missing_images): %s", m)

    def observe(self, out: Any, batch: Batch, parts: dict[str, torch.Tensor]) -> None:
        """A step with a finite loss (``out`` and ``batch`` global under torchrun): the joint space's
        diagnostics, and the loss's collapse value on this batch."""
        self.last_diag = batch_diagnostics(out.sim, out.image_emb, out.caption_emb, batch.image_ids)
        self.diagnostics.add({**self.last_diag, **{f"term_{k}": float(v) for k, v in parts.items()
                                                   if len(parts) > 1}})
        self.last_collapse_value = None
        if "loss" in parts and self.opts.action != "off":
            self.last_collapse_value = collapse_value(self.loss_fn, out.sim, batch.image_ids, batch.caption_vectors)

    def taken(self) -> None:
        """A step was taken: the run of skipped ones ends."""
        self.nonfinite_streak = 0

    def nonfinite(self, batch: Batch, what: str, value: float, epoch: int, step: int) -> None:
        """A step with a non-finite loss or gradient: skipped (no update), reported with the batch's captions."""
        self.nonfinite_streak += 1
        self.nonfinite_total += 1
        ids = self.corpus.caption_ids or [str(j) for j in range(self.corpus.num_captions)]
        shown = [ids[int(j)] for j in batch.caption_idx[:5]]
        more = len(batch.caption_idx) - len(shown)
        log.warning("step %d: the %s is %s; step skipped (captions %s%s)", step + 1, what, value,
                    ", ".join(shown), f" and {more} more" if more > 0 else "")
        self.record({"kind": "nonfinite", "epoch": epoch, "step": step + 1, "what": what,
                     "value": str(value), "captions": shown})
        self.nonfinite_what = what
        return None

    def after_step(self, skipped: bool, parts: dict[str, torch.Tensor], *, epoch: int, step: int,
                   batches_done: int, best: float) -> None:
        """After step ``step``: ``train.max_nonfinite_steps`` skipped steps in a row stop the run (state saved);
        a taken step feeds the collapse detector (:meth:`check_collapse`)."""
        if not skipped:
            self.check_collapse(parts, epoch=epoch, step=step, batches_done=batches_done, best=best)
        elif self.nonfinite_streak >= self.max_nonfinite:
            path = self.save_last()
            raise TrainingDiverged(
                f"training stopped at step {step}: {self.nonfinite_streak} steps in a row had a non-finite "
                f"{self.nonfinite_what}. Lower optim.lr, set optim.grad_clip, switch train.amp off, or check the data "
                f"for NaN/inf features and broken captions. The last state is in {path}.")

    # -- collapse ------------------------------------------------------------------------------------
    def check_collapse(self, parts: dict[str, torch.Tensor], *, epoch: int, step: int, batches_done: int,
                       best: float) -> None:
        """Feed the detector; when it fires, act as ``train.collapse.action`` says -- at once when the embeddings
        are squeezed, after the epoch's validation when only the loss is pinned (a plateau of a run that still
        learns looks the same: :mod:`vsekit.train.monitor`). ``best``: the best validation so far."""
        d, opts = self.last_diag, self.opts
        if opts.action == "off" or not d:
            return
        loss = float(parts["loss"]) if "loss" in parts else float("nan")
        cv = self.last_collapse_value or 0.0
        if not self.detector.update(loss, cv, d["image_mean_cos"], d["caption_mean_cos"]):
            return
        event = {"epoch": epoch, "step": step, "loss": loss, "collapse_value": cv,
                 "image_mean_cos": d["image_mean_cos"], "caption_mean_cos": d["caption_mean_cos"]}
        if self.detector.is_squeezed(d["image_mean_cos"], d["caption_mean_cos"]):
            self.act_on_collapse(event, epoch=epoch, batches_done=batches_done)
        elif self.detector.pending is None:
            # None before any validation (JSON has no -inf for the log line and the checkpoint)
            self.detector.pending = {**event, "best_before": best if math.isfinite(best) else None}
            log.info("step %d: the loss has stayed at its collapse value (%.4g) for %d steps while the embeddings "
                     "are spread; this epoch's validation decides whether the run is still learning", step, cv,
                     opts.patience)

    def judge_suspected_collapse(self, metrics: dict[str, float], metric: str, val_corpus: Corpus, *, epoch: int,
                                 batches_done: int) -> None:
        """After a validation: a suspected collapse is dismissed if the run is learning, acted on otherwise."""
        pending, self.detector.pending = self.detector.pending, None
        if pending is None or metric not in metrics:
            return
        value = float(metrics[metric])
        chance = None
        if metric == "rsum" and val_corpus.num_images:
            chance = chance_rsum(np.asarray(val_corpus.caption_to_image), val_corpus.num_images)
        best_before = pending.pop("best_before")
        if self.detector.still_learning(value, best_before, chance):
            event = {**pending, "action": "none", "validation": value, "best_before": best_before}
            self.detector.events.append(event)
            self.record({"kind": "collapse", **event})
            before = f"best before {best_before:.2f}" if best_before is not None else "first validation"
            log.info("not a collapse: the loss sat at its collapse value from step %d, but validation %s rose to "
                     "%.2f (%s): training goes on unchanged", pending["step"], metric, value, before)
            return
        self.act_on_collapse({**pending, "validation": value, "best_before": best_before}, epoch=epoch,
                             batches_done=batches_done)

    def act_on_collapse(self, event: dict[str, Any], *, epoch: int, batches_done: int) -> None:
        opts = self.opts
        action = opts.action
        fallbacks = sum(e["action"] == "fallback" for e in self.detector.events)
        if action == "fallback" and fallbacks >= opts.max_fallbacks:
            action = "stop"
        event = {**event, "action": action}
        symptom = collapse_symptom(event["loss"], event["collapse_value"], event["image_mean_cos"],
                                   event["caption_mean_cos"])
        if action == "fallback":
            # the rest of this epoch and fallback_epochs more; decided at an epoch's end: the next ones
            until = epoch + (1 + opts.fallback_epochs if batches_done else max(1, opts.fallback_epochs))
            event["sum_of_hinges_until_epoch"] = until if self.loss_fn.fall_back_to_sum(until) else None
            event["lr"] = self.optim.scale_lr(opts.lr_factor)
            log.warning("step %d: %s. Falling back: %s, learning rate x%g -> %.3g.", event["step"], symptom,
                        f"sum of hinges until epoch {until}" if event["sum_of_hinges_until_epoch"] else
                        "(this loss has no sum-of-hinges form)", opts.lr_factor, event["lr"])
        elif action == "warn":
            log.warning("step %d: %s. %s", event["step"], symptom, ADVICE)
        self.detector.events.append(event)
        self.record({"kind": "collapse", **event})
        if action == "stop":
            path = self.save_last()
            raise TrainingCollapsed(f"training stopped at step {event['step']} (epoch {event['epoch'] + 1}): "
                                    f"{symptom}. {ADVICE} The last state is in {path}.")
