"""Adversarial modality alignment (ACMR): a modality discriminator behind a gradient-reversal layer.

The discriminator learns to tell image embeddings from text embeddings; the gradient-reversal layer (Ganin &
Lempitsky, ICML 2015, "Unsupervised Domain Adaptation by Backpropagation") passes its loss back into the
projectors with the sign flipped and scaled by λ, so in the same backward pass the discriminator minimises
the modality loss and the projectors maximise it: embeddings of the two modalities become indistinguishable.

The released ACMR demo builds the op that would send this reversed gradient into the projectors but never
runs it (it updates the projectors by the embedding loss only); here the adversarial loss is part of the
objective the projectors are trained by.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vsekit.data.batch import Batch
from vsekit.losses.base import autocast_disabled
from vsekit.losses.terms import OBJECTIVE_TERMS, ObjectiveTerm
from vsekit.models.heads import ACTIVATIONS


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, lam: float) -> Tensor:  # noqa: D102
        ctx.lam = float(lam)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        return -ctx.lam * grad, None


def grad_reverse(x: Tensor, lam: float = 1.0) -> Tensor:
    """Identity forward; the gradient flowing back is multiplied by ``-lam``."""
    return _GradReverse.apply(x, lam)


def dann_lambda(progress: float, gamma: float = 10.0) -> float:
    """The DANN schedule ``λ_p = 2 / (1 + exp(-γ p)) - 1`` for training progress ``p`` in [0, 1] (0 -> 1)."""
    p = min(max(float(progress), 0.0), 1.0)
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


class ModalityDiscriminator(nn.Module):
    """Embedding -> 2 logits (image, text). ACMR's is three linear layers ``d -> d/2 -> d/4 -> 2`` with no
    non-linearity between them (``activation="none"``, as in the paper's released code)."""

    def __init__(self, dim: int, hidden: list[int] | None = None, activation: str = "none") -> None:
        super().__init__()
        hidden = [max(1, dim // 2), max(1, dim // 4)] if hidden is None else list(hidden)
        layers: list[nn.Module] = []
        dims = [dim, *hidden]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
        layers.append(nn.Linear(dims[-1], 2))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ModalityAdversarialLoss(ObjectiveTerm):
    """Cross-entropy of the modality discriminator on both modalities' embeddings, through gradient reversal.

    ``forward(image_emb, caption_emb, lam)`` returns ``(loss, accuracy)``: the mean CE over the 2B embeddings
    (images labelled 0, captions 1) and the discriminator's accuracy on them (0.5 = chance: the adversary has
    made the modalities indistinguishable). The loss's gradient reaches the discriminator unchanged and the
    embeddings multiplied by ``-lam``.

    References:
        - Wang, Yang, Xu, Hanjalic, Shen. Adversarial Cross-Modal Retrieval. ACM MM 2017 (code:
          sunpeng981712364/ACMR_demo).
        - Ganin, Lempitsky. Unsupervised Domain Adaptation by Backpropagation. ICML 2015 (the reversal
          layer and the λ_p schedule).
    """

    # as the objective's term ``adversarial``: λ = lam x the DANN schedule at the training progress
    # (``progress: epoch`` or per ``step``), or lam (``schedule: constant``)
    stage_keys = ("schedule", "gamma", "lam", "progress")
    global_batch = True
    schedule, gamma, lam, progress = "dann", 10.0, 1.0, "epoch"
    position = 0.0  # the training progress in [0, 1] that the schedule reads

    def __init__(self, dim: int, hidden: list[int] | None = None, activation: str = "none") -> None:
        super().__init__()
        self.discriminator = ModalityDiscriminator(dim, hidden, activation)

    def forward(self, image_emb: Tensor, caption_emb: Tensor, lam: float) -> tuple[Tensor, Tensor]:
        with autocast_disabled(image_emb.device):
            x = torch.cat([image_emb.float(), caption_emb.float()])
            target = torch.cat([torch.zeros(len(image_emb), dtype=torch.long, device=x.device),
                                torch.ones(len(caption_emb), dtype=torch.long, device=x.device)])
            logits = self.discriminator(grad_reverse(x, lam))
            loss = F.cross_entropy(logits, target)
            accuracy = (logits.detach().argmax(1) == target).float().mean()
        return loss, accuracy

    def set_progress(self, epoch: float, step: float) -> None:
        self.position = step if self.progress == "step" else epoch

    def lam_now(self) -> float:
        """λ of the gradient reversal now: the DANN schedule at the current progress, or a constant."""
        return self.lam * (dann_lambda(self.position, self.gamma) if self.schedule == "dann" else 1.0)

    def losses(self, out: Any, batch: Batch) -> dict[str, Tensor]:
        """The loss, and the discriminator's accuracy and λ (to log)."""
        lam = self.lam_now()
        loss, accuracy = self(out.image_emb, out.caption_emb, lam)
        return {self.name: loss, "adv_accuracy": accuracy, "adv_lambda": loss.new_tensor(lam)}


@OBJECTIVE_TERMS.register("adversarial")
def adversarial_term(embed_size: int, hidden: list[int] | None = None, activation: str = "none",
                     **_: Any) -> ModalityAdversarialLoss:
    return ModalityAdversarialLoss(embed_size, hidden, activation)
