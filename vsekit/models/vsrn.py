"""VSRN's image encoder (Li et al., ICCV 2019, "Visual Semantic Reasoning for Image-Text Matching").

Region features are projected into the joint space, related to each other by a stack of graph convolutions
over a fully connected region graph whose edge weights are learned (region relationship reasoning), and read
in sequence by a GRU whose final state is the image feature (global semantic reasoning).
"""

from __future__ import annotations

import torch
from torch import nn

from vsekit.models.base import Encoder
from vsekit.models.image import IMAGE_ENCODERS
from vsekit.models.layers import l2norm, xavier_linear_

#: how a set of region vectors (B, R, D) is normalised: each region to unit length; each of the D channels to
#: unit length over the R regions (what the reference code computes: its l2norm sums over dim 1, which on a
#: (B, R, D) tensor is the region axis); or not at all
REGION_NORMS = ("region", "across_regions", "none")


def normalise_regions(regions: torch.Tensor, how: str) -> torch.Tensor:
    """``regions`` (B, R, D) normalised as :data:`REGION_NORMS` says."""
    if how == "region":
        return l2norm(regions, dim=-1)
    if how == "across_regions":
        return l2norm(regions, dim=1)
    return regions


class RegionRelationLayer(nn.Module):
    """One graph convolution over the R regions of each image (VSRN's ``Rs_GCN``).

    Every pair of regions is an edge, weighted by a learned affinity ``A_ij = φ(v_i)ᵀψ(v_j) / R`` (φ, ψ
    linear embeddings; dividing by the number of regions keeps the sum over neighbours at the scale of one
    region). The layer aggregates ``g(V)`` (linear) along the edges, maps the result back with a linear ``W``
    and batch norm, and adds it to its input::

        V* = BN(W (A g(V))) + V

    The batch norm normalises each channel over the batch and the regions together. Its scale and shift start
    at 0, so every layer starts as the identity and the graph branch is learned from there.
    """

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.phi = nn.Linear(dim, inner)
        self.psi = nn.Linear(dim, inner)
        self.g = nn.Linear(dim, inner)
        self.out = nn.Linear(inner, dim)
        self.bn = nn.BatchNorm1d(dim)
        nn.init.zeros_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def affinity(self, v: torch.Tensor) -> torch.Tensor:
        """The (B, R, R) edge weights of the region graph of each image."""
        return self.phi(v) @ self.psi(v).transpose(1, 2) / v.shape[1]

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        y = self.out(self.affinity(v) @ self.g(v))  # (B, R, D)
        return v + self.bn(y.transpose(1, 2)).transpose(1, 2)


@IMAGE_ENCODERS.register("vsrn")
class VSRNImageEncoder(Encoder):
    """Visual semantic reasoning over region features (B, R, D) -> (B, embed_size).

    1. Each region is projected by FC(img_dim -> embed_size) (Xavier init) and normalised (``region_norm``).
    2. Region relationship reasoning: ``gcn_layers`` :class:`RegionRelationLayer`\\ s (inner width ``gcn_dim``,
       default ``embed_size`` as in VSRN), then the reasoned regions are normalised (``context_norm``).
    3. Global semantic reasoning: a GRU(embed_size -> embed_size) reads the R reasoned regions in their stored
       order; its final hidden state is the image feature, optionally batch-normalised (``feature_bn``), then
       L2-normalised by :meth:`finish` (unless ``no_imgnorm``; ``use_abs`` takes abs() after).

    :meth:`forward_parts` returns the reasoned regions (B, R, embed_size) as the context: what VSRN's caption
    decoder attends to. ``region_norm`` / ``context_norm``: ``"region"`` (each region to unit length),
    ``"across_regions"`` (each channel to unit length over the regions, what the reference code computes) or
    ``"none"``. The reference code's Flickr30K setting is ``region_norm: none, feature_bn: true``.
    ``img_dim`` and ``num_regions`` come from the data set's feature shape.
    """

    reads_features = True

    def __init__(self, img_dim: int, embed_size: int = 2048, gcn_layers: int = 4, gcn_dim: int | None = None,
                 region_norm: str = "region", context_norm: str = "region", feature_bn: bool = False,
                 num_regions: int | None = None, no_imgnorm: bool = False, use_abs: bool = False) -> None:
        super().__init__()
        if not num_regions:
            raise ValueError("vsrn reasons over region features (N, R, D); these image features are global (N, D)")
        if gcn_layers < 0:
            raise ValueError(f"image_encoder.gcn_layers must be >= 0, got {gcn_layers}")
        if gcn_dim is not None and gcn_dim < 1:
            raise ValueError(f"image_encoder.gcn_dim must be >= 1 (or null: embed_size), got {gcn_dim}")
        for key, value in (("region_norm", region_norm), ("context_norm", context_norm)):
            if value not in REGION_NORMS:
                raise ValueError(f"image_encoder.{key} must be one of {', '.join(REGION_NORMS)}; got {value!r}")
        self.fc = xavier_linear_(nn.Linear(img_dim, embed_size))
        self.gcn = nn.Sequential(*(RegionRelationLayer(embed_size, gcn_dim or embed_size) for _ in range(gcn_layers)))
        self.gru = nn.GRU(embed_size, embed_size, batch_first=True)
        self.bn = nn.BatchNorm1d(embed_size) if feature_bn else None
        self.region_norm, self.context_norm = region_norm, context_norm
        self.normalize, self.use_abs = not no_imgnorm, use_abs

    def reason_regions(self, feats: torch.Tensor) -> torch.Tensor:
        """Region relationship reasoning: (B, R, img_dim) features -> (B, R, embed_size) reasoned regions."""
        if feats.dim() != 3:
            raise ValueError(f"vsrn expects region features (B, R, D), got shape {tuple(feats.shape)}")
        regions = normalise_regions(self.fc(feats), self.region_norm)
        return normalise_regions(self.gcn(regions), self.context_norm)

    def reason_globally(self, regions: torch.Tensor) -> torch.Tensor:
        """Global semantic reasoning: the GRU's state after the last of the R regions, (B, embed_size)."""
        _, h = self.gru(regions)
        return h[-1]

    def forward_parts(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        regions = self.reason_regions(feats)
        x = self.reason_globally(regions)
        return (self.bn(x) if self.bn is not None else x), regions
