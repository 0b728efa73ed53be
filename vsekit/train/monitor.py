"""Training health: per-batch diagnostics of the joint space and a detector for collapsed embeddings.

A hinge loss with the hardest negative (VSE++'s max of hinges) has a trap: when every image and every
caption maps to (nearly) one point, every similarity is equal, every hinge equals the margin and the
gradient through the max is too weak to leave. The loss then sits at its *collapse value* (2·B·α for the
max of hinges). The detector watches for that (the loss within ``loss_tol`` of the value the loss takes on
a constant similarity matrix, or a mean pairwise cosine near 1 in either modality) for ``patience``
consecutive steps, and the trainer then warns, falls back to the sum of hinges at a lower learning rate,
or stops with a message (``train.collapse.action``).

A loss pinned at that value is not always a collapse: from pretrained features the max of hinges sits on it
for hundreds of steps while the hardest negatives are overtaken one by one, and the validation ranking climbs
all the while (EfficientNet features of a real collection: val rsum 137 -> 233 over the ~100 steps the loss
stayed within 2 % of it, 317 later; the fallback -- the sum of hinges at a tenth of the learning rate -- ended
74-107 test rsum lower on 3 seeds, ``benchmarks/README.md``). So a
pinned loss with embeddings that are still spread is only a *suspected* collapse (:attr:`CollapseDetector.pending`):
the epoch's validation decides. If it beats the best validation before the suspicion (or, at the first
validation, clears :data:`LEARNING_OVER_CHANCE` times the chance rsum), the run is learning and nothing is done;
otherwise the configured action is taken then. Embeddings squeezed into one direction are acted on at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vsekit.errors import TrainingCollapsed  # noqa: F401  (raised here, re-exported)
from vsekit.losses.base import same_image_mask

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
def collapse_value(loss_fn: torch.nn.Module, sim: Tensor, image_ids: Tensor,
                   caption_vectors: Tensor | None = None) -> float:
    """The value ``loss_fn`` takes on this batch when every similarity is equal (all embeddings at one point).

    Computed, not looked up: 2·B·α for the max of hinges, 2·B·(B-1)·α for the sum, the mean of LSEH's
    per-pair margins for LSEH, log B for InfoNCE, so any registered loss gets a detector.
    """
    extra = {"caption_vectors": caption_vectors} if caption_vectors is not None else {}
    return float(loss_fn(torch.zeros_like(sim, dtype=torch.float32), image_ids, **extra))


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
        if self.is_collapsed(loss, collapse, image_mean_cos, caption_mean_cos):
            self.streak += 1
        else:
            self.streak = 0
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


def collapse_symptom(loss: float, collapse: float, image_mean_cos: float, caption_mean_cos: float) -> str:
    """One line saying what the detector saw."""
    return (f"the embeddings collapsed towards one point (loss {loss:.4g}, its collapse value {collapse:.4g}; "
            f"mean pairwise cosine: images {image_mean_cos:.3f}, captions {caption_mean_cos:.3f})")


ADVICE = ("Try a sum-of-hinges warm-up (loss.name=hinge_warmup with loss.warmup_epochs=1, or loss.warmup_epochs=1 "
          "for LSEH), a lower optim.lr, loss.mask=same_image when several captions of one image share a batch, "
          "milder crops (transform.augment.scale=[0.5,1.0] or transform.augment.crop=center) and, for a CNN trained from "
          "scratch, model.image_encoder.backbone_norm=false; or start from the scratch_small recipe.")
