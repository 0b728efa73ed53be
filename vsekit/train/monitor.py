"""Training health: per-batch diagnostics of the joint space and a detector for collapsed embeddings.

A hinge loss with the hardest negative (VSE++'s max of hinges) has a trap: when every image and every
caption maps to (nearly) one point, every similarity is equal, every hinge equals the margin and the
gradient through the max is too weak to leave. The loss then sits at its *collapse value* (2·B·α for the
max of hinges). The detector watches for that (the loss within ``loss_tol`` of the value the loss takes on
a constant similarity matrix, or a mean pairwise cosine near 1 in either modality) for ``patience``
consecutive steps, and the trainer then acts as ``train.collapse.action`` says.

A pinned loss is not always a collapse: from pretrained features the max of hinges sits on it for hundreds
of steps while the hardest negatives are overtaken one by one and validation climbs (the measurements:
docs/training.md, "Collapse"). So a pinned loss with spread embeddings is only a *suspected* collapse
(:attr:`CollapseDetector.pending`), which the epoch's validation decides
(:meth:`CollapseDetector.still_learning`). Embeddings squeezed into one direction are acted on at once.

:class:`TrainingHealth` is the part of a run that owns all of this, with the steps skipped for a non-finite loss
or gradient and the unreadable training images: it watches every step, acts as ``train.collapse`` and
``train.max_nonfinite_steps`` say, and is saved and restored as a checkpoint's ``monitor`` section.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vsekit.config.schema import TrainConfig
from vsekit.data.batch import Batch
from vsekit.data.corpus import Corpus
from vsekit.errors import TrainingCollapsed, TrainingDiverged
from vsekit.eval.chance import chance_rsum
from vsekit.losses.base import RankingLoss, same_image_mask

if TYPE_CHECKING:
    from vsekit.train.optim import OptimizerSet

log = logging.getLogger("vsekit.train")
LEARNING_OVER_CHANCE = 3.0  # a first validation this many times the chance rsum: learning, not collapsed

def mean_pairwise_cosine(x: Tensor) -> Tensor:
    """Mean cosine similarity over the B·(B-1) ordered pairs of distinct rows (1 = all rows parallel)."""
    b = x.shape[0]
    if b < 2:
        return x.new_tensor(float("nan"))
    u = F.normalize(x.float(), dim=1)
    total = u.sum(0)
    return (total @ total - (u * u).sum()) / (b * (b - 1))


@torch.no_grad()
def batch_diagnostics(sim: Tensor, image_emb: Tensor, caption_emb: Tensor, image_ids: Tensor) -> dict[str, float]:
    """Mean positive similarity, mean hardest (true) negative similarity both ways, and the embedding spread.

    ``sim`` is the (B, B) image-by-caption similarity with the positives on the diagonal; a negative is a
    pair of different images (captions of the same image are not counted as negatives here).
    """
    sim = sim.detach().float()
    negative = ~same_image_mask(image_ids.to(sim.device))
    low = torch.finfo(sim.dtype).min
    masked = sim.masked_fill(~negative, low)
    hard_i2t, hard_t2i = masked.max(1).values, masked.max(0).values
    hard = torch.cat([hard_i2t[negative.any(1)], hard_t2i[negative.any(0)]])
    return {
        "pos_sim": float(sim.diagonal().mean()),
        "hardest_neg_sim": float(hard.mean()) if hard.numel() else float("nan"),
        "image_mean_cos": float(mean_pairwise_cosine(image_emb.detach())),
        "caption_mean_cos": float(mean_pairwise_cosine(caption_emb.detach())),
    }


@torch.no_grad()
def collapse_value(loss_fn: RankingLoss, sim: Tensor, image_ids: Tensor,
                   caption_vectors: Tensor | None = None) -> float:
    """The value ``loss_fn`` takes on this batch when every similarity is equal (all embeddings at one point).

    Computed, not looked up: 2·B·α for the max of hinges, 2·B·(B-1)·α for the sum, the mean of LSEH's
    per-pair margins for LSEH, log B for InfoNCE, so any registered loss gets a detector.
    """
    constant = torch.zeros_like(sim, dtype=torch.float32)
    return float(loss_fn(constant, image_ids, caption_vectors=caption_vectors))


@dataclass
class CollapseDetector:
    """Counts consecutive collapsed steps; :meth:`update` returns True once the count reaches ``patience``.

    The count restarts after it fires, so a run that stays collapsed fires again ``patience`` steps later.
    Its state (:meth:`state_dict`) is saved in checkpoints so that a resumed run acts as the uninterrupted one.
    """

    patience: int = 50
    loss_tol: float = 0.02
    max_mean_cos: float = 0.98
    streak: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)
    pending: dict[str, Any] | None = None  # a suspected collapse (pinned loss only) awaiting the epoch's validation

    def is_collapsed(self, loss: float, collapse: float, image_mean_cos: float, caption_mean_cos: float) -> bool:
        pinned = collapse > 0 and abs(loss - collapse) <= self.loss_tol * collapse
        return bool(pinned or self.is_squeezed(image_mean_cos, caption_mean_cos))

    def is_squeezed(self, image_mean_cos: float, caption_mean_cos: float) -> bool:
        """Either modality's embeddings pressed into one direction: a collapse whatever the loss says."""
        return bool(max(image_mean_cos, caption_mean_cos) > self.max_mean_cos)

    @staticmethod
    def still_learning(value: float, best_before: float | None, chance: float | None) -> bool:
        """Whether a validation ``value`` shows the run learning despite a pinned loss: above the best before the
        suspicion, or -- with no earlier validation (``best_before`` None) -- well above what random embeddings
        score."""
        if best_before is not None:
            return value > best_before
        return chance is not None and value > LEARNING_OVER_CHANCE * chance

    def update(self, loss: float, collapse: float, image_mean_cos: float, caption_mean_cos: float) -> bool:
        collapsed = self.is_collapsed(loss, collapse, image_mean_cos, caption_mean_cos)
        self.streak = self.streak + 1 if collapsed else 0
        if self.streak >= self.patience:
            self.streak = 0
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self.streak, "events": list(self.events), "pending": self.pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak = int(state.get("streak", 0))
        self.events = list(state.get("events", []))
        self.pending = state.get("pending")


