"""Two-level embeddings (GXN, "Look, Imagine and Match"): a high-level and a grounded embedding per side.

The image side is one encoder whose head is twice as wide -- a shared backbone with two linear heads, as GXN's
``v_h`` and ``v_l`` -- and the text side two encoders of the same kind (GXN's two GRUs, ``t_h`` and ``t_l``).
Each outputs ``[high | low]``, each half L2-normalised (and made non-negative with ``use_abs``, which order
embeddings need), so the joint-space vector is ``2 * embed_size`` wide and everything downstream (evaluation,
``encode``, the index, the server) handles it like any embedding. The similarity ``two_level_order`` scores a
pair by the sum of the two levels' order-violation similarities, ``s = s_h + s_l``.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch

from vsekit.errors import ConfigError
from vsekit.models.base import Encoder
from vsekit.models.image import IMAGE_ENCODERS
from vsekit.models.layers import l2norm
from vsekit.models.similarity import SIMILARITIES, order_sim
from vsekit.models.text import TEXT_ENCODERS
from vsekit.registry import Component


def split_levels(x: torch.Tensor, levels: int = 2) -> list[torch.Tensor]:
    """The ``levels`` equal parts of the last dimension of a multi-level embedding: [high, low]."""
    if x.shape[-1] % levels:
        raise ValueError(f"an embedding of size {x.shape[-1]} does not split into {levels} levels")
    return list(x.chunk(levels, dim=-1))


def _finish_levels(x: torch.Tensor, no_norm: bool, use_abs: bool) -> torch.Tensor:
    parts = split_levels(x)
    if not no_norm:
        parts = [l2norm(p) for p in parts]
    out = torch.cat(parts, dim=-1)
    return out.abs() if use_abs else out


def _inner_spec(spec: dict[str, Any], where: str) -> dict[str, Any]:  # validated with the config: a component
    if spec.get("name") == "two_level":
        raise ConfigError(f"{where}.name: a two-level encoder cannot hold another two-level encoder")
    return spec


@IMAGE_ENCODERS.register("two_level")
class TwoLevelImageEncoder(Encoder):
    """Any image encoder with a head of ``2 * embed_size`` outputs, read as ``[v_h | v_l]``.

    ``encoder``: the inner encoder's spec (``{name: cnn, backbone: resnet152, ...}`` or a precomputed-feature
    encoder); its backbone is shared by the two levels, its head is the two heads side by side. Fine-tuning
    (``finetune``) and freezing act on the inner encoder's backbone.
    """

    levels = 2  # the embedding is [high | low]

    def __init__(self, encoder: Annotated[dict[str, Any], Component(IMAGE_ENCODERS)], embed_size: int = 1024,
                 img_dim: int | None = None, num_regions: int | None = None, no_imgnorm: bool = False,
                 use_abs: bool = True) -> None:
        super().__init__()
        spec = _inner_spec(encoder, "model.image_encoder.encoder")  # its finish is not used
        extra = {}
        if IMAGE_ENCODERS.get(spec["name"]).reads_features:
            if img_dim is None:
                raise ConfigError("model.image_encoder.encoder reads precomputed features, but the data set holds "
                                  "image files")
            extra = {"img_dim": img_dim, "num_regions": num_regions}
        self.inner = IMAGE_ENCODERS.build(spec, embed_size=2 * embed_size, **extra)
        scope = type(self.inner).finetune_scope
        self.finetune_scope = f"inner.{scope}" if scope else None
        self.finetune = self.inner.finetune
        self.no_imgnorm, self.use_abs = no_imgnorm, use_abs

    @classmethod
    def reads_features_of(cls, spec: dict[str, Any]) -> bool:
        inner = spec.get("encoder") or {}
        return bool(inner.get("name") and IMAGE_ENCODERS.get(inner["name"]).reads_features)

    def set_finetune(self, finetune: bool) -> None:
        # the inner encoder freezes or releases its backbone (and drops the outputs it kept while frozen)
        self.inner.set_finetune(finetune)
        self.finetune = self.inner.finetune

    def forward_parts(self, *inputs: torch.Tensor):
        return self.inner.forward_parts(*inputs)

    def forward_features(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.inner.forward_features(*inputs)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return _finish_levels(x, self.no_imgnorm, self.use_abs)


@TEXT_ENCODERS.register("two_level")
class TwoLevelTextEncoder(Encoder):
    """Two text encoders of one spec (GXN: two GRUs), ``[t_h | t_l]``, each ``embed_size`` wide."""

    levels = 2

    def __init__(self, encoder: Annotated[dict[str, Any], Component(TEXT_ENCODERS)], vocab_size: int,
                 embed_size: int = 1024, itos: list[str] | None = None, use_abs: bool = True) -> None:
        super().__init__()
        spec = _inner_spec(encoder, "model.text_encoder.encoder")
        if TEXT_ENCODERS.get(spec["name"]).reads_features:
            raise ConfigError("model.text_encoder.encoder: a two-level text encoder reads words")
        self.high = TEXT_ENCODERS.build(spec, vocab_size=vocab_size, embed_size=embed_size, itos=itos)
        self.low = TEXT_ENCODERS.build(spec, vocab_size=vocab_size, embed_size=embed_size, itos=itos)
        self.use_abs = use_abs
        self.tokenize = self.high.tokenize  # an inner encoder's own tokenizer (e.g. BERT's) serves both levels

    def forward_features(self, *text: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.high.forward_features(*text), self.low.forward_features(*text)], dim=-1)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        return _finish_levels(x, False, self.use_abs)


@SIMILARITIES.register("two_level_order")
def two_level_order_sim(images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    """GXN's retrieval score: the order-violation similarity (:func:`order_sim`) of the high-level halves plus
    that of the grounded halves, ``s = s_h + s_l``."""
    (ih, il), (ch, cl) = split_levels(images), split_levels(captions)
    return order_sim(ih, ch) + order_sim(il, cl)


def level_similarities(similarity: str, images: torch.Tensor, captions: torch.Tensor,
                       levels: int = 2) -> list[torch.Tensor]:
    """The (B, B) similarity of each level, by the registered ``similarity`` (e.g. ``order``)."""
    sim = SIMILARITIES.get(similarity)
    return [sim(i, c) for i, c in zip(split_levels(images, levels), split_levels(captions, levels))]
