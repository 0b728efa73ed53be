"""Instance loss: every training image is its own class, and one classifier is shared by both paths."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from vsekit.data.batch import Batch
from vsekit.errors import ConfigError
from vsekit.losses.base import autocast_disabled
from vsekit.losses.terms import OBJECTIVE_TERMS, ObjectiveTerm
from vsekit.models.heads import SharedClassifier


class InstanceLoss(ObjectiveTerm):
    """Cross-entropy of a classifier shared by the image and the text path over K = #training images classes.

    Zheng et al. treat each training image and its captions as one class c and train::

        L_img = CE(softmax(W f_img + b), c)        L_txt = CE(softmax(W f_txt + b), c)

    with ONE weight matrix W (and bias b) for both paths: :attr:`classifier` is a single module, so both calls
    use the same ``nn.Parameter`` and their gradients accumulate into it. Because the two modalities must
    agree on the class row, the loss pulls an image and its captions together and pushes them away from all
    other training images, without any pairwise negative mining; it is the "better start" Dual-Path uses
    before adding a ranking loss. Dropout is applied to the features before the classifier only (the
    retrieval embedding never sees it). Logits and the loss are float32 even under autocast.

    Args:
        in_dim: feature size of both paths (the encoders' pre-normalisation feature, 2048 in the paper).
        num_classes: K, the number of training images (the trainer fills it in from the training corpus:
            29,783 on the paper's Flickr30K split, 113,287 on COCO with restval).
        dropout: dropout before the classifier (paper: 0.75 Flickr30K, 0.5 COCO).
        bias: classifier bias (the reference has one on Flickr30K, none on COCO).
        init_std: std of the normal initialisation of W.

    References:
        - Zheng, Zheng, Garrett, Yang, Xu, Shen. Dual-Path Convolutional Image-Text Embeddings with Instance
          Loss. ACM TOMM 16(2), 2020. https://arxiv.org/abs/1711.05535 (code: layumi/Image-Text-Embedding)

    Requirements:
        1. ``labels`` are class ids in [0, K): the training-corpus row of each slot's image.
        2. Both features have the same size ``in_dim``.

    Inputs:
        +----------------------------------+-------------------------------+
        | features                         | labels                        |
        +==================================+===============================+
        | (B, in_dim) one path's features  | (B,) int64 image rows         |
        +----------------------------------+-------------------------------+

    Relations:
        - :class:`~vsekit.losses.dualpath.DualPathRankingLoss` is the ranking loss Dual-Path adds in stage II.
        - Any in-batch ranking loss (``hinge``, ``lseh``, ``infonce``) combines with it through the
          ``objective`` section of a config (:class:`vsekit.train.objective.Objective`).

    Example:
        ::

            >>> import torch
            >>> from vsekit.losses.instance import InstanceLoss
            >>> loss_fn = InstanceLoss(in_dim=8, num_classes=100)
            >>> img, txt = torch.randn(4, 8), torch.randn(4, 8)
            >>> labels = torch.tensor([3, 17, 42, 99])
            >>> l_img, l_txt = loss_fn.pair(img, txt, labels)
            >>> (l_img + 0.1 * l_txt).backward()
            >>> loss_fn.classifier.weight.grad.shape
            torch.Size([100, 8])
    """

    stage_keys = ("dropout",)
    global_batch = True

    def __init__(self, in_dim: int, num_classes: int, dropout: float = 0.0, bias: bool = True,
                 init_std: float = 0.001) -> None:
        super().__init__()
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"instance dropout must be in [0, 1), got {dropout}")
        self.classifier = SharedClassifier(in_dim, num_classes, bias=bias, init_std=init_std)
        self.dropout = nn.Dropout(float(dropout))

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    def logits(self, features: Tensor) -> Tensor:
        return self.classifier(self.dropout(features))

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy of one path's features against the instance labels."""
        logits = self.logits(features)
        with autocast_disabled(logits.device):
            return F.cross_entropy(logits, labels.to(logits.device))

    def pair(self, image_features: Tensor, caption_features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(L_img, L_txt) through the one shared classifier (each path gets its own dropout mask)."""
        return self(image_features, labels), self(caption_features, labels)

    # -- as the objective's term ``instance`` (``objective.instance``) -------------------------------------
    def parts(self) -> tuple[str, ...]:
        return ("instance_image", "instance_text")

    def set_stage(self, dropout: float = 0.0) -> None:
        self.dropout.p = float(dropout)

    def losses(self, out: Any, batch: Batch) -> dict[str, Tensor]:
        """Each path's loss while its weight is non-zero (a path left out draws no dropout mask)."""
        paths = {"instance_image": out.image_features, "instance_text": out.caption_features}
        return {k: self(f, batch.image_ids) for k, f in paths.items() if self.weights.get(k)}


@OBJECTIVE_TERMS.register("instance")
def instance_term(embed_size: int, corpus: Any = None, num_classes: int | None = None, dropout: float = 0.0,
                  bias: bool = True, init_std: float = 0.001, **_: Any) -> InstanceLoss:
    """The instance term of a run: every training image of ``corpus`` is a class (``num_classes`` may add more)."""
    num_images = corpus.num_images
    num_classes = int(num_classes or num_images)
    if num_classes < num_images:
        raise ConfigError(f"objective.instance.num_classes ({num_classes}) is less than the number of training "
                          f"images ({num_images}): every training image is a class")
    return InstanceLoss(embed_size, num_classes, dropout=dropout, bias=bias, init_std=init_std)
