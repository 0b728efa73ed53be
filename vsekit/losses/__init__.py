"""Ranking losses over an image-by-caption similarity matrix, each registered in ``LOSSES`` by name.

Registered: ``"hinge"`` (VSE0 / VSE++), ``"hinge_warmup"`` (VSE∞ schedule), ``"infonce"`` (CLIP),
``"lseh"`` (semantic margins, needs ``caption_vectors``). Build one from a config with :func:`build_loss`.
Registered objective terms (``OBJECTIVE_TERMS``, ``objective.terms.<name>``): ``"level_ranking"`` (a ranking
loss per embedding level, GXN), ``"caption"`` (a caption decoder: cross-entropy or self-critical CIDEr-D
training) and ``"gan"`` (GXN's text-to-image GAN).

Losses that read more than the similarity matrix have their own entry points: ``InstanceLoss`` (a classifier
shared by both paths, Dual-Path) and the mined-negative losses of ``MINED_LOSSES`` (``"dualpath_rank"``);
the trainer's objective (``vsekit.train.objective``) weighs them together with the in-batch loss.
"""

from __future__ import annotations

from typing import Any

from torch import nn

import vsekit.losses.caption  # noqa: E402, F401, I001  (registers the "caption" term)
import vsekit.losses.gan  # noqa: E402, F401, I001  (registers the "gan" term)
import vsekit.losses.levels  # noqa: E402, F401, I001  (registers the "level_ranking" term)
from vsekit.losses.base import LOSSES, RankingLoss, hinge_costs, reduce_hinge_costs, same_image_mask
from vsekit.losses.dualpath import MINED_LOSSES, DualPathRankingLoss, mine_hard_negatives
from vsekit.losses.hinge import HingeRankingLoss, WarmupHingeLoss
from vsekit.losses.infonce import InfoNCELoss
from vsekit.losses.instance import InstanceLoss
from vsekit.losses.lseh import LSEHLoss, image_mean_vectors, semantic_margins, semantic_similarity
from vsekit.losses.terms import OBJECTIVE_TERMS, ObjectiveTerm, TermBatch


def build_loss(spec: dict[str, Any] | str, **extra: Any) -> nn.Module:
    """Build a registered loss from ``{"name": ..., **kwargs}`` or a bare name, e.g. ``{"name": "lseh"}``."""
    return LOSSES.build(spec, **extra)


def build_mined_loss(spec: dict[str, Any] | str, **extra: Any) -> nn.Module:
    """Build a registered mined-negative loss, e.g. ``{"name": "dualpath_rank", "margin": 1.0}``."""
    return MINED_LOSSES.build(spec, **extra)


__all__ = [
    "LOSSES",
    "RankingLoss",
    "HingeRankingLoss",
    "WarmupHingeLoss",
    "InfoNCELoss",
    "LSEHLoss",
    "build_loss",
    "MINED_LOSSES",
    "DualPathRankingLoss",
    "InstanceLoss",
    "build_mined_loss",
    "mine_hard_negatives",
    "hinge_costs",
    "reduce_hinge_costs",
    "same_image_mask",
    "semantic_similarity",
    "semantic_margins",
    "image_mean_vectors",
    "OBJECTIVE_TERMS",
    "ObjectiveTerm",
    "TermBatch",
]
