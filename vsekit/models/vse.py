"""The visual-semantic embedding model: an image encoder, a text encoder and a similarity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vsekit.errors import ConfigError
from vsekit.models.base import Encoder
from vsekit.models.image import IMAGE_ENCODERS
from vsekit.models.similarity import FixedSimilarity, SimilarityNetwork, build_similarity
from vsekit.models.text import TEXT_ENCODERS


@dataclass
class PairOutput:
    """What a training objective may need from one forward pass over a batch of B pairs.

    ``*_emb`` are the joint-space embeddings (what retrieval uses), ``*_features`` the same vectors before the
    encoder's final L2 normalisation (what an instance classifier sees); ``sim`` is the (B, B) similarity of
    the batch (for a similarity network: its scores of every pair, from the contexts). ``negative_emb`` embeds
    the captions given as ``negative_text`` (e.g. mined hard negatives), in the same text forward as the positives.
    """

    image_emb: torch.Tensor
    caption_emb: torch.Tensor
    sim: torch.Tensor
    image_features: torch.Tensor
    caption_features: torch.Tensor
    negative_emb: torch.Tensor | None = None
    # what the encoders' forward_parts returned beside the features (e.g. regions for a caption decoder)
    image_context: torch.Tensor | None = None
    caption_context: torch.Tensor | None = None
    caption_lengths: torch.Tensor | None = None  # valid rows of caption_context (token inputs only)


def _encode_with_features(encoder: Encoder, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                            torch.Tensor | None]:
    """(embedding, pre-normalisation feature, context) from one pass through the encoder."""
    feats, context = encoder.forward_parts(*inputs)
    return encoder.finish(feats), feats, context


class VSEModel(nn.Module):
    """Two encoders into one joint space and a similarity that scores every (image, caption) pair.

    ``similarity`` is a module: a :class:`~vsekit.models.similarity.FixedSimilarity` (a parameter-free function
    of the two embedding matrices, ``similarity(image_emb, caption_emb)``) or a
    :class:`~vsekit.models.similarity.SimilarityNetwork` (parameters ``similarity.*``, trained with the
    encoders), which scores the encoders' contexts: ``similarity(image_context, caption_context, lengths)``.
    :meth:`score_pairs` calls either one the right way.
    """

    def __init__(self, image_encoder: Encoder, text_encoder: Encoder,
                 similarity: str | FixedSimilarity | SimilarityNetwork = "cosine") -> None:
        super().__init__()
        for what, enc in (("image", image_encoder), ("text", text_encoder)):
            if not isinstance(enc, Encoder):
                raise TypeError(f"the {what} encoder must be a vsekit.models.base.Encoder, got {type(enc).__name__}")
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.similarity = FixedSimilarity(similarity) if isinstance(similarity, str) else similarity

    @property
    def similarity_name(self) -> str:
        return self.similarity.name

    @property
    def learned_similarity(self) -> bool:
        """True when the similarity is a network over the contexts (its scores need the contexts, not just
        the embeddings)."""
        return isinstance(self.similarity, SimilarityNetwork)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(images)

    def encode_captions(self, *text: torch.Tensor) -> torch.Tensor:
        """Caption embeddings from the text encoder's inputs: ``(tokens, lengths)``, or ``(features,)`` for an
        encoder over precomputed text features."""
        return self.text_encoder(*text)

    def encode_image_parts(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embeddings, context) of images from one pass: what a similarity network needs beside the vectors."""
        emb, _, ctx = _encode_with_features(self.image_encoder, images)
        return emb, ctx

    def encode_caption_parts(self, *text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                  torch.Tensor | None]:
        """(embeddings, context, lengths) of captions from one pass; lengths: the valid context rows."""
        emb, _, ctx = _encode_with_features(self.text_encoder, *text)
        return emb, ctx, _lengths(text)

    @property
    def reads_text_features(self) -> bool:
        return self.text_encoder.reads_features

    def score_pairs(self, image_emb: torch.Tensor, caption_emb: torch.Tensor,
                    image_context: torch.Tensor | None = None, caption_context: torch.Tensor | None = None,
                    caption_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(N, M) scores of N images against M captions by the model's similarity: of the embeddings, or,
        for a similarity network, of the contexts."""
        if not self.learned_similarity:
            return self.similarity(image_emb, caption_emb)
        if caption_context is not None and caption_lengths is None:
            raise ConfigError("model.similarity: a similarity network needs the caption lengths, which only a "
                              "text encoder over tokens provides")
        return self.similarity(image_context, caption_context, caption_lengths)

    def forward(self, images: torch.Tensor, *text: torch.Tensor):
        img, img_ctx = self.encode_image_parts(images)
        cap, cap_ctx, lengths = self.encode_caption_parts(*text)
        return img, cap, self.score_pairs(img, cap, img_ctx, cap_ctx, lengths)

    def embed(self, images: torch.Tensor, text: tuple[torch.Tensor, ...],
              negative_text: tuple[torch.Tensor, ...] | None = None) -> PairOutput:
        """The forward pass of training: embeddings, pre-normalisation features and the batch similarity.

        ``text`` is the text encoder's input tuple. Negative captions go through the text encoder in one batch
        with the positives (as in the Dual-Path reference, where mined captions fill half of the text batch),
        so batch norm sees both.
        """
        img, img_feat, img_ctx = _encode_with_features(self.image_encoder, images)
        b = text[0].shape[0]
        if negative_text is not None:
            text = concat_text(text, negative_text)
        cap, cap_feat, cap_ctx = _encode_with_features(self.text_encoder, *text)
        lengths = _lengths(text)
        cap_ctx = cap_ctx[:b] if cap_ctx is not None else None
        lengths = lengths[:b] if lengths is not None else None
        sim = self.score_pairs(img, cap[:b], img_ctx, cap_ctx, lengths)
        out = PairOutput(img, cap[:b], sim, img_feat, cap_feat[:b], image_context=img_ctx, caption_context=cap_ctx,
                         caption_lengths=lengths)
        if negative_text is not None:
            out.negative_emb = cap[b:]
        return out


def _lengths(text: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """The caption lengths of a text input tuple ``(tokens, lengths)``; None for ``(features,)``."""
    return text[1] if len(text) == 2 else None


def concat_text(text: tuple[torch.Tensor, ...], more: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Stack two batches of text inputs: padded token batches (padding id 0, padded to the longer of the two)
    or feature rows."""
    if len(text) == 1:
        return (torch.cat([text[0], more[0].to(text[0].device)]),)
    tokens, lengths = text
    t = max(tokens.shape[1], more[0].shape[1])
    a = torch.nn.functional.pad(tokens, (0, t - tokens.shape[1]))
    b = torch.nn.functional.pad(more[0].to(tokens.device), (0, t - more[0].shape[1]))
    return torch.cat([a, b]), torch.cat([lengths, more[1].to(lengths.device)])


def _reads_features(registry: Any, spec: dict[str, Any], default: str) -> bool:
    """Whether the encoder a spec names reads precomputed features (a wrapper encoder asks its inner one)."""
    return bool(registry.get(spec.get("name", default)).reads_features_of(spec))


def build_model(model_cfg: Any, *, vocab_size: int, itos: list[str] | None = None,
                feature_shape: tuple[int, ...] | None = None, text_feature_dim: int | None = None) -> VSEModel:
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
    if _reads_features(IMAGE_ENCODERS, img_spec, "precomp"):
        if feature_shape is None:
            raise ConfigError(f"model.image_encoder {img_spec.get('name')!r} reads precomputed features, but the "
                              "data set holds image files; use an image encoder such as 'cnn', or precomputed data")
        extra["img_dim"] = int(feature_shape[-1])
        extra["num_regions"] = int(feature_shape[0]) if len(feature_shape) == 2 else None
    txt_spec = dict(cfg.get("text_encoder") or {"name": "gru"})
    txt_spec.setdefault("use_abs", use_abs)
    txt_extra: dict[str, Any] = {}
    if _reads_features(TEXT_ENCODERS, txt_spec, "gru"):
        if text_feature_dim is None:
            raise ConfigError(f"model.text_encoder {txt_spec.get('name')!r} reads precomputed text features, but "
                              "the data set has caption strings; use a text encoder such as 'gru' or 'bow'")
        txt_extra["txt_dim"] = int(text_feature_dim)
    elif text_feature_dim is not None:
        raise ConfigError(f"the data set ships its text as feature vectors; model.text_encoder "
                          f"{txt_spec.get('name')!r} reads words. Use model.text_encoder.name=projector")
    image_encoder = IMAGE_ENCODERS.build(img_spec, embed_size=embed_size, **extra)
    text_encoder = TEXT_ENCODERS.build(txt_spec, vocab_size=vocab_size, embed_size=embed_size, itos=itos,
                                       **txt_extra)
    levels = [image_encoder.levels, text_encoder.levels]
    if levels[0] != levels[1]:
        raise ConfigError(f"model: the image encoder has {levels[0]} embedding level(s) and the text encoder "
                          f"{levels[1]}; use model.image_encoder.name=two_level and model.text_encoder.name="
                          "two_level together")
    similarity = build_similarity(cfg.get("similarity", "cosine"), embed_size=embed_size)
    return VSEModel(image_encoder, text_encoder, similarity=similarity)
