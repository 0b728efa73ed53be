"""Losses over class labels (ACMR): a label classifier shared by both modalities, and label-based triplets.

Labels are class ids ``(B,)`` (single-label: Wikipedia, NUS-WIDE-10k, Pascal Sentences) or multi-hot rows
``(B, C)`` (MSCOCO's 80 categories). Two items are "same-label" when their ids are equal, or, multi-label,
when they share at least one label.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vsekit.data.batch import Batch
from vsekit.errors import ConfigError
from vsekit.losses.base import autocast_disabled, check_choice
from vsekit.losses.terms import OBJECTIVE_TERMS, ObjectiveTerm


def share_label(a: Tensor, b: Tensor) -> Tensor:
    """(len(a), len(b)) bool: item i of ``a`` and item j of ``b`` have a label in common."""
    if a.dim() == 1:
        return a.unsqueeze(1) == b.unsqueeze(0)
    return (a.float() @ b.float().t()) > 0


class LabelClassifierLoss(ObjectiveTerm):
    """One linear classifier over the common space, shared by both modalities (ACMR's label classifier: the
    image and the text embedding of an item must both predict its label). Cross-entropy for class ids, binary
    cross-entropy per class for multi-hot labels; the mean of the image and the text terms. Unlabelled items
    (id -1) are left out."""

    global_batch = True
    requires_labels = True

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a label classifier needs at least 2 classes, got {num_classes}")
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, image_emb: Tensor, caption_emb: Tensor, labels: Tensor) -> Tensor:
        with autocast_disabled(image_emb.device):
            li, lt = self.classifier(image_emb.float()), self.classifier(caption_emb.float())
            if labels.dim() == 1:
                keep = labels >= 0
                if not keep.any():
                    return li.sum() * 0.0
                y = labels[keep]
                return (F.cross_entropy(li[keep], y) + F.cross_entropy(lt[keep], y)) / 2
            y = labels.float()
            return (F.binary_cross_entropy_with_logits(li, y) + F.binary_cross_entropy_with_logits(lt, y)) / 2

    def losses(self, out: Any, batch: Batch) -> dict[str, Tensor]:
        return {self.name: self(out.image_emb, out.caption_emb, batch.labels)}


@OBJECTIVE_TERMS.register("label")
def label_term(embed_size: int, corpus: Any = None, num_classes: int | None = None, **_: Any) -> LabelClassifierLoss:
    """The ``objective.label`` term: ``num_classes`` defaults to the training labels' number of classes
    (multi-hot labels: their width)."""
    if not num_classes:
        if corpus is None or corpus.labels is None:
            raise ConfigError("objective.label needs class labels, and the training data has none")
        num_classes = corpus.labels.shape[1] if corpus.multi_label else int(corpus.labels.max()) + 1
    return LabelClassifierLoss(embed_size, int(num_classes))


def hardest_different_label(scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """For each row i of ``scores`` (higher = closer), the column j with the highest score among labelled items
    that share no label with item i; and whether row i is labelled and has any such item. Unlabelled items are
    neither anchors nor negatives: what they are is unknown."""
    labelled = labels >= 0 if labels.dim() == 1 else labels.sum(1) > 0  # a class id, or a multi-hot one
    different = ~share_label(labels, labels) & labelled.unsqueeze(0) & labelled.unsqueeze(1)
    masked = scores.masked_fill(~different, float("-inf"))
    return masked.argmax(1), different.any(1)


class LabelTripletLoss(ObjectiveTerm):
    """Label-based triplet constraints, one hinge per triplet (ACMR's inter-modal invariance term).

    For anchor i (image v_i, text t_i) and the hardest different-label items in the batch::

        L = mean_i ( [μ + d(v_i, t_i) - d(v_i, t_n(i))]₊ + [μ + d(t_i, v_i) - d(t_i, v_m(i))]₊ )

    with ``d = ½‖·‖²`` (``distance="sq_euclidean"``, ACMR's) or ``1 - cos`` (``"cosine"``). ``t_n(i)`` is the
    text closest to v_i among items that share no label with i, ``v_m(i)`` the image closest to t_i; mined in
    the common space (``mine_in="embedding"``, the default) or, as the ACMR demo does, in the raw input
    space (``"input"``: by cosine between raw image features for the text negative and between raw text
    features for the image negative). Anchors without a different-label item in the batch are left out.

    The released demo puts one hinge around batch sums (``[μ + a·Σd⁺ - Σd⁻]₊``, a = 5); that is not a triplet
    constraint per item, and is not reproduced.
    """

    stage_keys = ("margin",)
    global_batch = True
    requires_labels = True

    def __init__(self, margin: float = 0.1, distance: str = "sq_euclidean", mine_in: str = "embedding") -> None:
        super().__init__()
        self.margin = float(margin)
        self.distance = check_choice("distance", distance, ("sq_euclidean", "cosine"))
        self.mine_in = check_choice("mine_in", mine_in, ("embedding", "input"))

    def pairwise(self, a: Tensor, b: Tensor) -> Tensor:
        if self.distance == "cosine":
            return 1.0 - F.normalize(a, dim=1) @ F.normalize(b, dim=1).t()
        return 0.5 * torch.cdist(a, b).pow(2)

    def forward(self, image_emb: Tensor, caption_emb: Tensor, labels: Tensor,
                image_inputs: Tensor | None = None, text_inputs: Tensor | None = None) -> Tensor:
        with autocast_disabled(image_emb.device):
            v, t = image_emb.float(), caption_emb.float()
            d_vt = self.pairwise(v, t)  # (B, B): image i to text j
            pos = d_vt.diagonal()
            if self.mine_in == "input":
                if image_inputs is None or text_inputs is None:
                    raise ValueError("mine_in='input' needs the raw image and text feature vectors")
                xi = F.normalize(image_inputs.flatten(1).float(), dim=1)
                xt = F.normalize(text_inputs.flatten(1).float(), dim=1)
                neg_text, ok_t = hardest_different_label(xi @ xi.t(), labels)  # text of the most similar image
                neg_image, ok_i = hardest_different_label(xt @ xt.t(), labels)  # image of the most similar text
            else:
                neg_text, ok_t = hardest_different_label(-d_vt.detach(), labels)
                neg_image, ok_i = hardest_different_label(-d_vt.detach().t(), labels)
            rows = torch.arange(len(v), device=v.device)
            to_text = (self.margin + pos - d_vt[rows, neg_text]).clamp_min(0) * ok_t
            to_image = (self.margin + pos - d_vt[neg_image, rows]).clamp_min(0) * ok_i
            count = (ok_t.sum() + ok_i.sum()).clamp_min(1)
            return (to_text.sum() + to_image.sum()) / count * 2

    def extra_repr(self) -> str:
        return f"margin={self.margin}, distance={self.distance!r}, mine_in={self.mine_in!r}"

    @property
    def reads_inputs(self) -> bool:
        return self.mine_in == "input"

    def losses(self, out: Any, batch: Batch) -> dict[str, Tensor]:
        inputs = (batch.images, batch.text[0]) if batch.images is not None else (None, None)
        return {self.name: self(out.image_emb, out.caption_emb, batch.labels, *inputs)}


@OBJECTIVE_TERMS.register("triplet")
def triplet_term(margin: float = 0.1, distance: str = "sq_euclidean", mine_in: str = "embedding",
                 **_: Any) -> LabelTripletLoss:
    return LabelTripletLoss(margin, distance, mine_in)
