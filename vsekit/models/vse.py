"""The visual-semantic embedding model: an image encoder, a text encoder and a similarity."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vsekit.models.image import IMAGE_ENCODERS
from vsekit.models.similarity import get_similarity
from vsekit.models.text import TEXT_ENCODERS


class VSEModel(nn.Module):
    """Two encoders into one joint space; ``similarity(images, captions)`` scores every pair."""

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, similarity: str = "cosine") -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.similarity_name = similarity
        self._sim = get_similarity(similarity)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(images)

    def encode_captions(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(tokens, lengths)

    def similarity(self, image_emb: torch.Tensor, caption_emb: torch.Tensor) -> torch.Tensor:
        return self._sim(image_emb, caption_emb)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor):
        img, cap = self.encode_images(images), self.encode_captions(tokens, lengths)
        return img, cap, self.similarity(img, cap)


def build_model(model_cfg: dict[str, Any], *, vocab_size: int, itos: list[str] | None = None,
                feature_shape: tuple[int, ...] | None = None) -> VSEModel:
    """Build a :class:`VSEModel` from the ``model`` section of a config.

    ``feature_shape`` is the per-image shape of precomputed features ((D,) or (R, D)); it sets the
    precomputed encoder's input size so recipes need not repeat it.
    """
    cfg = dict(model_cfg)
    embed_size = int(cfg.get("embed_size", 1024))
    use_abs = bool(cfg.get("use_abs", False))
    img_spec = dict(cfg.get("image_encoder") or {"name": "precomp"})
    img_spec.setdefault("use_abs", use_abs)
    if img_spec.get("name") == "precomp":
        if feature_shape is None:
            raise ValueError("model.image_encoder 'precomp' needs a precomputed-feature data set")
        img_spec.setdefault("img_dim", int(feature_shape[-1]))
        if len(feature_shape) == 2:
            img_spec.setdefault("num_regions", int(feature_shape[0]))
    txt_spec = dict(cfg.get("text_encoder") or {"name": "gru"})
    txt_spec.setdefault("use_abs", use_abs)
    if txt_spec.get("name") == "gru":
        txt_spec.setdefault("itos", itos)
    image_encoder = IMAGE_ENCODERS.build(img_spec, embed_size=embed_size)
    text_encoder = TEXT_ENCODERS.build(txt_spec, vocab_size=vocab_size, embed_size=embed_size)
    return VSEModel(image_encoder, text_encoder, similarity=cfg.get("similarity", "cosine"))
