"""Does what a generative path writes or draws depend on its input? Measures through a matching model.

A caption decoder that writes one caption for every image, or a GAN that draws the same image for every text,
can still lower its training loss (the language prior, the image prior). These measures ask the trained
matching model instead, on score matrices it computed:

- :func:`diagonal_recall`: query i's one correct item is item i (a caption generated from image i, used as a
  query against the images); the percentage of queries whose correct item is in the top k;
- :func:`r_precision`: each row scores the true item (column 0) and K distractors (AttnGAN's R-precision with
  R = 1: a generated image against its generating caption and 99 random ones); chance is 1 / (K + 1);
- :func:`nearest_rows`: each query's nearest key by cosine (the nearest-neighbour captioning baseline:
  a test image gets a caption of its nearest training image).

Ties count against the correct item: a model whose scores are all equal ranks nothing first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _scores(scores: np.ndarray, what: str) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or not s.size:
        raise ValueError(f"{what}: expected a non-empty 2-d score matrix, got shape {s.shape}")
    return s


def diagonal_recall(scores: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``{"r1": ..., "r5": ..., "r10": ...}``: the percentage of the N queries (rows of the (N, M) ``scores``,
    M >= N) whose correct item i has rank < k. The rank counts the other items scoring at least as high."""
    s = _scores(scores, "diagonal_recall")
    n = s.shape[0]
    if s.shape[1] < n:
        raise ValueError(f"diagonal_recall: query i's item is column i, so scores need >= {n} columns, got {s.shape[1]}")
    true = s[np.arange(n), np.arange(n)]
    rank = (s >= true[:, None]).sum(1) - 1  # the correct item itself is not counted
    return {f"r{k}": float(100.0 * (rank < k).mean()) for k in ks}


def r_precision(scores: np.ndarray) -> float:
    """The share of rows of the (N, 1 + K) ``scores`` whose column 0 (the true item) scores strictly above
    every distractor."""
    s = _scores(scores, "r_precision")
    if s.shape[1] < 2:
        raise ValueError("r_precision: each row needs the true item and at least one distractor")
    return float((s[:, :1] > s[:, 1:]).all(1).mean())


def nearest_rows(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """(N,) the row of ``keys`` (M, D) nearest to each row of ``queries`` (N, D) by cosine (the first on a tie)."""
    q = np.asarray(queries, dtype=np.float64)
    k = np.asarray(keys, dtype=np.float64)
    if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1] or not len(k):
        raise ValueError(f"nearest_rows: expected (N, D) queries and (M >= 1, D) keys, got {q.shape} and {k.shape}")
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    k = k / np.maximum(np.linalg.norm(k, axis=1, keepdims=True), 1e-12)
    return (q @ k.T).argmax(1)


def distractor_rows(owners: np.ndarray, count: int, num_queries: int, seed: int = 0) -> np.ndarray:
    """(num_queries, count) random caption rows for R-precision: for query i, captions whose owner (image)
    is not i, drawn without replacement from a generator seeded with ``seed``."""
    owners = np.asarray(owners)
    rng = np.random.default_rng(seed)
    out = np.empty((num_queries, count), dtype=np.int64)
    for i in range(num_queries):
        pool = np.flatnonzero(owners != i)
        if len(pool) < count:
            raise ValueError(f"R-precision needs {count} captions of other images, only {len(pool)} exist")
        out[i] = rng.choice(pool, size=count, replace=False)
    return out
