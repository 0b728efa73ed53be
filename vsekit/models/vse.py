"""The visual-semantic embedding model: an image encoder, a text encoder and a similarity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import vsekit.models.textcnn  # noqa: F401  (registers the "textcnn" text encoder)
from vsekit.errors import ConfigError
from vsekit.models.base import Encoder
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


def _encode_with_features(encoder: Encoder, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding, pre-normalisation feature) from one pass through the encoder."""
    feats = encoder.forward_features(*inputs)
    return encoder.finish(feats), feats


class VSEModel(nn.Module):
    """Two encoders into one joint space; ``similarity(images, captions)`` scores every pair."""

    def __init__(self, image_encoder: Encoder, text_encoder: Encoder, similarity: str = "cosine") -> None:
        super().__init__()
        for what, enc in (("image", image_encoder), ("text", text_encoder)):
            if not isinstance(enc, Encoder):
                raise TypeError(f"the {what} encoder must be a vsekit.models.base.Encoder, got {type(enc).__name__}")
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


def build_model(model_cfg: Any, *, vocab_size: int, itos: list[str] | None = None,
                feature_shape: tuple[int, ...] | None = None) -> VSEModel:
    """Build a :class:`VSEModel` from the ``model`` section of a config (a ``ModelConfig`` or a plain dict).

    ``feature_shape`` is the per-image shape of precomputed features ((D,) or (R, D)); encoders that read
    features (``reads_features``) get their input size from it, so recipes need not repeat it. ``itos``
    (the vocabulary's words) lets a text encoder load word vectors; ``None`` when rebuilding a checkpoint.
    """
    cfg = dict(model_cfg) if isinstance(model_cfg, dict) else model_cfg.model_dump()
    if "embed_size" not in cfg:
        raise ConfigError("model.embed_size: required (the size of the joint space)")
    embed_size = int(cfg["embed_size"])
    use_abs = bool(cfg.get("use_abs", False))
    img_spec = dict(cfg.get("image_encoder") or {"name": "precomp"})
    img_spec.setdefault("use_abs", use_abs)
    extra: dict[str, Any] = {}
    if IMAGE_ENCODERS.get(img_spec.get("name", "precomp")).reads_features:
        if feature_shape is None:
            raise ConfigError(f"model.image_encoder {img_spec.get('name')!r} reads precomputed features, but the "
                              "data set holds image files; use an image encoder such as 'cnn', or precomputed data")
        extra["img_dim"] = int(feature_shape[-1])
        extra["num_regions"] = int(feature_shape[0]) if len(feature_shape) == 2 else None
    txt_spec = dict(cfg.get("text_encoder") or {"name": "gru"})
    txt_spec.setdefault("use_abs", use_abs)
    image_encoder = IMAGE_ENCODERS.build(img_spec, embed_size=embed_size, **extra)
    text_encoder = TEXT_ENCODERS.build(txt_spec, vocab_size=vocab_size, embed_size=embed_size, itos=itos)
    return VSEModel(image_encoder, text_encoder, similarity=cfg.get("similarity", "cosine"))
