"""Backbones for feature extraction: a network's last convolutional map and its pooled vector.

``--backbone`` names one of three kinds:

* a torchvision backbone of :data:`vsekit.models.image.BACKBONES` (``resnet152``, ``resnet50``, ``vgg19``,
  ``small_cnn``, ...): weights from ``--weights FILE``, else torchvision's file in the torch hub cache
  (``pretrained``; torchvision downloads it there when it is missing, unless ``$VSEKIT_OFFLINE``), else
  random (``--no-pretrained``);
* ``timm:<name>``: any timm model, with ``--weights FILE`` (``.safetensors`` / ``.pth``; another
  implementation's file of the same network loads by position), else timm's own pretrained weights (its
  download into the Hugging Face cache, unless ``$VSEKIT_OFFLINE``), else random (``--no-pretrained``);
  its images are cropped at the model's own input size unless ``--image-size`` says otherwise;
* ``vsekit:<checkpoint>``: the CNN (``cnn`` or ``timm`` image encoder) of a model trained with vsekit, with
  the image size and statistics it was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from vsekit.data.images import IMAGENET_MEAN, IMAGENET_STD
from vsekit.errors import ConfigError
from vsekit.models.image import BACKBONES, SmallCNN


class FeatureBackbone(nn.Module):
    """``feature_map(x)``: (B, C, h, w) convolutional map or (B, N, C) tokens; ``pooled(x)``: (B, D)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _ResNet(FeatureBackbone):
    """torchvision ResNet: layer4's map; pooled = its global average (what the ``cnn`` encoder sees)."""

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).mean((2, 3))


class _FeaturesThenHead(FeatureBackbone):
    """A net whose ``features`` is its conv stack and whose forward is the pooled vector: torchvision VGG
    (the last conv block's map; pooled = fc7, 4096-d, VSE++'s VGG19 features) and vsekit's small CNN."""

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Timm(FeatureBackbone):
    """A timm model (built with ``num_classes=0``): ``forward_features`` (NCHW maps, NHWC maps or tokens);
    pooled = ``forward_head(pre_logits=True)``. A ViT's prefix tokens (class, registers) are not regions."""

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        f = self.net.forward_features(x)
        if f.dim() == 4 and str(getattr(self.net, "output_fmt", "NCHW")) in ("NHWC", "Format.NHWC"):
            f = f.permute(0, 3, 1, 2)
        if f.dim() == 3:
            f = f[:, int(getattr(self.net, "num_prefix_tokens", 0) or 0):]
        return f

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)


def wrap_network(net: nn.Module, what: str) -> FeatureBackbone:
    """The :class:`FeatureBackbone` of a torchvision ResNet / VGG, a :class:`SmallCNN` or a timm model."""
    if isinstance(net, torchvision.models.ResNet):
        return _ResNet(net)
    if isinstance(net, (torchvision.models.VGG, SmallCNN)):
        return _FeaturesThenHead(net)
    if hasattr(net, "forward_features") and hasattr(net, "forward_head"):
        return _Timm(net)
    raise ConfigError(f"{what}: {type(net).__name__} is not a network vsekit can extract features from "
                      "(torchvision ResNet or VGG, small_cnn, or a timm model)")


@dataclass
class ExtractionModel:
    """A backbone with what its input needs: the image size and the normalisation it was trained with."""

    name: str
    backbone: FeatureBackbone
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    image_size: int | None = None  # None: the caller's choice (224 unless given)
    resize: int | None = None
    resize_policy: str = "short_side"


def build_backbone(name: str, weights: str | None = None, pretrained: bool = True) -> ExtractionModel:
    """The backbone ``--backbone NAME`` names (see the module docstring); ``pretrained=False`` with no
    ``weights`` gives random weights (for tests and pipeline checks)."""
    if name.startswith("vsekit:"):
        if weights:
            raise ConfigError("--weights: a vsekit checkpoint holds its own weights")
        return _from_checkpoint(name[len("vsekit:"):])
    if name.startswith("timm:"):
        from vsekit.models.timm_encoder import create_timm_model, timm_statistics

        net = create_timm_model(name[len("timm:"):], weights, where="--backbone", pretrained=pretrained)
        mean, std = timm_statistics(net)
        return ExtractionModel(name, _Timm(net), mean, std, image_size=timm_input_size(net))
    if name not in BACKBONES:
        raise ConfigError(f"--backbone: unknown backbone {name!r} (torchvision: {', '.join(BACKBONES.names())}; "
                          "or timm:<name>, or vsekit:<checkpoint>)")
    kwargs = {"width": 32} if name == "small_cnn" else {}
    net, _ = BACKBONES.build({"name": name, "pretrained": bool(pretrained and not weights and name != "small_cnn"),
                              "weights_path": weights, **kwargs})
    return ExtractionModel(name, wrap_network(net, f"--backbone {name}"))


def timm_input_size(net: nn.Module) -> int | None:
    """The square input size a timm model was trained at (its ``pretrained_cfg``: EfficientNet-Lite0 224,
    Lite1 240, Lite2 260), the default crop of its features; None when it does not say."""
    size = (getattr(net, "pretrained_cfg", None) or {}).get("input_size")
    if isinstance(size, (tuple, list)) and len(size) == 3 and size[1] == size[2] and int(size[1]) > 0:
        return int(size[1])
    return None


def _from_checkpoint(path: str) -> ExtractionModel:
    from vsekit.inference import Embedder

    emb = Embedder.from_checkpoint(path, device="cpu")
    enc = emb.model.image_encoder
    net = getattr(enc, "backbone", None)
    if not isinstance(net, nn.Module):
        name = emb.config.model.image_encoder.get("name")
        raise ConfigError(f"--backbone vsekit:{path}: its image encoder {name!r} has no CNN backbone "
                          "(the cnn and timm image encoders have one)")
    renorm = getattr(enc, "renorm", None)
    mean, std = (tuple(renorm.mean), tuple(renorm.std)) if renorm is not None else (IMAGENET_MEAN, IMAGENET_STD)
    t = emb.config.transform
    return ExtractionModel(f"vsekit:{path}", wrap_network(net, f"--backbone vsekit:{path}"), mean, std,
                           t.image_size, t.resize, t.resize_policy)


def regions(feature_map: torch.Tensor, grid: int | None) -> torch.Tensor:
    """(B, R, C) regions of a (B, C, h, w) map (R = h * w, row by row) or of (B, N, C) tokens; ``grid``:
    adaptive-average-pooled to grid x grid cells first (tokens: from their square layout)."""
    f = feature_map
    if f.dim() == 3:
        if grid is None:
            return f
        n = f.shape[1]
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ConfigError(f"--grid: the backbone gives {n} tokens, not a square grid")
        f = f.transpose(1, 2).reshape(f.shape[0], f.shape[2], side, side)
    if f.dim() != 4:
        raise ConfigError(f"the backbone's feature map has shape {tuple(f.shape)}, expected (B, C, h, w)")
    if grid is not None:
        f = nn.functional.adaptive_avg_pool2d(f, grid)
    return f.flatten(2).transpose(1, 2)
