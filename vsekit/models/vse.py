"""The visual-semantic embedding model: an image encoder, a text encoder and a similarity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import vsekit.models.textcnn  # noqa: F401  (registers the "textcnn" text encoder)
from vsekit.models.image import IMAGE_ENCODERS
from vsekit.models.similarity import get_similarity
from vsekit.models.text import TEXT_ENCODERS


@dataclass
class PairOutput:
    """What a training objective may need from one forward pass over a batch of B pairs.

    ``*_emb`` are the joint-space embeddings (what retrieval uses), ``*_features`` the same vectors before the
    encoder's final L2 normalisation (what an instance classifier sees); ``sim`` is the (B, B) similarity of
    the batch. ``negative_*`` are the captions given as ``negative_tokens`` (e.g. mined hard negatives), encoded
    in the same text forward as the positives.
    """

    image_emb: torch.Tensor
    caption_emb: torch.Tensor
    sim: torch.Tensor
    image_features: torch.Tensor
    caption_features: torch.Tensor
    negative_emb: torch.Tensor | None = None
    negative_features: torch.Tensor | None = None


def _encode_with_features(encoder: nn.Module, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding, pre-normalisation feature); encoders without ``forward_features`` give the embedding twice."""
    if hasattr(encoder, "forward_features") and hasattr(encoder, "finish"):
        feats = encoder.forward_features(*inputs)
        return encoder.finish(feats), feats
    emb = encoder(*inputs)
    return emb, emb


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

    def embed(self, images: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor,
              negative_tokens: torch.Tensor | None = None,
              negative_lengths: torch.Tensor | None = None) -> PairOutput:
        """The forward pass of training: embeddings, pre-normalisation features and the batch similarity.

        Negative captions go through the text encoder in one batch with the positives (as in the Dual-Path
        reference, where mined captions fill half of the text batch), so batch norm sees both.
        """
        img, img_feat = _encode_with_features(self.image_encoder, images)
        b = tokens.shape[0]
        if negative_tokens is not None:
            tokens, lengths = concat_tokens(tokens, lengths, negative_tokens, negative_lengths)
        cap, cap_feat = _encode_with_features(self.text_encoder, tokens, lengths)
        out = PairOutput(img, cap[:b], self.similarity(img, cap[:b]), img_feat, cap_feat[:b])
        if negative_tokens is not None:
            out.negative_emb, out.negative_features = cap[b:], cap_feat[b:]
        return out


def concat_tokens(tokens: torch.Tensor, lengths: torch.Tensor, more: torch.Tensor,
                  more_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack two padded token batches (padding id 0) into one, padded to the longer of the two."""
    t = max(tokens.shape[1], more.shape[1])
    a = torch.nn.functional.pad(tokens, (0, t - tokens.shape[1]))
    b = torch.nn.functional.pad(more.to(tokens.device), (0, t - more.shape[1]))
    return torch.cat([a, b]), torch.cat([lengths, more_lengths.to(lengths.device)])


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
    if txt_spec.get("name") in ("gru", "textcnn"):
        txt_spec.setdefault("itos", itos)
    image_encoder = IMAGE_ENCODERS.build(img_spec, embed_size=embed_size)
    text_encoder = TEXT_ENCODERS.build(txt_spec, vocab_size=vocab_size, embed_size=embed_size)
    return VSEModel(image_encoder, text_encoder, similarity=cfg.get("similarity", "cosine"))
