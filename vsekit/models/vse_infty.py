"""The VSE-infinity network (Chen et al., CVPR 2021): region features or words projected one by one, then
pooled by GPO (:mod:`vsekit.models.gpo`). Its BERT text side is :mod:`vsekit.models.bert`."""

from __future__ import annotations

import torch

from vsekit.models.base import Encoder
from vsekit.models.gpo import GPO
from vsekit.models.image import IMAGE_ENCODERS
from vsekit.models.layers import MLP
from vsekit.models.text import TEXT_ENCODERS, GRUTextEncoder


@IMAGE_ENCODERS.register("vse_infty")
class VSEInftyImageEncoder(Encoder):
    """Precomputed region features (B, R, img_dim) -> per region ``fc(x) + mlp(x)`` -> GPO -> L2-norm.

    The projection is VSE-infinity's precomputed-feature encoder: a linear layer (Xavier init) plus a
    two-layer MLP branch with batch norm (:class:`~vsekit.models.layers.MLP`, hidden ``embed_size // 2``).

    ``drop_regions``: in training, each region is dropped with this probability (the reference: 0.2), so
    GPO learns on sets of varying size; a sample never loses all its regions. The draw uses torch's global
    RNG, so a seeded run repeats it. Dropped regions are absent: batch norm and GPO see only the kept ones.
    In eval mode every region is used.

    :meth:`forward_parts` returns the pooled feature and, as context, the (B, R, embed_size) projected
    regions (dropped ones zero).
    """

    reads_features = True

    def __init__(self, img_dim: int, embed_size: int = 1024, drop_regions: float = 0.2,
                 num_regions: int | None = None, no_imgnorm: bool = False, use_abs: bool = False) -> None:
        super().__init__()
        if num_regions is None:
            raise ValueError("vse_infty pools region features (N, R, D); this data set has one vector per image "
                             "(use image_encoder.name=precomp)")
        if not 0.0 <= drop_regions < 1.0:
            raise ValueError(f"drop_regions must be in [0, 1), got {drop_regions}")
        self.head = MLP(img_dim, embed_size // 2, embed_size)
        self.gpo = GPO()
        self.drop_regions = float(drop_regions)
        self.normalize, self.use_abs = not no_imgnorm, use_abs

    def kept_regions(self, b: int, r: int, device: torch.device) -> torch.Tensor | None:
        """(B, R) bool mask of the regions kept in this training step; None when all are kept."""
        if not self.training or self.drop_regions == 0.0:
            return None
        keep = torch.rand(b, r, device=device) >= self.drop_regions
        keep[:, 0] |= ~keep.any(1)  # a sample that drew no region keeps its first
        return keep

    def forward_parts(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if feats.dim() != 3:
            raise ValueError(f"vse_infty expects region features (B, R, D), got shape {tuple(feats.shape)}")
        b, r, _ = feats.shape
        keep = self.kept_regions(b, r, feats.device)
        if keep is None:
            regions = self.head(feats)
            return self.gpo(regions)[0], regions
        kept = self.head(feats[keep])  # (n_kept, E)
        regions = kept.new_zeros(b, r, kept.shape[-1])
        regions[keep] = kept
        # GPO reads a set from the first `length` rows: move each sample's kept regions to the front
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        front = regions.gather(1, order.unsqueeze(-1).expand_as(regions))
        return self.gpo(front, keep.sum(1))[0], regions


@TEXT_ENCODERS.register("bigru_gpo")
class BiGRUGPOTextEncoder(GRUTextEncoder):
    """Word embeddings -> bi-GRU (hidden ``embed_size``, the two directions averaged at every word) -> GPO
    over the valid words -> L2-norm: VSE-infinity's GRU text encoder (its ``bigru`` code branch).

    ``word_vectors`` (a GloVe / word2vec text file, or a matrix folder: :func:`~vsekit.models.text.load_word_vectors`)
    initialises the embedding, as for ``gru``.
    :meth:`forward_parts` returns the pooled feature and, as context, the (B, T, embed_size) word states.
    """

    def __init__(self, vocab_size: int, embed_size: int = 1024, word_dim: int = 300, num_layers: int = 1,
                 word_vectors: str | None = None, itos: list[str] | None = None, no_txtnorm: bool = False,
                 use_abs: bool = False) -> None:
        super().__init__(vocab_size, embed_size, word_dim, num_layers, bidirectional=True,
                         word_vectors=word_vectors, itos=itos, no_txtnorm=no_txtnorm, use_abs=use_abs,
                         pooling="mean")
        self.gpo = GPO()

    def forward_parts(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        words = self.word_states(tokens, lengths)
        return self.gpo(words, lengths)[0], words

    def forward_features(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.forward_parts(tokens, lengths)[0]