class EpochDiagnostics:
    """Running means of :func:`batch_diagnostics` over an epoch (NaN entries skipped)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            if v == v:  # not NaN
                self.sums[k] = self.sums.get(k, 0.0) + v
                self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums, self.counts = dict(state.get("sums", {})), dict(state.get("counts", {}))


ADVICE = ("Try a sum-of-hinges warm-up (loss.name=hinge_warmup with loss.warmup_epochs=1, or loss.warmup_epochs=1 "
          "for LSEH), a lower optim.lr, loss.mask=same_image when several captions of one image share a batch, "
          "milder crops (transform.augment.scale=[0.5,1.0] or transform.augment.crop=center) and, for a CNN trained from "
          "scratch, model.image_encoder.backbone_norm=false; or start from the scratch_small recipe.")


class TrainingHealth:
    """Watches the steps of a run. ``record`` writes a line to the metrics log; ``save_last`` writes ``last.pt``
    before the run is stopped and returns its path; ``optim`` and ``loss_fn`` are what a collapse fallback
    changes; ``corpus`` names the captions of a skipped step."""

    def __init__(self, tcfg: TrainConfig, loss_fn: RankingLoss, optim: OptimizerSet, corpus: Corpus,
                 record: Callable[[dict[str, Any]], None], save_last: Callable[[], Path]) -> None:
        self.opts, self.max_nonfinite = tcfg.collapse, tcfg.max_nonfinite_steps
        self.loss_fn, self.optim, self.corpus, self.record, self.save_last = loss_fn, optim, corpus, record, save_last
        self.detector = CollapseDetector(self.opts.patience, self.opts.loss_tol, self.opts.max_mean_cos)
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

    def after_step(self, skipped: bool, parts: dict[str, torch.Tensor], *, epoch: int, step: int,
                   batches_done: int, best: float) -> None:
        """After step ``step``: ``train.max_nonfinite_steps`` skipped steps in a row stop the run (state saved). A
        taken step feeds the detector; when it fires, act as ``train.collapse.action`` says -- at once when the
        embeddings are squeezed, after the epoch's validation when only the loss is pinned (a plateau of a run
        that still learns looks the same). ``best``: the best validation so far."""
        if skipped:
            if self.nonfinite_streak >= self.max_nonfinite:
                path = self.save_last()
                raise TrainingDiverged(
                    f"training stopped at step {step}: {self.nonfinite_streak} steps in a row had a non-finite "
                    f"{self.nonfinite_what}. Lower optim.lr, set optim.grad_clip, switch train.amp off, or check the "
                    f"data for NaN/inf features and broken captions. The last state is in {path}.")
            return
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
        chance = (chance_rsum(np.asarray(val_corpus.caption_to_image), val_corpus.num_images)
                  if metric == "rsum" and val_corpus.num_images else None)
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
        symptom = (f"the embeddings collapsed towards one point (loss {event['loss']:.4g}, its collapse "
                   f"value {event['collapse_value']:.4g}; mean pairwise cosine: images "
                   f"{event['image_mean_cos']:.3f}, captions {event['caption_mean_cos']:.3f})")
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
