"""Ranking losses over an image-by-caption similarity matrix, each registered in ``LOSSES`` by name.

Registered: ``"hinge"`` (VSE0 / VSE++), ``"hinge_warmup"`` (VSE∞ schedule), ``"infonce"`` (CLIP),
``"lseh"`` (semantic margins, needs ``caption_vectors``). Build one from a config with :func:`build_loss`.
The objective's terms are ``OBJECTIVE_TERMS`` entries, one protocol (:class:`~vsekit.losses.terms.ObjectiveTerm`;
the list: docs/training.md, "Objective terms: one protocol").
"""

from __future__ import annotations

from typing import Any

from torch import nn

# imported for the terms they register: adversarial; caption; gan; label, triplet; level_ranking, embedding
from vsekit.losses import adversarial, caption, gan, labels, levels  # noqa: F401
from vsekit.losses.base import LOSSES, RankingLoss
from vsekit.losses.dualpath import MINED_LOSS, DualPathRankingLoss, mine_hard_negatives
from vsekit.losses.hinge import HingeRankingLoss, WarmupHingeLoss
from vsekit.losses.infonce import InfoNCELoss
from vsekit.losses.instance import InstanceLoss
from vsekit.losses.lseh import LSEHLoss, semantic_margins, semantic_similarity
from vsekit.losses.terms import OBJECTIVE_TERMS, ObjectiveTerm


def build_loss(spec: dict[str, Any] | str, **extra: Any) -> nn.Module:
    """Build a registered loss from ``{"name": ..., **kwargs}`` or a bare name, e.g. ``{"name": "lseh"}``."""
    return LOSSES.build(spec, **extra)


__all__ = ["LOSSES", "RankingLoss", "HingeRankingLoss", "WarmupHingeLoss", "InfoNCELoss", "LSEHLoss",
           "build_loss", "MINED_LOSS", "DualPathRankingLoss", "InstanceLoss", "mine_hard_negatives",
           "semantic_similarity", "semantic_margins", "OBJECTIVE_TERMS", "ObjectiveTerm"]
