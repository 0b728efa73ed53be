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
