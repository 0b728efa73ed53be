"""Image-caption similarity functions, ``sim(images (N, D), captions (M, D)) -> (N, M)``.

Row = image, column = caption (the VSE++ convention).
"""

from __future__ import annotations

import torch

from vsekit.registry import Registry

SIMILARITIES = Registry("similarity")


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
