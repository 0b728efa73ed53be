"""The ranking loss of Dual-Path stage II: one mined hard negative caption per anchor, margin 1 on cosine.

Unlike the in-batch losses of ``LOSSES`` (which read a B x B similarity matrix), this loss needs captions from
outside the batch: as the objective's term ``mined`` (``objective.mined``) it mines them before the forward
pass (:meth:`DualPathRankingLoss.prepare`, model in eval mode), and the model encodes them with the positives.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from vsekit.data.batch import Batch, MinedNegatives, text_to
from vsekit.data.datasets import CaptionPool
from vsekit.losses.base import autocast_disabled, check_choice
from vsekit.losses.terms import OBJECTIVE_TERMS, ObjectiveTerm

#: the one mined-negative loss, the value of ``objective.mined.name``
MINED_LOSS = "dualpath_rank"
MINED_POOL_SIZE = 256


def mine_hard_negatives(scores: Tensor, anchor_ids: Tensor, pool_ids: Tensor) -> tuple[Tensor, Tensor]:
    """For each anchor, the pool item with the highest score among those of a DIFFERENT image.

    ``scores`` (B, P): anchor-by-pool similarities; ``anchor_ids`` (B,) and ``pool_ids`` (P,) the image ids.
    Returns ``(index (B,), valid (B,))``; ``valid[i]`` is False when every pool item shows anchor i's image
    (its index is then meaningless). Ties go to the lowest pool index.
    """
    same = anchor_ids.to(scores.device).unsqueeze(1) == pool_ids.to(scores.device).unsqueeze(0)
    masked = scores.float().masked_fill(same, float("-inf"))
    best, index = masked.max(dim=1)
    return index, torch.isfinite(best)


REDUCTIONS = ("mean", "sum")


class DualPathRankingLoss(ObjectiveTerm):
    """Bidirectional triplet loss with a mined hard negative caption and another batch image per anchor.

    For anchor i with image x_i and caption y_i (L2-normalised), its mined hard negative caption n_i (the
    most similar caption of another image in a random pool, see :func:`mine_hard_negatives`) and a negative
    image z_i (another image of the batch)::

        L_i = ( [m - x_i·y_i + x_i·n_i]₊ + [m - x_i·y_i + y_i·z_i]₊ ) / 2

    averaged over the valid anchors. The reference (``RankLoss.m``) uses the first half of a batch of B as
    anchors and sums their hinges, and MatConvNet divides every gradient by B: its effective loss is
    ``(1/B) Σ_{B/2 anchors} (hinge_1 + hinge_2)``, which is exactly the mean above. So the paper's weights
    (rank : image : text = 2 : 1 : 0.1, with mean cross-entropies) carry over unchanged, while here every
    slot of the batch is an anchor.

    Args:
        margin: m; the paper uses 1 (large for cosine: nearly every triplet is active).
        reduction: ``"mean"`` (over valid anchors, the reference's effective scale) or ``"sum"``.

    References:
        - Zheng et al. Dual-Path Convolutional Image-Text Embeddings with Instance Loss. ACM TOMM 2020.
          https://arxiv.org/abs/1711.05535 (code: layumi/Image-Text-Embedding ``RankLoss.m``,
          ``train_*_Rankloss_shift_hard.m``: 256 random captions of other images, encoded in test mode)

    Requirements:
        1. Cosine similarity (the embeddings are unit vectors); row i of every input belongs to anchor i.
        2. ``valid`` masks anchors without a usable negative (no mined caption, or z_i shows x_i's image).

    Inputs:
        +------------------+------------------+------------------------+--------------------+----------------+
        | image_emb        | caption_emb      | negative_caption_emb   | negative_image_emb | valid          |
        +==================+==================+========================+====================+================+
        | (B, D) x_i       | (B, D) y_i       | (B, D) n_i             | (B, D) z_i         | (B,) bool      |
        +------------------+------------------+------------------------+--------------------+----------------+

    Relations:
        - :class:`~vsekit.losses.hinge.HingeRankingLoss` (VSE++) takes the hardest negative inside the batch;
          this loss mines the caption side from a pool outside it and takes a random image negative.
        - Combined with :class:`~vsekit.losses.instance.InstanceLoss` in Dual-Path's stage II.

    Example:
        ::

            >>> import torch
            >>> import torch.nn.functional as F
            >>> from vsekit.losses.dualpath import DualPathRankingLoss
            >>> x, y, n = (F.normalize(torch.randn(4, 8), dim=1) for _ in range(3))
            >>> loss = DualPathRankingLoss(margin=1.0)(x, y, n, x.roll(2, dims=0))
            >>> bool(loss >= 0)
            True
    """

    stage_keys = ("margin", "pool_size")
    global_batch = True
    #: the training captions to mine from (set by the run that builds the term)
    pool: CaptionPool | None = None

    def __init__(self, margin: float = 1.0, reduction: str = "mean", pool_size: int = MINED_POOL_SIZE) -> None:
        super().__init__()
        self.margin = float(margin)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.pool_size = int(pool_size)  # random training captions scored per step to find the negatives

    def forward(self, image_emb: Tensor, caption_emb: Tensor, negative_caption_emb: Tensor,
                negative_image_emb: Tensor, valid: Tensor | None = None) -> Tensor:
        with autocast_disabled(image_emb.device):
            x, y = image_emb.float(), caption_emb.float()
            pos = (x * y).sum(1)
            to_caption = (self.margin - pos + (x * negative_caption_emb.float()).sum(1)).clamp_min(0)
            to_image = (self.margin - pos + (y * negative_image_emb.float()).sum(1)).clamp_min(0)
            per_anchor = (to_caption + to_image) / 2
            if valid is not None:
                per_anchor = per_anchor * valid.to(per_anchor.dtype)
            total = per_anchor.sum()
            if self.reduction == "sum":
                return total
            count = per_anchor.new_tensor(per_anchor.numel()) if valid is None else valid.sum().to(per_anchor.dtype)
            return total / count.clamp_min(1)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}"

    # -- as the objective's term ``mined`` -----------------------------------------------------------------
    def prepare(self, model: nn.Module, batch: Batch, restore_mode: Any) -> Batch:
        if self.pool is None:
            raise ValueError("the mined term has no caption pool to mine from (set DualPathRankingLoss.pool)")
        return replace(batch, negatives=self.mine(model, batch.images, batch.image_ids, restore_mode))

    @torch.no_grad()
    def mine(self, model: nn.Module, images: Tensor, image_ids: Tensor, restore_mode: Any) -> MinedNegatives:
        """Hard negative captions for the batch's images, scored with the model in eval mode.

        ``pool_size`` random training captions are encoded (no batch-norm or dropout updates: eval mode, as
        the reference encodes its 256 candidates in test mode), the anchors' images too, and each anchor gets
        the most similar caption of another image. ``restore_mode`` puts the model back in training mode.
        """
        idx = self.pool.sample(self.pool_size)  # the global torch RNG: reproducible, and saved in checkpoints
        text = self.pool.text(idx)
        pool_ids = self.pool.image_ids(idx).to(image_ids.device)
        model.eval()
        try:
            anchors = model.encode_images(images)
            candidates = model.encode_captions(*text_to(text, images.device))
            scores = model.similarity(anchors.float(), candidates.float())
        finally:
            restore_mode()
        index, valid = mine_hard_negatives(scores, image_ids, pool_ids)
        return MinedNegatives(tuple(t[index.cpu()] for t in text), pool_ids[index], valid)

    def losses(self, out: Any, batch: Batch) -> dict[str, Tensor]:
        """Anchor i's negative image: the batch slot half a batch away (unless it shows the same image)."""
        if batch.negatives is None or out.negative_emb is None:
            raise ValueError("the mined term is on but no mined negatives were encoded")
        ids = batch.image_ids
        shift = max(1, out.image_emb.shape[0] // 2)
        valid = batch.negatives.valid.to(ids.device) & (ids.roll(shift) != ids)
        return {self.name: self(out.image_emb, out.caption_emb, out.negative_emb,
                                out.image_emb.roll(shift, dims=0), valid)}


@OBJECTIVE_TERMS.register("mined")
def mined_term(margin: float = 1.0, reduction: str = "mean", pool_size: int = MINED_POOL_SIZE,
               **_: Any) -> DualPathRankingLoss:
    """The ``objective.mined`` term (its ``name`` is :data:`MINED_LOSS`, the one mined-negative loss)."""
    return DualPathRankingLoss(margin, reduction, pool_size)
