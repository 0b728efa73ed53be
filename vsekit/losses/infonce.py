"""Symmetric InfoNCE (CLIP) loss over an image-by-caption similarity matrix."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vsekit.losses.base import LOSSES, MASKS, RankingLoss, check_choice, diagonal_mask, same_image_mask


@LOSSES.register("infonce")
class InfoNCELoss(RankingLoss):
    """Symmetric cross-entropy over the in-batch similarities divided by a temperature (CLIP's loss).

    With logits ``Λ = S / τ`` (row = image, column = caption) and the diagonal as targets::

        L_i2t = mean_i CE(Λ[i, :], i)        image i must pick its caption among the B captions
        L_t2i = mean_j CE(Λ[:, j], j)        caption j must pick its image among the B images
        L     = (L_i2t + L_t2i) / 2

    Unlike the hinge losses this is a mean over the batch, so its scale does not grow with B.
    The scale 1/τ is stored as ``logit_scale = log(1/τ)``; when ``learnable`` it is an ``nn.Parameter``
    trained with the encoders, and the scale used in the forward pass is clamped to at most
    ``max_logit_scale`` (CLIP clips at 100 so that the logits cannot blow up). Past the clamp the
    parameter gets no gradient.

    Same-image slots: the target of row i is always caption i. With ``mask="diagonal"`` (default, the
    usual CLIP convention) another caption of the same image in the batch stays in the softmax as a
    negative. With ``mask="same_image"`` every pair (i, j), i ≠ j, with ``image_ids[i] == image_ids[j]``
    is removed from both softmaxes (its logit set to -inf), so a duplicate image is neither a positive
    nor a negative.

    Args:
        temperature: initial τ (CLIP: 0.07, i.e. scale 1/0.07 ≈ 14.3).
        learnable: learn log(1/τ) (``nn.Parameter``) or keep it fixed (a buffer, saved in the state dict).
        max_logit_scale: upper bound on 1/τ used in the forward pass (CLIP: 100).
        mask: ``"diagonal"`` (default) or ``"same_image"``, see above.

    References:
        - van den Oord, Li, Vinyals. Representation Learning with Contrastive Predictive Coding. 2018.
          https://arxiv.org/abs/1807.03748 (InfoNCE)
        - Radford et al. Learning Transferable Visual Models From Natural Language Supervision (CLIP).
          ICML 2021. https://arxiv.org/abs/2103.00020 (symmetric form, learnable clipped temperature)

    Requirements:
        1. A batch of B (image, caption) positive pairs; every other in-batch pair is a negative.
        2. Similarities on a bounded scale (e.g. cosine): τ sets how peaked the softmax is.
        3. ``image_ids`` only matters for ``mask="same_image"``.

    Inputs:
        +-------------------------------+---------------------+-------------------------+
        | sim                           | image_ids           | caption_vectors         |
        +===============================+=====================+=========================+
        | (B, B), row image, col caption| (B,) true image ids | not used                |
        +-------------------------------+---------------------+-------------------------+

    Relations:
        - As τ → 0, ``τ · L_i2t → mean_i max_j [S_ij - S_ii]₊``: the log-sum-exp becomes the hardest
          negative, i.e. :class:`HingeRankingLoss` (``reduction="max"``) with margin 0, averaged.
        - Same loss as open_clip's ``ClipLoss`` (single process) and sentence-transformers'
          ``MultipleNegativesSymmetricRankingLoss`` on a precomputed similarity matrix.

    Example:
        ::

            >>> import torch
            >>> import torch.nn.functional as F
            >>> from vsekit.losses import InfoNCELoss
            >>> loss_fn = InfoNCELoss(temperature=0.07, learnable=True)
            >>> images = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
            >>> captions = F.normalize(torch.randn(4, 8), dim=1)
            >>> loss = loss_fn(images @ captions.T, torch.arange(4))
            >>> loss.backward()
            >>> loss_fn.logit_scale.grad is not None
            True
            >>> round(loss_fn.temperature, 4)
            0.07
    """

    def __init__(self, temperature: float = 0.07, learnable: bool = True, max_logit_scale: float = 100.0,
                 mask: str = "diagonal") -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        if max_logit_scale <= 0:
            raise ValueError(f"max_logit_scale must be > 0; got {max_logit_scale}")
        self.learnable = bool(learnable)
        self.max_logit_scale = float(max_logit_scale)
        self.mask = check_choice("mask", mask, MASKS)
        init = torch.tensor(math.log(1.0 / temperature), dtype=torch.float32)
        if self.learnable:
            self.logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("logit_scale", init)

    def scale(self) -> Tensor:
        """The multiplier 1/τ actually applied to the similarities, clamped to ``max_logit_scale``."""
        return self.logit_scale.float().clamp(max=math.log(self.max_logit_scale)).exp()

    @property
    def temperature(self) -> float:
        """The current effective τ (after the clamp)."""
        return 1.0 / float(self.scale().detach())

    def compute(self, sim: Tensor, image_ids: Tensor, caption_vectors: Tensor | None) -> Tensor:
        logits = sim * self.scale().to(sim.device)
        if self.mask == "same_image":
            others = same_image_mask(image_ids) & ~diagonal_mask(sim.shape[0], sim.device)
            logits = logits.masked_fill(others, float("-inf"))
        targets = torch.arange(sim.shape[0], device=sim.device)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature:.4g}, learnable={self.learnable}, "
                f"max_logit_scale={self.max_logit_scale}, mask={self.mask!r}")
