"""GPO, the generalised pooling operator of VSE-infinity (Chen et al., CVPR 2021).

A set of K vectors (regions of an image, words of a caption) becomes one vector. Each feature dimension is
sorted on its own, largest value first, and the sorted values are summed with weights theta_1..theta_K
that depend only on the rank and on K:

    pooled_d = sum_k theta_k * sort_desc(x_{1..K, d})_k,   theta = softmax(g(pe(1..K)) / temperature)

where pe(k) is a sin/cos positional encoding of the rank and g a small bi-GRU plus a linear layer. Weights
peaked on rank 1 give max pooling, flat weights mean pooling, anything in between top-k-like pooling; the
network learns which. The weights do not depend on the values, only on how many there are, so samples of
the same size share them.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_positions(n: int, dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(n, dim) sin/cos encodings of the positions 0..n-1 (sin in even columns, cos in odd ones; dim even)."""
    pos = torch.arange(n, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.empty(n, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe


class GPO(nn.Module):
    """Generalised pooling over the valid elements of a padded set.

    ``forward(features (B, K, D), lengths (B,))`` -> ``(pooled (B, D), weights (B, K))``: the first
    ``lengths[b]`` rows of sample b are its set (at least one); the rest is padding and never reaches the
    result. ``weights[b, k]`` is the weight of rank k (0 past the sample's size); each row sums to 1.

    Args:
        d_pe: size of the positional encoding of a rank (the paper: 32).
        d_hidden: hidden size of each direction of the bi-GRU (the paper: 32).
        temperature: the weights' softmax temperature (the reference code: 0.1).
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32, temperature: float = 0.1) -> None:
        super().__init__()
        if d_pe % 2:
            raise ValueError(f"GPO d_pe must be even, got {d_pe}")
        if temperature <= 0:
            raise ValueError(f"GPO temperature must be > 0, got {temperature}")
        self.d_pe, self.temperature = d_pe, float(temperature)
        self.gru = nn.GRU(d_pe, d_hidden, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)

    def rank_weights(self, lengths: torch.Tensor, k: int) -> torch.Tensor:
        """(B, k) weights of the ranks for sets of ``lengths`` elements (0 past each length).

        They depend on the length alone, so the bi-GRU runs once per distinct length in the batch (once in
        all for a batch of same-size region sets)."""
        sizes, inverse = torch.unique(lengths, return_inverse=True)
        n = len(sizes)
        pe = sinusoidal_positions(k, self.d_pe, lengths.device).unsqueeze(0).expand(n, k, self.d_pe)
        packed = nn.utils.rnn.pack_padded_sequence(pe, sizes.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=k)
        half = out.shape[-1] // 2
        scores = self.linear((out[..., :half] + out[..., half:]) / 2).squeeze(-1)  # (n, k)
        valid = torch.arange(k, device=lengths.device).unsqueeze(0) < sizes.unsqueeze(1)
        scores = scores.float().masked_fill(~valid, float("-inf"))
        return torch.softmax(scores / self.temperature, dim=1)[inverse]

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor,
                                                                                           torch.Tensor]:
        b, k, _ = features.shape
        if lengths is None:
            lengths = torch.full((b,), k, dtype=torch.long, device=features.device)
        lengths = lengths.to(features.device, torch.long)
        if k == 0 or bool((lengths < 1).any()) or bool((lengths > k).any()):
            raise ValueError(f"GPO needs 1 <= length <= {k} for every sample, got {lengths.tolist()}")
        weights = self.rank_weights(lengths, k)
        valid = (torch.arange(k, device=features.device).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1)
        ranked = features.masked_fill(~valid, float("-inf")).sort(dim=1, descending=True).values
        ranked = ranked.masked_fill(~valid, 0.0)  # the valid values take ranks 0..length-1
        pooled = (ranked * weights.unsqueeze(-1).to(ranked.dtype)).sum(1)
        return pooled, weights
