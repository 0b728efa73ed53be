"""Feature projectors into a small common space (ACMR, Wang et al. ACM MM 2017): precomputed image features,
precomputed text features (bag of words, TF-IDF, LDA as the cross-modal benchmarks ship them), or a bag of
words over the vocabulary built from the training captions.
"""

from __future__ import annotations

import torch
from torch import nn

from vsekit.models.base import Encoder
from vsekit.models.heads import ProjectorHead
from vsekit.models.image import IMAGE_ENCODERS
from vsekit.models.text import TEXT_ENCODERS


@IMAGE_ENCODERS.register("projector")
class ImageProjector(Encoder):
    """Precomputed image features (B, D) -> FC+activation layers -> (B, embed_size). Region features (B, R, D)
    are averaged first. ``normalize`` L2-normalises the output (ACMR does not: it ranks by Euclidean distance
    between tanh outputs)."""

    reads_features = True

    def __init__(self, img_dim: int, embed_size: int = 40, hidden: list[int] | None = None,
                 activation: str = "tanh", normalize: bool = False, num_regions: int | None = None,
                 use_abs: bool = False) -> None:
        super().__init__()
        self.normalize = bool(normalize)
        self.head = ProjectorHead(img_dim, [512, 100] if hidden is None else hidden, embed_size, activation)

    def forward_features(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(feats.mean(1) if feats.dim() == 3 else feats)


@TEXT_ENCODERS.register("projector")
class TextProjector(Encoder):
    """Precomputed text features (B, Dt) -> FC+activation layers -> (B, embed_size) (the data set's
    ``caption_features``; the vocabulary is not used)."""

    reads_features = True

    def __init__(self, txt_dim: int, embed_size: int = 40, hidden: list[int] | None = None,
                 activation: str = "tanh", normalize: bool = False, vocab_size: int | None = None,
                 itos: list[str] | None = None, use_abs: bool = False) -> None:
        super().__init__()
        self.normalize = bool(normalize)
        self.head = ProjectorHead(txt_dim, [40, 100] if hidden is None else hidden, embed_size, activation)

    def forward_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


@TEXT_ENCODERS.register("bow")
class BagOfWordsProjector(Encoder):
    """A caption's bag of words over the vocabulary -> FC+activation layers -> (B, embed_size).

    The first layer is a linear layer applied to the caption's word-count vector (``mode="sum"``) or to its
    term-frequency vector (``"mean"``), computed with ``embedding_bag`` without building the |V|-dimensional
    vector; TF-IDF weighting would only rescale that layer's rows, which it learns anyway. ``<pad>``,
    ``<start>`` and ``<end>`` are left out; ``<unk>`` counts as a word.
    """

    def __init__(self, vocab_size: int, embed_size: int = 40, hidden: list[int] | None = None,
                 activation: str = "tanh", mode: str = "mean", normalize: bool = False,
                 itos: list[str] | None = None, use_abs: bool = False) -> None:
        super().__init__()
        self.normalize = bool(normalize)
        hidden = [40, 100] if hidden is None else list(hidden)
        if not hidden:
            raise ValueError("bow needs at least one hidden layer (the bag-of-words layer)")
        if mode not in ("sum", "mean"):
            raise ValueError(f"mode must be 'sum' or 'mean', got {mode!r}")
        self.mode = mode
        first = nn.Linear(vocab_size, hidden[0])  # its weight, transposed, is the bag's (V, H) table
        self.bag_weight = nn.Parameter(first.weight.detach().t().contiguous())
        self.bag_bias = nn.Parameter(first.bias.detach().clone())
        self.act = ProjectorHead(hidden[0], [], hidden[0], activation).net[1]
        self.head = ProjectorHead(hidden[0], hidden[1:], embed_size, activation)

    def forward_features(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        weights = (tokens > 2).to(self.bag_weight.dtype)  # ids 0-2: <pad>, <start>, <end>
        if self.mode == "mean":
            weights = weights / weights.sum(1, keepdim=True).clamp_min(1)
        bag = nn.functional.embedding_bag(tokens, self.bag_weight, mode="sum", per_sample_weights=weights)
        return self.head(self.act(bag + self.bag_bias))
