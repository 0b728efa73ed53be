"""Ranking losses over an image-by-caption similarity matrix, each registered in ``LOSSES`` by name.

Registered: ``"hinge"`` (VSE0 / VSE++), ``"hinge_warmup"`` (VSE∞ schedule), ``"infonce"`` (CLIP),
``"lseh"`` (semantic margins, needs ``caption_vectors``). Build one from a config with :func:`build_loss`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vsekit.losses.base import LOSSES, RankingLoss, hinge_costs, reduce_hinge_costs, same_image_mask
from vsekit.losses.hinge import HingeRankingLoss, WarmupHingeLoss
from vsekit.losses.infonce import InfoNCELoss
from vsekit.losses.lseh import LSEHLoss, image_mean_vectors, semantic_margins, semantic_similarity


def build_loss(spec: dict[str, Any] | str, **extra: Any) -> nn.Module:
    """Build a registered loss from ``{"name": ..., **kwargs}`` or a bare name, e.g. ``{"name": "lseh"}``."""
    return LOSSES.build(spec, **extra)


__all__ = [
    "LOSSES",
    "RankingLoss",
    "HingeRankingLoss",
    "WarmupHingeLoss",
    "InfoNCELoss",
    "LSEHLoss",
    "build_loss",
    "hinge_costs",
    "reduce_hinge_costs",
    "same_image_mask",
    "semantic_similarity",
    "semantic_margins",
    "image_mean_vectors",
]
