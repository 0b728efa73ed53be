"""How close an approximate search comes to the exact one: recall@k against exact inner-product search,
measured on every write of an approximate index and recorded in its manifest."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from vsekit.index.backends.numpy import inner_product_top_k
from vsekit.index.data import IndexData

RECALL_K = 10
RECALL_QUERIES = 500


def recall_at_k(search: Callable[[np.ndarray, int], Any], vectors: np.ndarray, queries: np.ndarray,
                k: int = RECALL_K) -> float:
    """Mean fraction of the exact top-``k`` (inner product) of ``queries`` over ``vectors`` that
    ``search(queries, k) -> (scores, rows)`` also returns in its top ``k``."""
    n = len(vectors)
    if n == 0 or len(queries) == 0:
        return 1.0
    k = min(k, n)
    _, exact = inner_product_top_k(vectors, queries, k)
    _, approx = search(np.ascontiguousarray(queries, dtype=np.float32), k)
    hits = [len(set(e.tolist()) & set(a.tolist())) for e, a in zip(exact, approx)]
    return float(np.sum(hits) / (k * len(queries)))


def sample_rows(n: int, size: int = RECALL_QUERIES, seed: int = 0) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, min(n, size), replace=False)) if n else np.zeros(0, int)


def measure_recall(data: IndexData, targets: list[str],
                   search: Callable[[str, np.ndarray, int], Any]) -> dict[str, float]:
    """recall@10 of ``search(target, queries, k)`` on each of ``targets`` against exact search, on a sample of
    realistic queries: captions query the images (text -> image), images query the captions (image -> text)."""
    out = {}
    for target in targets:
        other = "captions" if target == "images" else "images"
        qv = data.caption_vectors if other == "captions" else data.image_vectors
        if qv is None or len(qv) == 0:  # no captions: images query themselves
            qv = data.vectors(target)
        queries = np.asarray(qv[sample_rows(len(qv))], dtype=np.float32)
        out[target] = round(recall_at_k(lambda q, k, t=target: search(t, q, k), data.vectors(target), queries), 4)
    return out
