"""Small building blocks shared by the encoders."""

from __future__ import annotations

import math

import torch
from torch import nn


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """L2-normalise along ``dim`` (with an eps, unlike the VSE++ reference which divides by the raw norm)."""
    return x / x.norm(dim=dim, keepdim=True).clamp_min(eps)


def xavier_linear_(layer: nn.Linear) -> nn.Linear:
    """VSE++ init: Xavier-uniform weights r = sqrt(6 / (in + out)), zero bias."""
    r = math.sqrt(6.0) / math.sqrt(layer.in_features + layer.out_features)
    nn.init.uniform_(layer.weight, -r, r)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class MLP(nn.Module):
    """Two-layer MLP with BN + ReLU in between, plus a linear residual path (the VSE-infinity head)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, out_dim)
        self.skip = xavier_linear_(nn.Linear(in_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        h = torch.relu(self.bn(self.fc1(flat)))
        return (self.fc2(h) + self.skip(flat)).reshape(*shape[:-1], -1)


def _positional_encoding(length: torch.Tensor, d: int, max_len: int) -> torch.Tensor:
    pos = torch.arange(max_len, device=length.device, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, d, 2, device=length.device, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(max_len, d, device=length.device)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe


class GPO(nn.Module):
    """Generalised pooling operator (VSE-infinity, Chen et al. 2021).

    Each feature dimension is sorted (descending) over the K set elements and pooled with weights that a small
    bi-GRU computes from the positional encodings of the ranks 1..K, so the pooling can learn anything between
    mean and max pooling. ``lengths`` gives the number of valid elements per sample (all K when omitted).
    """

    def __init__(self, d_pe: int = 32, d_hidden: int = 32) -> None:
        super().__init__()
        self.d_pe = d_pe
        self.gru = nn.GRU(d_pe, d_hidden, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        b, k, _ = features.shape
        if lengths is None:
            lengths = torch.full((b,), k, dtype=torch.long, device=features.device)
        pe = _positional_encoding(lengths, self.d_pe, k).unsqueeze(0).expand(b, k, self.d_pe)
        valid = torch.arange(k, device=features.device).unsqueeze(0) < lengths.unsqueeze(1)  # (B, K)
        pe = pe * valid.unsqueeze(-1)
        packed = nn.utils.rnn.pack_padded_sequence(pe, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=k)
        half = out.shape[-1] // 2
        scores = self.linear((out[..., :half] + out[..., half:]) / 2).squeeze(-1)  # (B, K)
        scores = scores.masked_fill(~valid, float("-inf"))
        weights = torch.softmax(scores / 0.1, dim=1)
        masked = features.masked_fill(~valid.unsqueeze(-1), float("-inf"))
        sorted_feats = masked.sort(dim=1, descending=True).values.masked_fill(~valid.unsqueeze(-1), 0.0)
        return (sorted_feats * weights.unsqueeze(-1)).sum(1)
