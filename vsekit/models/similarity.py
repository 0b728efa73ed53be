"""Image-caption similarities. Row = image, column = caption (the VSE++ convention).

Two kinds, each behind its registry:

- ``SIMILARITIES``: parameter-free functions of two embedding matrices,
  ``sim(images (N, D), captions (M, D)) -> (N, M)`` (cosine, order, euclidean);
- ``SIMILARITY_NETWORKS``: modules with parameters (:class:`SimilarityNetwork`, e.g. SGRAF's SGR and SAF) that
  score a pair from what the encoders return beside their embeddings (their *contexts*: the regions of an
  image, the words of a caption), ``net(regions (N, R, E), words (M, T, E), lengths (M,)) -> (N, M)``.

:func:`build_similarity` turns the ``model.similarity`` config (a name, or ``{name: ..., **options}``) into
the module a :class:`~vsekit.models.vse.VSEModel` holds as ``similarity``: a :class:`FixedSimilarity`
(no parameters, nothing in the state dict) or a network (its parameters are ``similarity.*``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vsekit.errors import ConfigError, did_you_mean
from vsekit.registry import Registry

SIMILARITIES = Registry("similarity")
SIMILARITY_NETWORKS = Registry("similarity network", injected=("embed_size",))


@SIMILARITIES.register("cosine")
def cosine_sim(images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    """Inner product; equals the cosine because the encoders L2-normalise their outputs."""
    return images @ captions.t()


@SIMILARITIES.register("order")
def order_sim(images: torch.Tensor, captions: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """Order-violation similarity of VSE++: ``S_ij = -|| max(0, c_j - v_i) ||_2`` (L2 norm, not squared).

    Captions are the more abstract side: a caption coordinate above the image's is penalised.
    Computed ``chunk`` images at a time so memory is O(chunk * M * D), not O(N * M * D).
    """
    out = images.new_empty((images.shape[0], captions.shape[0]))
    for a in range(0, images.shape[0], chunk):
        diff = (captions.unsqueeze(0) - images[a : a + chunk].unsqueeze(1)).clamp_min(0)
        out[a : a + chunk] = -diff.pow(2).sum(-1).sqrt()
    return out


@SIMILARITIES.register("euclidean")
def euclidean_sim(images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    """Negative Euclidean distance ``S_ij = -|| v_i - c_j ||_2`` (ACMR ranks by distance in its common space,
    whose vectors are not normalised); larger = more similar, like every similarity here."""
    return -torch.cdist(images, captions)


def get_similarity(name: str):
    """The similarity function registered as ``name`` ("cosine" or "order")."""
    return SIMILARITIES.get(name)


class FixedSimilarity(nn.Module):
    """A registered similarity function as a module without parameters: ``forward(image_emb, caption_emb)``."""

    learned = False

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.fn = get_similarity(name)

    def forward(self, image_emb: torch.Tensor, caption_emb: torch.Tensor) -> torch.Tensor:
        return self.fn(image_emb, caption_emb)

    def extra_repr(self) -> str:
        return self.name


class SimilarityNetwork(nn.Module):
    """A similarity with parameters that scores (image, caption) pairs from the encoders' contexts.

    ``forward(regions (N, R, E), words (M, T, E), lengths (M,)) -> (N, M)`` scores every image against every
    caption; ``lengths[j]`` says how many rows of ``words[j]`` are real (the rest is padding and must not
    change the score). ``fixed_shapes=True`` asks for a score of each pair that is bitwise the same whatever
    other pairs share the call (evaluation counts ranks against thresholds computed in other calls); the
    default may batch pairs by the shapes at hand. It is trained by the ranking loss like the encoders.
    """

    learned = True
    name: str = ""

    def forward(self, regions: torch.Tensor, words: torch.Tensor, lengths: torch.Tensor, *,
                fixed_shapes: bool = False) -> torch.Tensor:
        raise NotImplementedError


def check_similarity_spec(spec: Any, where: str = "model.similarity") -> str | dict[str, Any]:
    """The ``model.similarity`` config, checked: a registered function's name (``"cosine"``; also accepted
    as ``{name: cosine}``, returned as the name), or a network's name or ``{name: sgr, **options}`` with its
    options validated against the network's signature. Anything else is a :class:`ConfigError` naming the key."""
    name = spec.get("name") if isinstance(spec, dict) else spec
    if not isinstance(name, str):
        raise ConfigError(f"{where}: expected a similarity name or a mapping with a 'name', got {spec!r}")
    if name in SIMILARITIES:
        extra = sorted(set(spec) - {"name"}) if isinstance(spec, dict) else []
        if extra:
            raise ConfigError(f"{where}.{extra[0]}: unknown key; the {name!r} similarity takes no options")
        return name
    if name in SIMILARITY_NETWORKS:
        return spec if isinstance(spec, str) else SIMILARITY_NETWORKS.validate(spec, where)
    known = sorted({*SIMILARITIES.names(), *SIMILARITY_NETWORKS.names()})
    key = f"{where}.name" if isinstance(spec, dict) else where
    raise ConfigError(f"{key}: unknown similarity {name!r}{did_you_mean(name, known)} (known: {', '.join(known)})")


def build_similarity(spec: str | dict[str, Any], *, embed_size: int) -> nn.Module:
    """The module for a ``model.similarity`` config: a :class:`FixedSimilarity` or a :class:`SimilarityNetwork`
    built with the joint-space size its contexts have."""
    spec = check_similarity_spec(spec)
    if isinstance(spec, str) and spec in SIMILARITIES:
        return FixedSimilarity(spec)
    net = SIMILARITY_NETWORKS.build(spec, embed_size=embed_size)
    net.name = spec["name"] if isinstance(spec, dict) else spec
    return net
