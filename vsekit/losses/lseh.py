"""LSEH: VSE++ hinge loss whose margin grows with the semantic similarity of the captions (Gong & Cosma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vsekit.losses.base import (
    LOSSES,
    REDUCTIONS,
    RankingLoss,
    autocast_disabled,
    check_choice,
    diagonal_mask,
    hinge_costs,
    reduce_hinge_costs,
    same_image_mask,
)

SEMANTICS = ("rowmax", "cosine")
IMAGE_SEMANTICS = ("caption", "image_mean")


def image_mean_vectors(caption_vectors: Tensor, image_ids: Tensor) -> Tensor:
    """Row i = mean of the vectors of every batch slot whose image id equals ``image_ids[i]``.

    Only captions present in the batch count (slot i itself always does), so the result depends on
    which captions of an image were sampled together.
    """
    same = same_image_mask(image_ids).to(caption_vectors.dtype)
    return (same @ caption_vectors) / same.sum(dim=1, keepdim=True)


def semantic_similarity(caption_vectors: Tensor, image_ids: Tensor | None = None, *,
                        semantic: str = "rowmax", image_semantics: str = "caption") -> Tensor:
    """The semantic similarity S (B, B) of LSEH, a constant (no gradient), in float32.

    Row i stands for the IMAGE of slot i, column j for the CAPTION of slot j. With the defaults
    (the paper's definition, Gong & Cosma 2023), for the LSA vectors l_1..l_B of the batch's captions::

        C_ij = l_i · l_j,   m_i = max_k C_ik (k over the batch, i included; m_i = 0 → 1),   S_ij = C_ij / m_i

    S is NOT a cosine: it is asymmetric, can be negative, and S_ii < 1 when another caption of the batch
    has a larger dot product with l_i than l_i itself (a longer vector pointing the same way).

    Options beyond the paper:
        - ``semantic="cosine"``: S_ij = cos(r_i, l_j); a zero vector has cosine 0 with everything.
        - ``image_semantics="image_mean"``: the row (image) side uses r_i = the mean of the vectors of
          all batch slots with the same image id as slot i (``image_mean_vectors``); columns keep the
          caption's own vector l_j. With ``"caption"`` (default) r_i = l_i, the caption paired with image i.
          The row-max normalisation then reads C_ij = r_i · l_j, m_i = max_k r_i · l_k.
    """
    check_choice("semantic", semantic, SEMANTICS)
    check_choice("image_semantics", image_semantics, IMAGE_SEMANTICS)
    with torch.no_grad(), autocast_disabled(caption_vectors.device):
        rows = cols = caption_vectors.detach().float()
        if image_semantics == "image_mean":
            if image_ids is None:
                raise ValueError("image_semantics='image_mean' needs image_ids")
            rows = image_mean_vectors(cols, image_ids.to(cols.device))
        if semantic == "cosine":  # a zero vector stays zero: cosine 0 with everything
            return F.normalize(rows, dim=1) @ F.normalize(cols, dim=1).t()
        dots = rows @ cols.t()
        row_max = dots.max(dim=1, keepdim=True).values
        row_max = torch.where(row_max == 0, torch.ones_like(row_max), row_max)
        return dots / row_max


def semantic_margins(semantic_sim: Tensor, image_ids: Tensor, alpha: float, lam: float) -> Tensor:
    """LSEH margins ``M_ij = (alpha + lam·S_ij)·(1 - Z_ij)``: 0 on the diagonal and for same-image pairs."""
    keep = ~same_image_mask(image_ids.to(semantic_sim.device))  # Z_ii = 1, so M_ii = 0 too
    return (alpha + lam * semantic_sim) * keep.to(semantic_sim.dtype)


@LOSSES.register("lseh")
class LSEHLoss(RankingLoss):
    """Semantically-Enhanced Hard negatives loss (LSEH): VSE++ with a per-pair semantic margin.

    The fixed margin α of :class:`HingeRankingLoss` becomes ``M_ij = (α + λ·S_ij)·(1 - Z_ij)``, where
    S_ij is the semantic similarity between the captions of slots i and j computed from their LSA
    vectors (see :func:`semantic_similarity`) and ``Z_ij = [image_ids[i] == image_ids[j]]``. With
    s(i, j) = ``sim[i, j]``::

        C_i2t[i, j] = [M_ij + s(i, j) - s(i, i)]₊      image i ranks captions, caption j is the negative
        C_t2i[i, j] = [M_ij + s(i, j) - s(j, j)]₊      caption j ranks images, image i is the negative
        L = Σ_i max_{j≠i} C_i2t[i, j] + Σ_j max_{i≠j} C_t2i[i, j]      (summed over the batch)

    Both directions use the same M_ij, i.e. S normalised by row i (the image's caption), as in the
    reference code. Only the diagonal is excluded: a caption of the same image is still hinged, with
    margin 0. The hardest negative is taken after the margin is added, so a semantically close
    negative (larger margin) is more likely to be chosen. S is a constant: gradients reach ``sim`` only.
    ``reduction="sum"`` adds every off-diagonal hinge instead (sum of hinges with semantic margins).

    Args:
        alpha: base margin α (paper: 0.185).
        lam: λ, weight of the semantic term (paper: 0.025; with S_ij ≤ 1 the margin is at most α + λ).
        reduction: ``"max"`` (paper, hardest negative) or ``"sum"`` (all negatives).
        semantic: ``"rowmax"`` (paper: C_ij / max_k C_ik on raw dot products) or ``"cosine"``
            (beyond the paper: cosine of the LSA vectors, symmetric, zero vectors give 0).
        image_semantics: ``"caption"`` (paper: the image of slot i is represented by the caption of
            slot i) or ``"image_mean"`` (beyond the paper: by the mean LSA vector of that image's
            captions present in the batch, grouped by ``image_ids``; columns keep each caption's own vector).

    References:
        - Gong, Cosma. Improving visual-semantic embeddings by learning semantically-enhanced hard
          negatives for cross-modal information retrieval. Pattern Recognition 137:109272, 2023.
          https://arxiv.org/abs/2210.04754 (code: yangong23/VSEnetworksLSEH)
        - Faghri et al. VSE++. BMVC 2018. https://arxiv.org/abs/1707.05612 (the base loss)

    Requirements:
        1. A batch of B (image, caption) positive pairs, with the true ``image_ids`` of each slot (not
           ``index // 5``): same-image pairs get margin 0.
        2. ``caption_vectors``: the LSA vectors (TF-IDF → truncated SVD, U·Σ rows) of the B captions,
           in slot order; build them on the training captions only.

    Inputs:
        +-------------------------------+---------------------+--------------------------------+
        | sim                           | image_ids           | caption_vectors                |
        +===============================+=====================+================================+
        | (B, B), row image, col caption| (B,) true image ids | (B, K) LSA vectors of captions |
        +-------------------------------+---------------------+--------------------------------+

    Relations:
        - ``lam=0`` is :class:`HingeRankingLoss` with ``margin=alpha`` except that same-image pairs
          have margin 0 (identical when all ``image_ids`` differ).
        - LSEH's VSE∞ variant drops the warm-up of :class:`WarmupHingeLoss` (max of hinges from epoch 0).

    Example:
        ::

            >>> import torch
            >>> import torch.nn.functional as F
            >>> from vsekit.losses import LSEHLoss
            >>> loss_fn = LSEHLoss(alpha=0.185, lam=0.025)
            >>> images = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
            >>> captions = F.normalize(torch.randn(4, 8), dim=1)
            >>> image_ids = torch.tensor([3, 3, 5, 9])  # slots 0 and 1: two captions of image 3
            >>> lsa = torch.randn(4, 400)  # the LSA vectors of the 4 captions
            >>> loss = loss_fn(images @ captions.T, image_ids, caption_vectors=lsa)
            >>> loss.backward()
            >>> loss.dtype, loss.shape
            (torch.float32, torch.Size([]))
    """

    requires_caption_vectors = True
    has_sum_fallback = True

    def __init__(self, alpha: float = 0.185, lam: float = 0.025, reduction: str = "max",
                 semantic: str = "rowmax", image_semantics: str = "caption", warmup_epochs: int = 0) -> None:
        super().__init__()
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        self.warmup_epochs = int(warmup_epochs)  # beyond the paper: VSE-infinity-style sum-of-hinges warm-up
        self.alpha = float(alpha)
        self.lam = float(lam)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.semantic = check_choice("semantic", semantic, SEMANTICS)
        self.image_semantics = check_choice("image_semantics", image_semantics, IMAGE_SEMANTICS)

    def margins(self, image_ids: Tensor, caption_vectors: Tensor) -> Tensor:
        """The (B, B) margin matrix M of this batch (a constant)."""
        sem = semantic_similarity(caption_vectors, image_ids, semantic=self.semantic,
                                  image_semantics=self.image_semantics)
        return semantic_margins(sem, image_ids, self.alpha, self.lam)

    def compute(self, sim: Tensor, image_ids: Tensor, caption_vectors: Tensor | None) -> Tensor:
        size = sim.shape[0]
        if caption_vectors is None:
            raise ValueError("LSEHLoss needs caption_vectors=(B, K) LSA vectors of the batch's captions")
        if caption_vectors.ndim != 2 or caption_vectors.shape[0] != size:
            raise ValueError(f"caption_vectors must have shape ({size}, K) to match sim; "
                             f"got {tuple(caption_vectors.shape)}")
        margin = self.margins(image_ids, caption_vectors.to(sim.device))
        cost_i2t, cost_t2i = hinge_costs(sim, margin, diagonal_mask(size, sim.device))
        return reduce_hinge_costs(cost_i2t, cost_t2i, self.reduction_now(self.reduction))

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, lam={self.lam}, reduction={self.reduction!r}, "
                f"warmup_epochs={self.warmup_epochs}, "
                f"semantic={self.semantic!r}, image_semantics={self.image_semantics!r}")
