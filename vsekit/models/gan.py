"""The parts of a text-conditioned GAN (GXN's text-to-image path, built StackGAN stage-I style).

- :class:`ConditioningAugmentation`: a linear map of the text embedding t to the mean and log-variance of a
  Gaussian, and a reparameterised sample ĉ = μ + σ·ε from it. Sampling the condition instead of using t
  itself smooths the conditioning manifold (a few thousand captions give a few thousand points otherwise);
  :func:`kl_to_standard_normal` keeps the Gaussian near N(0, I).
- :class:`ImageGenerator`: (z, ĉ) -> a 3 x S x S image in [-1, 1] (tanh): a linear layer to a 4 x 4 map,
  then nearest-neighbour upsampling blocks (x2, 3x3 conv, batch norm, ReLU) up to S.
- :class:`MatchingDiscriminator`: (image, t) -> one logit. Strided convolutions bring the image to 4 x 4; the
  condition t, compressed by a linear layer, is replicated over the 4 x 4 cells and concatenated; a 3x3 conv
  and a 4x4 conv give the logit. Trained matching-aware (GAN-CLS): a real image with a wrong caption is fake.

Widths are options (``gf_dim``, ``df_dim``), so a CPU demo can use a few channels per layer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

KL_REDUCTIONS = ("dim_mean", "sum")


class ConditioningAugmentation(nn.Module):
    """t (B, t_dim) -> (ĉ, μ, log σ²), each (B, c_dim); ĉ = μ + exp(½ log σ²)·ε with ε ~ N(0, I).

    ``noise`` gives ε explicitly (deterministic sampling: ``vsekit imagine``); zeros give ĉ = μ. The map is
    linear (no activation after it), so μ and log σ² can take any sign.
    """

    def __init__(self, t_dim: int, c_dim: int) -> None:
        super().__init__()
        self.c_dim = int(c_dim)
        self.fc = nn.Linear(t_dim, 2 * self.c_dim)

    def forward(self, t: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.fc(t).chunk(2, dim=-1)
        eps = torch.randn_like(mu) if noise is None else noise.to(mu)
        return mu + torch.exp(0.5 * logvar) * eps, mu, logvar


def kl_to_standard_normal(mu: Tensor, logvar: Tensor, reduction: str = "dim_mean") -> Tensor:
    """KL(N(μ, diag σ²) ‖ N(0, I)) = ½ Σ_k (μ_k² + σ_k² − 1 − log σ_k²), averaged over the batch.

    ``reduction="sum"``: that KL per sample (summed over the c_dim dimensions), the batch mean.
    ``"dim_mean"``: the same divided by c_dim (the mean over batch *and* dimensions), the scale at which
    StackGAN's released code applies its KL weight of 2.
    """
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(KL_REDUCTIONS)}, got {reduction!r}")
    per_dim = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
    per_sample = per_dim.sum(dim=-1)
    if reduction == "dim_mean":
        per_sample = per_sample / mu.shape[-1]
    return per_sample.mean()


def _check_size(image_size: int) -> int:
    if image_size < 8 or image_size & (image_size - 1):
        raise ValueError(f"image_size must be a power of two >= 8, got {image_size}")
    return int(math.log2(image_size)) - 2  # upsampling / downsampling steps between 4 x 4 and the image


class ImageGenerator(nn.Module):
    """(z (B, z_dim), ĉ (B, c_dim)) -> images (B, 3, S, S) in [-1, 1].

    Channels: ``8·gf_dim`` at 4 x 4, halved by each upsampling block (``gf_dim / 2`` at 64 x 64, as StackGAN's
    stage I), then a 3x3 conv to RGB and tanh.
    """

    def __init__(self, z_dim: int, c_dim: int, gf_dim: int = 64, image_size: int = 64) -> None:
        super().__init__()
        steps = _check_size(image_size)
        self.z_dim, self.image_size = int(z_dim), int(image_size)
        ch = 8 * gf_dim
        self.start = ch
        self.fc = nn.Sequential(nn.Linear(z_dim + c_dim, ch * 16, bias=False), nn.BatchNorm1d(ch * 16), nn.ReLU(True))
        blocks: list[nn.Module] = []
        for _ in range(steps):
            out = max(1, ch // 2)
            blocks += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, out, 3, padding=1, bias=False),
                       nn.BatchNorm2d(out), nn.ReLU(True)]
            ch = out
        self.up = nn.Sequential(*blocks)
        self.to_rgb = nn.Sequential(nn.Conv2d(ch, 3, 3, padding=1), nn.Tanh())

    def forward(self, z: Tensor, c: Tensor) -> Tensor:
        x = self.fc(torch.cat([z, c], dim=1)).view(z.shape[0], self.start, 4, 4)
        return self.to_rgb(self.up(x))


class MatchingDiscriminator(nn.Module):
    """(images (B, 3, S, S), t (B, t_dim)) -> logits (B,): "a real image, and t describes it".

    Downsampling: 4x4 stride-2 convs with leaky ReLU (batch norm after all but the first), ``df_dim`` channels
    doubling per step up to ``8·df_dim`` at 4 x 4. The condition: ``Linear(t_dim, c_dim)`` + leaky ReLU,
    replicated over the 4 x 4 cells and concatenated to the image code.
    """

    def __init__(self, t_dim: int, c_dim: int, df_dim: int = 64, image_size: int = 64) -> None:
        super().__init__()
        steps = _check_size(image_size)
        layers: list[nn.Module] = []
        ch_in = 3
        for k in range(steps):
            ch = df_dim * 2 ** min(k, 3)
            layers.append(nn.Conv2d(ch_in, ch, 4, stride=2, padding=1, bias=k == 0))
            if k:
                layers.append(nn.BatchNorm2d(ch))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            ch_in = ch
        self.image_code = nn.Sequential(*layers)
        self.condition = nn.Sequential(nn.Linear(t_dim, c_dim), nn.LeakyReLU(0.2, inplace=True))
        self.joint = nn.Sequential(nn.Conv2d(ch_in + c_dim, ch_in, 3, padding=1, bias=False), nn.BatchNorm2d(ch_in),
                                   nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(ch_in, 1, 4))

    def encode(self, images: Tensor) -> Tensor:
        """The 4 x 4 image code (computed once for an image scored with several captions)."""
        return self.image_code(images)

    def logits(self, code: Tensor, t: Tensor) -> Tensor:
        """(B,) logits of image codes (B, C, 4, 4) paired with conditions t (B, t_dim)."""
        cond = self.condition(t)[:, :, None, None].expand(-1, -1, code.shape[2], code.shape[3])
        return self.joint(torch.cat([code, cond], dim=1)).flatten()

    def forward(self, images: Tensor, t: Tensor) -> Tensor:
        return self.logits(self.encode(images), t)
