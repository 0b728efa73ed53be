"""What the encoders around other libraries' models (timm, open_clip) share."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vsekit.data.images import IMAGENET_MEAN, IMAGENET_STD


class Renormalize(nn.Module):
    """Re-normalise images from vsekit's ImageNet statistics to a model's own (CLIP's, Inception's 0.5, ...).

    vsekit's transforms normalise every image with the ImageNet mean and std; a model trained with other
    statistics gets ``(x * std_in + mean_in - mean) / std``, one per-channel affine map, exactly what its own
    preprocessing would have given. Identity when the statistics agree. The constants are buffers outside the
    state dict: they follow from the config, not from training.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std must be 3 values each (std > 0), got mean={mean}, std={std}")
        self.mean, self.std = mean, std
        self.identity = mean == tuple(IMAGENET_MEAN) and std == tuple(IMAGENET_STD)
        m_in, s_in = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        m, s = torch.tensor(mean), torch.tensor(std)
        self.register_buffer("scale", (s_in / s).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((m_in - m) / s).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


def registry_name(name: str, library: str, where: str) -> str:
    """A model name of ``library``'s own registry; names with a scheme (``hf-hub:...``) would fetch files."""
    if not isinstance(name, str) or not name or ":" in name or name.startswith(("http", "/")):
        raise ValueError(f"{where} must be an architecture name of {library} (e.g. resnet50); names with a scheme "
                         f"such as hf-hub: would download. Give the weights as a local file instead, got {name!r}")
    return name
