"""Image encoders: precomputed features or a torchvision CNN, projected into the joint space."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from torch import nn

from vsekit.models.base import Encoder
from vsekit.models.frozen_cache import FrozenOutputs
from vsekit.models.gpo import GPO
from vsekit.models.heads import joint_head
from vsekit.models.layers import l2norm
from vsekit.models.weights import (
    OFFLINE_ENV,
    PretrainedWeightsMissing,
    initial_weights_wanted,
    library_download,
)
from vsekit.registry import Registry

IMAGE_ENCODERS = Registry("image encoder", injected=("embed_size", "img_dim", "num_regions"))
BACKBONES = Registry("CNN backbone")


@IMAGE_ENCODERS.register("precomp")
class PrecompImageEncoder(Encoder):
    """Projects precomputed features: (B, D) global or (B, R, D) region features.

    ``pooling`` for region features: ``"mean"`` (project each region, average), ``"max"``, ``"gpo"``
    (VSE-infinity's generalised pooling) or ``"flatten"`` (concatenate the R regions and project once, as the
    LSEH code's VSE++ variant does: Linear(R*D -> embed)). ``head``: ``"linear"`` (VSE++) or ``"mlp"``.
    ``img_dim`` and ``num_regions`` come from the data set's feature shape.
    """

    reads_features = True

    def __init__(self, img_dim: int, embed_size: int = 1024, head: str = "linear", pooling: str = "mean",
                 num_regions: int | None = None, no_imgnorm: bool = False, use_abs: bool = False) -> None:
        super().__init__()
        if pooling not in ("mean", "max", "gpo", "flatten"):
            raise ValueError(f"image_encoder.pooling must be mean, max, gpo or flatten, got {pooling!r}")
        if pooling == "flatten":
            if not num_regions:
                raise ValueError("pooling 'flatten' needs region features (N, R, D)")
            in_dim = img_dim * num_regions
        else:
            in_dim = img_dim
        if head not in ("linear", "mlp"):
            raise ValueError(f"image_encoder.head must be 'linear' or 'mlp', got {head!r}")
        self.head = joint_head(head, in_dim, embed_size)
        self.pooling = pooling
        self.gpo = GPO() if pooling == "gpo" else None
        self.normalize, self.use_abs = not no_imgnorm, use_abs

    def forward_features(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.dim() == 3:
            if self.pooling == "flatten":
                return self.head(feats.flatten(1))
            x = self.head(feats)
            if self.pooling == "mean":
                return x.mean(1)
            if self.pooling == "max":
                return x.max(1).values
            return self.gpo(x)[0]
        return self.head(feats)


def _load_torchvision(arch: str, pretrained: bool, weights_path: str | None) -> nn.Module:
    model = torchvision.models.get_model(arch, weights=None)
    if not initial_weights_wanted():  # a checkpoint is being rebuilt: its weights replace these
        return model
    if weights_path:
        path = Path(weights_path)
        if not path.is_file():
            raise PretrainedWeightsMissing(f"image_encoder.weights_path: no such file {path}")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    elif pretrained:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True) if path.is_file()
                              else _torchvision_download(arch, weights, path))
    return model


def _torchvision_download(arch: str, weights, path: Path) -> dict[str, torch.Tensor]:
    """torchvision's own download of ``weights`` into its cache (``path``, under ``$TORCH_HOME``), hash
    checked, read without running code; a clear error when downloads are off or it fails."""
    how = (f"Fetch {weights.url} into {path.parent} (or set TORCH_HOME), pass image_encoder.weights_path=FILE, "
           "or use image_encoder.pretrained=false.")
    return library_download(
        lambda: weights.get_state_dict(progress=False, check_hash=True, weights_only=True),
        announce=f"pretrained weights for {arch}: downloading {weights.url} into torchvision's cache {path.parent}",
        offline=f"pretrained ImageNet weights for {arch} are not on this machine: expected {path}, and vsekit does "
                f"not download weights while {OFFLINE_ENV} is set. {how}",
        failed=lambda why: f"pretrained ImageNet weights for {arch} are not on this machine (expected {path}) and "
                           f"torchvision's download failed ({why}); vsekit does not download them otherwise. {how}")


def _resnet(arch: str):
    def build(pretrained: bool = False, weights_path: str | None = None) -> tuple[nn.Module, int]:
        m = _load_torchvision(arch, pretrained, weights_path)
        dim = m.fc.in_features
        m.fc = nn.Identity()
        return m, dim

    return build


for _arch in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
    BACKBONES.register(_arch)(_resnet(_arch))


@BACKBONES.register("vgg19")
def _vgg19(pretrained: bool = False, weights_path: str | None = None) -> tuple[nn.Module, int]:
    m = _load_torchvision("vgg19", pretrained, weights_path)
    m.classifier = nn.Sequential(*list(m.classifier.children())[:-1])  # drop the last FC: 4096-d fc7
    return m, 4096


class SmallCNN(nn.Module):
    """A four-block conv net for small images (the demo's 64x64 scenes): fast on a CPU."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:  # 0 built, then failed in forward
            raise ValueError(f"width must be a whole number >= 1, got {width!r}")
        # a stride-2 stem halves the resolution before the first block: 2.5x fewer FLOPs at 64x64
        layers = [nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        c_in = width
        for c_out in (width, width * 2, width * 4, width * 8):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.out_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean((2, 3))


@BACKBONES.register("small_cnn")
def _small_cnn(pretrained: bool = False, weights_path: str | None = None, width: int = 32) -> tuple[nn.Module, int]:
    if pretrained and not weights_path:
        raise PretrainedWeightsMissing("backbone small_cnn has no published pretrained weights; use pretrained=false")
    m = SmallCNN(width)
    if weights_path and initial_weights_wanted():
        m.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return m, m.out_dim


IMAGE_HEADS = ("linear", "mlp", "dualpath", "projector")


@IMAGE_ENCODERS.register("cnn")
class CNNImageEncoder(FrozenOutputs, Encoder):
    """A torchvision CNN projected into the joint space by a head.

    ``head="linear"``: VSE++ ``EncoderImageFull`` (CNN features L2-normalised, then one linear layer);
    ``"mlp"``: the VSE-infinity MLP on the normalised features; ``"dualpath"``: Dual-Path's (FC + BN + ReLU) x 2
    on the raw pooled features (:class:`~vsekit.models.heads.DualPathHead`, hidden size ``embed_size``);
    ``"projector"``: ACMR's FC+tanh stack (``hidden`` sizes, ``activation``) on the pooled features.

    ``backbone_norm``: L2-normalise the pooled CNN feature before the head (VSE++ does, on pretrained
    features); default: yes for the linear and MLP heads, no for the Dual-Path head. From random weights
    the pooled features of all images point in nearly one direction, and normalising them removes the
    one thing (their size) that still tells them apart; ``backbone_norm: false`` is for training from scratch.

    ``finetune=False`` freezes the CNN (no gradients, batch norm kept in eval mode); the trainer may flip it
    between stages with :meth:`~vsekit.models.base.Encoder.set_finetune`. A frozen CNN's pooled output is kept per
    image while training on the CPU (``cache_mb``, default 512 MiB, 0: off; :mod:`vsekit.models.frozen_cache`).
    ``norm_eval: true`` keeps the CNN's batch norm in eval mode while it is fine-tuned (running statistics fixed).
    """

    finetune_scope = "backbone"

    def __init__(self, embed_size: int = 1024, backbone: str = "resnet152", pretrained: bool = False,
                 finetune: bool = False, weights_path: str | None = None, head: str = "linear",
                 no_imgnorm: bool = False, use_abs: bool = False, width: int = 32,
                 backbone_norm: bool | None = None, hidden: list[int] | None = None,
                 activation: str = "tanh", cache_mb: float = 512.0, norm_eval: bool = False) -> None:
        super().__init__()
        self.norm_eval = bool(norm_eval)
        self.init_frozen_cache(cache_mb, "model.image_encoder")
        if head not in IMAGE_HEADS:
            raise ValueError(f"image_encoder.head must be one of {IMAGE_HEADS}, got {head!r}")
        kwargs = {"width": width} if backbone == "small_cnn" else {}
        self.backbone, feat_dim = BACKBONES.build({"name": backbone, "pretrained": pretrained,
                                                   "weights_path": weights_path, **kwargs})
        self.head = joint_head(head, feat_dim, embed_size, hidden, activation)
        self.normalize_backbone = head != "dualpath" if backbone_norm is None else bool(backbone_norm)
        self.normalize, self.use_abs = not no_imgnorm, use_abs
        self.set_finetune(finetune)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """The head's output before the L2 normalisation (f_img of Dual-Path)."""
        feats = self.frozen(self.backbone, images)  # frozen (finetune: false): no graph through it, outputs kept
        return self.head(l2norm(feats) if self.normalize_backbone else feats)
