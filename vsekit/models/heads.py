"""Heads on top of the encoders: Dual-Path's MLP, ACMR's projectors, the shared instance classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vsekit.models.layers import MLP, xavier_linear_


class DualPathHead(nn.Module):
    """``(FC -> BN -> ReLU) x 2`` of Dual-Path (Zheng et al., ACM TOMM 2020): pool5 2048 -> 2048 -> 2048.

    The FC layers have no bias (BN follows). The output is the retrieval feature f_img *before* the L2
    normalisation, so it is non-negative, as in the paper.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = out_dim if hidden is None else int(hidden)
        self.fc1 = nn.Linear(in_dim, hidden, bias=False)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, out_dim, bias=False)
        self.bn2 = nn.BatchNorm1d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.fc1(x)))
        return torch.relu(self.bn2(self.fc2(x)))


class SharedClassifier(nn.Module):
    """One linear classifier ``W x + b`` over instance classes, meant to be called by BOTH paths.

    Sharing the very same parameter is what ties the two modalities together in the instance loss: the
    image feature and the caption feature of one instance must both score highest on the same row of W.
    Logits are computed in float32 even under autocast (a 113K-way softmax in fp16 overflows easily).
    """

    def __init__(self, in_dim: int, num_classes: int, bias: bool = True, init_std: float = 0.001) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"an instance classifier needs at least 2 classes, got {num_classes}")
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))
        self.bias = nn.Parameter(torch.zeros(num_classes)) if bias else None
        nn.init.normal_(self.weight, std=init_std)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias)

    def extra_repr(self) -> str:
        return f"in_dim={self.weight.shape[1]}, num_classes={self.num_classes}, bias={self.bias is not None}"


ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "none": nn.Identity}


class ProjectorHead(nn.Module):
    """A stack of fully connected layers with an activation after each, the last one included: ACMR's feature
    projectors (Wang et al., ACM MM 2017: three FC layers with tanh, e.g. 4096 -> 512 -> 100 -> 40)."""

    def __init__(self, in_dim: int, hidden: list[int] | tuple[int, ...], out_dim: int,
                 activation: str = "tanh") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        layers: list[nn.Module] = []
        dims = [int(in_dim), *[int(h) for h in hidden], int(out_dim)]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def joint_head(head: str, in_dim: int, embed_size: int, hidden: list[int] | None = None,
               activation: str = "tanh") -> nn.Module:
    """An image encoder's head: ``linear`` (VSE++), ``mlp`` (VSE-infinity), ``dualpath`` or ``projector``."""
    if head == "linear":
        return xavier_linear_(nn.Linear(in_dim, embed_size))
    if head == "mlp":
        return MLP(in_dim, embed_size // 2, embed_size)
    if head == "dualpath":
        return DualPathHead(in_dim, embed_size)
    return ProjectorHead(in_dim, [512, 100] if hidden is None else hidden, embed_size, activation)
