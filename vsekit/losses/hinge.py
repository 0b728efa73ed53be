"""Bidirectional hinge ranking losses: VSE0 (sum of hinges), VSE++ (max of hinges), VSE-infinity warm-up."""

from __future__ import annotations

from torch import Tensor

from vsekit.losses.base import (
    LOSSES,
    MASKS,
    REDUCTIONS,
    RankingLoss,
    check_choice,
    diagonal_mask,
    hinge_costs,
    reduce_hinge_costs,
    same_image_mask,
)


@LOSSES.register("hinge")
class HingeRankingLoss(RankingLoss):
    """Bidirectional triplet ranking loss with a fixed margin: the ``ContrastiveLoss`` of VSE++.

    For a similarity matrix S (row = image, column = caption, diagonal = positive pairs) and margin α::

        cost_s  = [α + S - diag(S)·1ᵀ]₊     image i ranks captions; caption j ≠ i is a negative
        cost_im = [α + S - 1·diag(S)ᵀ]₊     caption j ranks images; image i ≠ j is a negative

    with the masked entries set to 0. ``reduction="sum"`` adds every hinge (VSE0, "sum of hinges");
    ``reduction="max"`` keeps only the hardest negative of each query (VSE++, "max of hinges")::

        L = Σ_i max_j cost_s[i, j] + Σ_j max_i cost_im[i, j]

    The loss is summed over the batch, not averaged, as in VSE++: its scale (and so the effect of
    gradient clipping and of the learning rate) grows with the batch size.

    Args:
        margin: α, the required gap between a positive pair and a negative (VSE++: 0.2; order: 0.05).
        reduction: ``"max"`` (VSE++, hardest negative) or ``"sum"`` (VSE0, all negatives).
        mask: ``"diagonal"`` (default, faithful to VSE++: only the positive pairs are masked, so two
            captions of the same image in one batch push each other away as negatives) or
            ``"same_image"`` (every pair with equal ``image_ids`` is masked: no false negatives).

    References:
        - Faghri, Fleet, Kiros, Fidler. VSE++: Improving Visual-Semantic Embeddings with Hard Negatives.
          BMVC 2018. https://arxiv.org/abs/1707.05612 (code: fartashf/vsepp, ``model.py``)
        - Kiros, Salakhutdinov, Zemel. Unifying Visual-Semantic Embeddings with Multimodal Neural
          Language Models. 2014 (the sum-of-hinges form). https://arxiv.org/abs/1411.2539

    Requirements:
        1. A batch of B (image, caption) positive pairs; every other pair in the batch is a negative.
        2. ``image_ids`` only matters for ``mask="same_image"``.
        3. Any similarity (cosine, order, learned); larger = more similar.

    Inputs:
        +-------------------------------+---------------------+-------------------------+
        | sim                           | image_ids           | caption_vectors         |
        +===============================+=====================+=========================+
        | (B, B), row image, col caption| (B,) true image ids | not used                |
        +-------------------------------+---------------------+-------------------------+

    Relations:
        - :class:`WarmupHingeLoss` is this loss with ``reduction="sum"`` for the first epochs, then ``"max"``.
        - :class:`LSEHLoss` with ``lam=0`` is this loss with margin ``alpha`` and ``mask="diagonal"``,
          except that same-image pairs get margin 0 instead of α.
        - :class:`InfoNCELoss` is the soft (log-sum-exp) counterpart of the max over negatives.

    Example:
        ::

            >>> import torch
            >>> import torch.nn.functional as F
            >>> from vsekit.losses import HingeRankingLoss
            >>> images = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
            >>> captions = F.normalize(torch.randn(4, 8), dim=1)
            >>> image_ids = torch.tensor([10, 11, 11, 12])  # slots 1 and 2 show the same image
            >>> loss_fn = HingeRankingLoss(margin=0.2, reduction="max", mask="same_image")
            >>> loss = loss_fn(images @ captions.T, image_ids)
            >>> loss.backward()
            >>> sim = torch.tensor([[0.9, 0.5, 0.8], [0.5, 0.6, 0.3], [0.75, 0.65, 0.7]])
            >>> round(HingeRankingLoss(reduction="sum")(sim, torch.arange(3)).item(), 4)
            1.3
            >>> round(HingeRankingLoss(reduction="max")(sim, torch.arange(3)).item(), 4)
            1.05
    """

    has_sum_fallback = True

    def __init__(self, margin: float = 0.2, reduction: str = "max", mask: str = "diagonal") -> None:
        super().__init__()
        self.margin = float(margin)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.mask = check_choice("mask", mask, MASKS)

    def compute(self, sim: Tensor, image_ids: Tensor, caption_vectors: Tensor | None) -> Tensor:
        same = self.mask == "same_image"  # the pairs that are not negatives
        ignored = same_image_mask(image_ids) if same else diagonal_mask(len(image_ids), sim.device)
        cost_s, cost_im = hinge_costs(sim, self.margin, ignored)
        return reduce_hinge_costs(cost_s, cost_im, self.reduction_now(self.reduction))

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}, mask={self.mask!r}"


@LOSSES.register("hinge_warmup")
class WarmupHingeLoss(HingeRankingLoss):
    """VSE++ hinge loss with the VSE∞ warm-up: sum of hinges for the first epochs, then max of hinges.

    The hardest-negative loss can collapse at the start of training, when the embeddings are still
    random and the "hardest" negative is noise; averaging over all negatives first avoids that. While
    ``epoch < warmup_epochs`` this is ``HingeRankingLoss(reduction="sum")``, from then on
    ``HingeRankingLoss(reduction="max")``. The epoch comes from :meth:`set_epoch` (0-based), which the
    trainer calls at the start of every epoch; before the first call the loss is in epoch 0.

    Args:
        margin: α, as in :class:`HingeRankingLoss`.
        warmup_epochs: number of sum-of-hinges epochs (VSE∞: 1; 0 = plain VSE++ from the start).
        mask: ``"diagonal"`` or ``"same_image"``, as in :class:`HingeRankingLoss`.

    References:
        - Chen, Hu, Wu, Jiang, Wang. Learning the Best Pooling Strategy for Visual Semantic
          Embedding (VSE∞). CVPR 2021. https://arxiv.org/abs/2011.04305 (code: woodfrog/vse_infty,
          ``vse_mean_warmup_epochs``)

    Requirements:
        1. As for :class:`HingeRankingLoss`; the trainer must call ``set_epoch`` every epoch.

    Inputs:
        As for :class:`HingeRankingLoss`.

    Relations:
        - :class:`HingeRankingLoss` with a fixed ``reduction``; LSEH's VSE∞ variant drops this warm-up.

    Example:
        ::

            >>> import torch
            >>> from vsekit.losses import WarmupHingeLoss
            >>> sim = torch.tensor([[0.9, 0.5, 0.8], [0.5, 0.6, 0.3], [0.75, 0.65, 0.7]])
            >>> loss_fn = WarmupHingeLoss(margin=0.2, warmup_epochs=1)
            >>> loss_fn.set_epoch(0); round(loss_fn(sim, torch.arange(3)).item(), 4)  # sum of hinges
            1.3
            >>> loss_fn.set_epoch(1); round(loss_fn(sim, torch.arange(3)).item(), 4)  # max of hinges
            1.05
    """

    def __init__(self, margin: float = 0.2, warmup_epochs: int = 1, mask: str = "diagonal") -> None:
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0; got {warmup_epochs}")
        super().__init__(margin=margin, reduction="max", mask=mask)
        self.warmup_epochs = int(warmup_epochs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, warmup_epochs={self.warmup_epochs}, epoch={self.epoch}"
