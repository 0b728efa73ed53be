"""What random embeddings score: the floor a trained model must clear."""

from __future__ import annotations

from math import comb

import numpy as np


def chance_rsum(caption_to_image: np.ndarray, num_images: int) -> float:
    """Expected rsum of random embeddings: t2i R@K = K/N; i2t R@K = 1 - C(M-g, K)/C(M, K) for an image with
    g of the M captions."""
    m = len(caption_to_image)
    per_image = np.bincount(caption_to_image, minlength=num_images)
    total = 0.0
    for k in (1, 5, 10):
        total += 100.0 * min(k, num_images) / num_images
        total += 100.0 * float(np.mean([1 - comb(m - g, k) / comb(m, k) for g in per_image if g > 0]))
    return total
